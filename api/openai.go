package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"unicode/utf8"
)

// chatRequest and completionRequest hold the OpenAI request fields krserve
// reads; unknown fields are ignored. Fields that accept several JSON shapes
// are decoded by hand from RawMessage.
type commonRequest struct {
	Model               string             `json:"model"`
	MaxTokens           *int               `json:"max_tokens"`
	MaxCompletionTokens *int               `json:"max_completion_tokens"`
	Temperature         *float64           `json:"temperature"`
	TopP                *float64           `json:"top_p"`
	TopK                *int               `json:"top_k"`
	MinP                *float64           `json:"min_p"`
	Stop                json.RawMessage    `json:"stop"`
	Seed                *int64             `json:"seed"`
	PresencePenalty     *float64           `json:"presence_penalty"`
	FrequencyPenalty    *float64           `json:"frequency_penalty"`
	RepetitionPenalty   *float64           `json:"repetition_penalty"`
	LogitBias           map[string]float64 `json:"logit_bias"`
	Logprobs            json.RawMessage    `json:"logprobs"`
	TopLogprobs         *int               `json:"top_logprobs"`
	N                   *int               `json:"n"`
	Stream              bool               `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	ResponseFormat json.RawMessage `json:"response_format"`
	User           string          `json:"user"`
	Timeout        *float64        `json:"timeout"`    // krserve extension: seconds
	IgnoreEOS      bool            `json:"ignore_eos"` // krserve extension (also vLLM's)
	// KeepAlive is Ollama's keep_alive: how long the model stays loaded
	// once idle after this request (seconds or a duration; 0: unload now;
	// negative: keep it).
	KeepAlive json.RawMessage `json:"keep_alive"`
}

type chatRequest struct {
	commonRequest
	// Decoded in the body's one json.Unmarshal (no second pass over the
	// conversation); parseMessages validates it.
	Messages          []chatMessage   `json:"messages"`
	Tools             json.RawMessage `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls"`
}

type completionRequest struct {
	commonRequest
	Prompt json.RawMessage `json:"prompt"`
	Echo   bool            `json:"echo"`
	Suffix *string         `json:"suffix"`
}

type chatMessage struct {
	Role       string         `json:"role"`
	Content    messageContent `json:"content"`
	Name       string         `json:"name"`
	ToolCalls  []inToolCall   `json:"tool_calls"`
	ToolCallID string         `json:"tool_call_id"`
}

// messageContent is a message's content as sent: a string or a list of parts.
// It never fails to decode; what is wrong with it is reported by
// parseMessages, with the message's index.
type messageContent struct {
	set   bool // present and not null
	bad   bool // neither a string nor an array of part objects
	text  string
	parts []contentPart // nil when the content is a string
}

func (c *messageContent) UnmarshalJSON(b []byte) error {
	*c = messageContent{}
	switch {
	case string(b) == "null":
	case b[0] == '"':
		c.set = true
		// The body was validated as a whole before decoding, so a string
		// without escapes is its bytes, if they are valid UTF-8 (json
		// replaces invalid bytes with U+FFFD; let it do that).
		if inner := b[1 : len(b)-1]; bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
			c.text = string(inner)
		} else if err := json.Unmarshal(b, &c.text); err != nil {
			c.bad = true
		}
	case b[0] == '[':
		c.set = true
		c.parts = []contentPart{}
		if err := json.Unmarshal(b, &c.parts); err != nil {
			c.bad = true
		}
	default:
		c.set, c.bad = true, true
	}
	return nil
}

type contentPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

// apiError is an OpenAI-style error with its HTTP status.
type apiError struct {
	Status  int
	Type    string // invalid_request_error, authentication_error, server_error, rate_limit_error...
	Code    string
	Param   string
	Message string
}

func (e *apiError) Error() string { return e.Message }

func invalid(param, format string, args ...any) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Param: param, Message: fmt.Sprintf(format, args...)}
}

// decodeJSON decodes one JSON value, refusing trailing data. A field of the
// wrong type is named in the error's param.
func decodeJSON(body []byte, v any) *apiError {
	// One json.Unmarshal: it checks the whole body (trailing data included)
	// before decoding, and a type error still decodes the rest.
	err := json.Unmarshal(body, v)
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case err == nil:
	case errors.As(err, &te) && te.Field != "":
	case errors.As(err, &se) && strings.HasSuffix(se.Error(), "after top-level value"):
		return &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_json", Message: "request body has data after the JSON object"}
	default:
		return &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_json", Message: "request body is not valid JSON: " + err.Error()}
	}
	if te != nil {
		// Field is the Go path; the embedded struct's name is not part of the JSON.
		param := strings.TrimPrefix(te.Field, "commonRequest.")
		if param == "messages" || strings.HasPrefix(param, "messages.") {
			return invalid("messages", "messages must be an array of {role, content} objects: %v", err)
		}
		want := jsonKind(te.Type)
		msg := fmt.Sprintf("invalid type for %s: expected %s, got %s", param, want, te.Value)
		if want == "a number" && strings.HasPrefix(te.Value, "number") {
			msg = fmt.Sprintf("invalid value for %s: %s is out of range", param, te.Value)
		}
		return &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_type", Param: param, Message: msg}
	}
	return nil
}

// jsonKind names the JSON type a Go type decodes from.
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another type"
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "another type"
}

func isNull(r json.RawMessage) bool {
	t := bytes.TrimSpace(r)
	return len(t) == 0 || string(t) == "null"
}

// parseStop accepts a string or a list of strings.
func parseStop(r json.RawMessage, maxStop, maxLen int) ([]string, *apiError) {
	if isNull(r) {
		return nil, nil
	}
	var one string
	if err := json.Unmarshal(r, &one); err == nil {
		if one == "" {
			return nil, nil
		}
		return []string{one}, checkStops([]string{one}, maxStop, maxLen)
	}
	var many []string
	if err := json.Unmarshal(r, &many); err != nil {
		return nil, invalid("stop", "stop must be a string or an array of strings")
	}
	out := many[:0]
	for _, s := range many {
		if s != "" {
			out = append(out, s)
		}
	}
	return out, checkStops(out, maxStop, maxLen)
}

func checkStops(s []string, maxStop, maxLen int) *apiError {
	if len(s) > maxStop {
		return invalid("stop", "at most %d stop sequences are allowed; got %d", maxStop, len(s))
	}
	for _, x := range s {
		if len(x) > maxLen {
			return invalid("stop", "a stop sequence may be at most %d bytes; got %d", maxLen, len(x))
		}
	}
	return nil
}

// parseMessages validates the decoded messages and returns each one's text,
// parts joined. (A messages value that is not an array of objects fails the
// body's decoding: see decodeJSON.)
func parseMessages(msgs []chatMessage) ([]string, *apiError) {
	if msgs == nil {
		return nil, invalid("messages", "messages is required")
	}
	if len(msgs) == 0 {
		return nil, invalid("messages", "messages must not be empty")
	}
	texts := make([]string, len(msgs))
	for i, m := range msgs {
		switch m.Role {
		case "system", "user", "assistant", "developer":
		case "tool":
			if m.ToolCallID == "" {
				return nil, invalid(fmt.Sprintf("messages[%d].tool_call_id", i), "messages[%d] has role tool but no tool_call_id", i)
			}
		case "":
			return nil, invalid(fmt.Sprintf("messages[%d].role", i), "messages[%d] has no role", i)
		default:
			return nil, invalid(fmt.Sprintf("messages[%d].role", i), "messages[%d].role %q is not supported (use system, user, assistant or tool)", i, m.Role)
		}
		if len(m.ToolCalls) > 0 && m.Role != "assistant" {
			return nil, invalid(fmt.Sprintf("messages[%d].tool_calls", i), "messages[%d] has tool_calls but role %q; only assistant messages carry tool calls", i, m.Role)
		}
		c := &m.Content
		if !c.set && len(m.ToolCalls) > 0 { // an assistant turn that only called tools
			continue
		}
		if !c.set {
			return nil, invalid(fmt.Sprintf("messages[%d].content", i), "messages[%d] has no content", i)
		}
		if c.bad {
			return nil, invalid(fmt.Sprintf("messages[%d].content", i), "messages[%d].content must be a string or an array of text parts", i)
		}
		if c.parts == nil {
			texts[i] = c.text
			continue
		}
		var b strings.Builder
		for j, p := range c.parts {
			if p.Type != "text" {
				return nil, invalid(fmt.Sprintf("messages[%d].content[%d].type", i, j), "content part type %q is not supported; only text", p.Type)
			}
			b.WriteString(p.Text)
		}
		texts[i] = b.String()
	}
	return texts, nil
}

// parsePrompt accepts a string, a one-element array of strings, or an array of
// token ids.
func parsePrompt(r json.RawMessage) (text string, ids []int32, e *apiError) {
	if isNull(r) {
		return "", nil, invalid("prompt", "prompt is required")
	}
	if err := json.Unmarshal(r, &text); err == nil {
		return text, nil, nil
	}
	var strs []string
	if err := json.Unmarshal(r, &strs); err == nil {
		if len(strs) == 0 {
			return "", nil, invalid("prompt", "prompt must not be empty")
		}
		if len(strs) != 1 {
			return "", nil, invalid("prompt", "an array of %d prompts is not supported; send one prompt per request", len(strs))
		}
		return strs[0], nil, nil
	}
	var nums []float64
	if err := json.Unmarshal(r, &nums); err == nil {
		if len(nums) == 0 {
			return "", nil, invalid("prompt", "prompt must not be empty")
		}
		ids = make([]int32, len(nums))
		for i, f := range nums {
			if f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
				return "", nil, invalid("prompt", "prompt[%d] = %v is not a token id", i, f)
			}
			ids[i] = int32(f)
		}
		return "", ids, nil
	}
	return "", nil, invalid("prompt", "prompt must be a string or an array of token ids")
}

// Response shapes.

type usage struct {
	PromptTokens        int           `json:"prompt_tokens"`
	CompletionTokens    int           `json:"completion_tokens"`
	TotalTokens         int           `json:"total_tokens"`
	PromptTokensDetails promptDetails `json:"prompt_tokens_details"`
}

// promptDetails is OpenAI's usage.prompt_tokens_details: CachedTokens of the
// prompt tokens came from the worker's prompt cache (always present, 0 when
// none did, as OpenAI reports it).
type promptDetails struct {
	CachedTokens int `json:"cached_tokens"`
}

type chatChoice struct {
	Index        int           `json:"index"`
	Message      *chatFullMsg  `json:"message,omitempty"`
	Delta        *chatOutMsg   `json:"delta,omitempty"`
	Logprobs     *chatLogprobs `json:"logprobs"`
	FinishReason *string       `json:"finish_reason"`
}

type chatOutMsg struct {
	Role      string        `json:"role,omitempty"`
	Content   *string       `json:"content,omitempty"`
	ToolCalls []outToolCall `json:"tool_calls,omitempty"`
}

// chatFullMsg is a non-streamed choice's message: content is null when the
// model only called tools.
type chatFullMsg struct {
	Role      string        `json:"role"`
	Content   *string       `json:"content"`
	ToolCalls []outToolCall `json:"tool_calls,omitempty"`
}

type chatResponse struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint string       `json:"system_fingerprint"`
	Choices           []chatChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
}

type completionChoice struct {
	Index        int                 `json:"index"`
	Text         string              `json:"text"`
	Logprobs     *completionLogprobs `json:"logprobs"`
	FinishReason *string             `json:"finish_reason"`
}

type completionResponse struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	SystemFingerprint string             `json:"system_fingerprint"`
	Choices           []completionChoice `json:"choices"`
	Usage             *usage             `json:"usage,omitempty"`
}
