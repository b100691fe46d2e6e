package api

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
)

const (
	chatPath = "/v1/chat/completions"
	cmplPath = "/v1/completions"
)

// chatJSON is a valid chat request with extra fields (",\"k\":v...") appended.
func chatJSON(extra string) string {
	return `{"model":"t","messages":[{"role":"user","content":"hi"}]` + extra + `}`
}

// cmplJSON is a valid completion request with extra fields appended.
func cmplJSON(extra string) string {
	return `{"model":"t","prompt":"hi"` + extra + `}`
}

// apiErr is the exact error a request must get. code and param "" mean JSON
// null; msg is a substring of the message.
type apiErr struct {
	status           int
	typ, code, param string
	msg              string
	retryAfter       string // expected Retry-After header ("": none)
	allow            string // expected Allow header (checked when set)
}

func badRequest(param, msg string) apiErr {
	return apiErr{status: 400, typ: "invalid_request_error", param: param, msg: msg}
}

func badType(param, msg string) apiErr {
	return apiErr{status: 400, typ: "invalid_request_error", code: "invalid_type", param: param, msg: msg}
}

func invalidJSON(msg string) apiErr {
	return apiErr{status: 400, typ: "invalid_request_error", code: "invalid_json", msg: msg}
}

func (h *harness) expectError(t *testing.T, resp *http.Response, body []byte, want apiErr) {
	t.Helper()
	if resp.StatusCode != want.status {
		t.Errorf("status %d, want %d; body %s", resp.StatusCode, want.status, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	typ, code, param, msg, err := checkErrorBody(body)
	if err != nil {
		t.Error(err)
		return
	}
	if typ != want.typ || code != want.code || param != want.param {
		t.Errorf("error (type %q, code %q, param %q), want (%q, %q, %q); message %q", typ, code, param, want.typ, want.code, want.param, msg)
	}
	if !strings.Contains(msg, want.msg) {
		t.Errorf("message %q does not contain %q", msg, want.msg)
	}
	if got := resp.Header.Get("Retry-After"); got != want.retryAfter {
		t.Errorf("Retry-After %q, want %q", got, want.retryAfter)
	}
	if want.allow != "" {
		if got := resp.Header.Get("Allow"); got != want.allow {
			t.Errorf("Allow %q, want %q", got, want.allow)
		}
	}
}

func TestInvalidRequests(t *testing.T) {
	h := newHarness(t)
	manyStops := `["a","b","c","d","e","f","g","h","i"]`
	longStop := `"` + strings.Repeat("x", 257) + `"`
	// 1025 keys: the count is checked before the ids (1000.. are out of
	// the vocabulary).
	var bias1025 strings.Builder
	bias1025.WriteString(`{`)
	for i := range 1025 {
		if i > 0 {
			bias1025.WriteString(",")
		}
		fmt.Fprintf(&bias1025, `"%d":1`, i)
	}
	bias1025.WriteString(`}`)

	prompt64 := strings.Repeat("a", 64)

	cases := []struct {
		name string
		path string
		body string
		want apiErr
	}{
		// Body and JSON.
		{"empty body", chatPath, ``, invalidJSON("not valid JSON")},
		{"not JSON", chatPath, `hello`, invalidJSON("not valid JSON")},
		{"truncated JSON", chatPath, `{"model":"t","messages":[`, invalidJSON("not valid JSON")},
		{"array body", chatPath, `[]`, invalidJSON("not valid JSON")},
		{"string body", cmplPath, `"hi"`, invalidJSON("not valid JSON")},
		{"trailing garbage", chatPath, chatJSON(``) + ` x`, invalidJSON("data after the JSON object")},
		{"second object", chatPath, chatJSON(``) + chatJSON(``), invalidJSON("data after the JSON object")},
		{"trailing brace", chatPath, chatJSON(``) + `}`, invalidJSON("data after the JSON object")},
		{"trailing bracket", cmplPath, cmplJSON(``) + `]`, invalidJSON("data after the JSON object")},
		{"max_tokens string", chatPath, chatJSON(`,"max_tokens":"10"`), badType("max_tokens", "invalid type for max_tokens: expected an integer, got string")},
		{"max_tokens fraction", chatPath, chatJSON(`,"max_tokens":1.5`), badType("max_tokens", "invalid type for max_tokens: expected an integer, got number 1.5")},
		{"max_tokens huge", chatPath, chatJSON(`,"max_tokens":1e400`), badType("max_tokens", "got number 1e400")},
		{"temperature overflow", chatPath, chatJSON(`,"temperature":1e999`), badType("temperature", "invalid value for temperature: number 1e999 is out of range")},
		{"temperature string", chatPath, chatJSON(`,"temperature":"NaN"`), badType("temperature", "invalid type for temperature: expected a number, got string")},
		{"stream string", chatPath, chatJSON(`,"stream":"true"`), badType("stream", "invalid type for stream: expected a boolean, got string")},
		{"model number", chatPath, `{"model":5,"messages":[{"role":"user","content":"hi"}]}`, badType("model", "invalid type for model: expected a string, got number")},
		{"stream_options.include_usage string", chatPath, chatJSON(`,"stream":true,"stream_options":{"include_usage":"yes"}`), badType("stream_options.include_usage", "expected a boolean, got string")},

		// Model.
		{"missing model", chatPath, `{"messages":[{"role":"user","content":"hi"}]}`, badRequest("model", "model is required")},
		{"empty model", cmplPath, `{"model":"","prompt":"hi"}`, badRequest("model", "model is required")},
		{"null body", chatPath, `null`, badRequest("messages", "messages is required")},
		{"unknown model", chatPath, `{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}`,
			apiErr{status: 404, typ: "invalid_request_error", code: "model_not_found", param: "model", msg: `model "gpt-4" is not served here`}},
		{"unknown model completion", cmplPath, `{"model":"/m/other","prompt":"hi"}`,
			apiErr{status: 404, typ: "invalid_request_error", code: "model_not_found", param: "model", msg: `model "/m/other" is not served here`}},

		// Messages.
		{"missing messages", chatPath, `{"model":"t"}`, badRequest("messages", "messages is required")},
		{"null messages", chatPath, `{"model":"t","messages":null}`, badRequest("messages", "messages is required")},
		{"empty messages", chatPath, `{"model":"t","messages":[]}`, badRequest("messages", "messages must not be empty")},
		{"messages string", chatPath, `{"model":"t","messages":"hi"}`, badRequest("messages", "messages must be an array")},
		{"messages object", chatPath, `{"model":"t","messages":{"role":"user","content":"hi"}}`, badRequest("messages", "messages must be an array")},
		{"message without role", chatPath, `{"model":"t","messages":[{"content":"hi"}]}`, badRequest("messages[0].role", "messages[0] has no role")},
		{"null message", chatPath, `{"model":"t","messages":[null]}`, badRequest("messages[0].role", "messages[0] has no role")},
		// Tools, tool_choice, response_format.
		{"tools not array", chatPath, chatJSON(`,"tools":{"type":"function"}`), badRequest("tools", "tools must be an array")},
		{"tool type", chatPath, chatJSON(`,"tools":[{"type":"retrieval"}]`), badRequest("tools[0].type", `tools[0].type must be "function"`)},
		{"tool no function", chatPath, chatJSON(`,"tools":[{"type":"function"}]`), badRequest("tools[0].function", "tools[0] needs a function")},
		{"tool bad name", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"get weather"}}]`), badRequest("tools[0].function.name", "letters, digits")},
		{"tool dup name", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}]`), badRequest("tools[1].function.name", `two tools are named "f"`)},
		{"tool params array", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"f","parameters":[1]}}]`), badRequest("tools[0].function.parameters", "must be a JSON object")},
		{"tool_choice unknown name", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}`), badRequest("tool_choice", `names function "g", which is not in tools`)},
		{"tool_choice bad mode", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"always"`), badRequest("tool_choice", `got "always"`)},
		{"tool_choice required without tools", chatPath, chatJSON(`,"tool_choice":"required"`), badRequest("tool_choice", "needs tools")},
		{"tool_choice named without tools", chatPath, chatJSON(`,"tool_choice":{"type":"function","function":{"name":"f"}}`), badRequest("tool_choice", "not in tools")},
		{"tool_calls on user", chatPath, `{"model":"t","messages":[{"role":"user","content":"hi","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}`, badRequest("messages[0].tool_calls", "only assistant messages")},
		{"tool call args number", chatPath, `{"model":"t","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":5}}]}]}`, badRequest("messages[0].tool_calls[0].function.arguments", "must be a JSON string")},
		{"response_format string", chatPath, chatJSON(`,"response_format":"json"`), badRequest("response_format", "must be an object")},
		{"response_format type", chatPath, chatJSON(`,"response_format":{"type":"xml"}`), badRequest("response_format.type", `"xml" is not supported`)},
		{"response_format no type", chatPath, chatJSON(`,"response_format":{}`), badRequest("response_format.type", "needs a type")},
		{"json_schema missing", chatPath, chatJSON(`,"response_format":{"type":"json_schema"}`), badRequest("response_format.json_schema", "needs json_schema")},
		{"json_schema no name", chatPath, chatJSON(`,"response_format":{"type":"json_schema","json_schema":{"schema":{}}}`), badRequest("response_format.json_schema.name", "1 to 64")},
		{"json_schema array", cmplPath, cmplJSON(`,"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":[true]}}`), badRequest("response_format.json_schema.schema", "must be a JSON object")},
		{"role tool", chatPath, `{"model":"t","messages":[{"role":"user","content":"hi"},{"role":"tool","content":"x"}]}`, badRequest("messages[1].tool_call_id", `messages[1] has role tool but no tool_call_id`)},
		{"role number", chatPath, `{"model":"t","messages":[{"role":1,"content":"hi"}]}`, badRequest("messages", "messages must be an array")},
		{"missing content", chatPath, `{"model":"t","messages":[{"role":"system","content":"s"},{"role":"user"}]}`, badRequest("messages[1].content", "messages[1] has no content")},
		{"null content", chatPath, `{"model":"t","messages":[{"role":"user","content":null}]}`, badRequest("messages[0].content", "messages[0] has no content")},
		{"content number", chatPath, `{"model":"t","messages":[{"role":"user","content":5}]}`, badRequest("messages[0].content", "must be a string or an array of text parts")},
		{"content array of strings", chatPath, `{"model":"t","messages":[{"role":"user","content":["hi"]}]}`, badRequest("messages[0].content", "must be a string or an array of text parts")},
		{"image part", chatPath, `{"model":"t","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]}`,
			badRequest("messages[0].content[1].type", `content part type "image_url" is not supported`)},
		{"part without type", chatPath, `{"model":"t","messages":[{"role":"user","content":[{"text":"hi"}]}]}`, badRequest("messages[0].content[0].type", `content part type "" is not supported`)},
		{"template refuses", chatPath, `{"model":"t","messages":[{"role":"user","content":"` + magicTemplateInvalid + `"}]}`, badRequest("messages", "chat template refused the messages")},

		// Prompt.
		{"missing prompt", cmplPath, `{"model":"t"}`, badRequest("prompt", "prompt is required")},
		{"null prompt", cmplPath, `{"model":"t","prompt":null}`, badRequest("prompt", "prompt is required")},
		{"prompt number", cmplPath, `{"model":"t","prompt":5}`, badRequest("prompt", "prompt must be a string or an array of token ids")},
		{"prompt object", cmplPath, `{"model":"t","prompt":{"text":"hi"}}`, badRequest("prompt", "prompt must be a string or an array of token ids")},
		{"several prompts", cmplPath, `{"model":"t","prompt":["a","b"]}`, badRequest("prompt", "an array of 2 prompts is not supported")},
		{"empty prompt array", cmplPath, `{"model":"t","prompt":[]}`, badRequest("prompt", "prompt must not be empty")},
		{"empty prompt", cmplPath, `{"model":"t","prompt":""}`, badRequest("prompt", "the prompt is empty after tokenization")},
		{"token ids fraction", cmplPath, `{"model":"t","prompt":[5,2.5]}`, badRequest("prompt", "prompt[1] = 2.5 is not a token id")},
		{"token ids negative", cmplPath, `{"model":"t","prompt":[5,-3]}`, badRequest("prompt", "prompt[1] = -3 is not a token id")},
		{"token ids mixed", cmplPath, `{"model":"t","prompt":[5,"a"]}`, badRequest("prompt", "prompt must be a string or an array of token ids")},
		{"token ids nested", cmplPath, `{"model":"t","prompt":[[5,6]]}`, badRequest("prompt", "prompt must be a string or an array of token ids")},
		{"token id over int32", cmplPath, `{"model":"t","prompt":[2147483648]}`, badRequest("prompt", "prompt[0] = 2.147483648e+09 is not a token id")},
		{"token id out of vocabulary", cmplPath, `{"model":"t","prompt":[5,1000]}`, badRequest("prompt", "prompt[1] = 1000 is not a token id of this model (vocabulary size 1000)")},
		{"echo", cmplPath, cmplJSON(`,"echo":true`), badRequest("echo", "echo is not supported")},
		{"suffix", cmplPath, cmplJSON(`,"suffix":"end"`), badRequest("suffix", "suffix is not supported")},

		// Context.
		{"completion over context", cmplPath, `{"model":"t","prompt":"` + prompt64 + `"}`,
			apiErr{status: 400, typ: "invalid_request_error", code: "context_length_exceeded", param: "prompt", msg: "maximum context length is 64 tokens. However, your prompt has 64 tokens."}},
		{"token ids over context", cmplPath, `{"model":"t","prompt":[` + strings.TrimSuffix(strings.Repeat("7,", 70), ",") + `]}`,
			apiErr{status: 400, typ: "invalid_request_error", code: "context_length_exceeded", param: "prompt", msg: "maximum context length is 64 tokens. However, your prompt has 70 tokens."}},
		{"chat over context", chatPath, `{"model":"t","messages":[{"role":"user","content":"` + prompt64[:63] + `"}]}`,
			apiErr{status: 400, typ: "invalid_request_error", code: "context_length_exceeded", param: "messages", msg: "maximum context length is 64 tokens. However, your prompt has 64 tokens."}},

		// Lengths.
		{"max_tokens 0", chatPath, chatJSON(`,"max_tokens":0`), badRequest("max_tokens", "max_tokens must be at least 1; got 0")},
		{"max_tokens negative", cmplPath, cmplJSON(`,"max_tokens":-5`), badRequest("max_tokens", "max_tokens must be at least 1; got -5")},
		{"max_tokens over cap", chatPath, chatJSON(`,"max_tokens":513`), badRequest("max_tokens", "max_tokens may be at most 512; got 513")},
		{"max_completion_tokens 0", chatPath, chatJSON(`,"max_completion_tokens":0`), badRequest("max_completion_tokens", "max_completion_tokens must be at least 1; got 0")},
		{"max_completion_tokens over cap", chatPath, chatJSON(`,"max_tokens":5,"max_completion_tokens":100000`), badRequest("max_completion_tokens", "max_completion_tokens may be at most 512; got 100000")},

		// Sampling.
		{"temperature negative", chatPath, chatJSON(`,"temperature":-0.1`), badRequest("temperature", "temperature must be between 0 and 2; got -0.1")},
		{"temperature high", cmplPath, cmplJSON(`,"temperature":2.5`), badRequest("temperature", "temperature must be between 0 and 2; got 2.5")},
		{"top_p 0", chatPath, chatJSON(`,"top_p":0`), badRequest("top_p", "top_p must be in (0, 1]; got 0")},
		{"top_p over 1", chatPath, chatJSON(`,"top_p":1.01`), badRequest("top_p", "top_p must be in (0, 1]; got 1.01")},
		{"top_p negative", chatPath, chatJSON(`,"top_p":-1`), badRequest("top_p", "top_p must be in (0, 1]; got -1")},
		{"top_k -2", chatPath, chatJSON(`,"top_k":-2`), badRequest("top_k", "top_k must be 0 or -1 (off) or positive; got -2")},
		{"min_p negative", chatPath, chatJSON(`,"min_p":-0.5`), badRequest("min_p", "min_p must be in [0, 1]; got -0.5")},
		{"min_p over 1", chatPath, chatJSON(`,"min_p":1.5`), badRequest("min_p", "min_p must be in [0, 1]; got 1.5")},
		{"presence_penalty high", chatPath, chatJSON(`,"presence_penalty":2.5`), badRequest("presence_penalty", "presence_penalty must be between -2 and 2; got 2.5")},
		{"frequency_penalty low", chatPath, chatJSON(`,"frequency_penalty":-3`), badRequest("frequency_penalty", "frequency_penalty must be between -2 and 2; got -3")},
		// Both invalid: the first in the documented order is named, every time.
		{"both penalties", chatPath, chatJSON(`,"frequency_penalty":-3,"presence_penalty":3`), badRequest("presence_penalty", "presence_penalty must be between -2 and 2; got 3")},
		{"repetition_penalty 0", chatPath, chatJSON(`,"repetition_penalty":0`), badRequest("repetition_penalty", "repetition_penalty must be in (0, 10]; got 0")},
		{"repetition_penalty negative", chatPath, chatJSON(`,"repetition_penalty":-1`), badRequest("repetition_penalty", "repetition_penalty must be in (0, 10]; got -1")},
		{"repetition_penalty high", chatPath, chatJSON(`,"repetition_penalty":11`), badRequest("repetition_penalty", "repetition_penalty must be in (0, 10]; got 11")},
		{"logit_bias bad key", chatPath, chatJSON(`,"logit_bias":{"abc":1}`), badRequest("logit_bias", `logit_bias key "abc" is not a token id of this model`)},
		{"logit_bias negative key", chatPath, chatJSON(`,"logit_bias":{"-1":1}`), badRequest("logit_bias", `logit_bias key "-1" is not a token id of this model`)},
		{"logit_bias out of vocab", chatPath, chatJSON(`,"logit_bias":{"1000":1}`), badRequest("logit_bias", `logit_bias key "1000" is not a token id of this model`)},
		{"logit_bias key over int32", chatPath, chatJSON(`,"logit_bias":{"4294967297":1}`), badRequest("logit_bias", `logit_bias key "4294967297" is not a token id of this model`)},
		{"logit_bias value high", chatPath, chatJSON(`,"logit_bias":{"5":101}`), badRequest("logit_bias", "logit_bias values must be between -100 and 100; got 101")},
		{"logit_bias value low", chatPath, chatJSON(`,"logit_bias":{"5":-100.5}`), badRequest("logit_bias", "logit_bias values must be between -100 and 100; got -100.5")},
		{"logit_bias value string", chatPath, chatJSON(`,"logit_bias":{"5":"x"}`), badType("logit_bias", "invalid type for logit_bias: expected a number, got string")},
		{"logit_bias too many", chatPath, chatJSON(`,"logit_bias":` + bias1025.String()), badRequest("logit_bias", "logit_bias may name at most 1024 tokens")},
		{"too many stops", chatPath, chatJSON(`,"stop":` + manyStops), badRequest("stop", "at most 8 stop sequences are allowed; got 9")},
		{"stop too long", chatPath, chatJSON(`,"stop":` + longStop), badRequest("stop", "a stop sequence may be at most 256 bytes; got 257")},
		{"stop in list too long", cmplPath, cmplJSON(`,"stop":["a",` + longStop + `]`), badRequest("stop", "a stop sequence may be at most 256 bytes; got 257")},
		{"stop number", chatPath, chatJSON(`,"stop":5`), badRequest("stop", "stop must be a string or an array of strings")},
		{"stop list of numbers", chatPath, chatJSON(`,"stop":[1,2]`), badRequest("stop", "stop must be a string or an array of strings")},

		// Unsupported features.
		{"n 2", chatPath, chatJSON(`,"n":2`), badRequest("n", "n must be 1; krserve returns one choice per request (got 2)")},
		{"n 0", cmplPath, cmplJSON(`,"n":0`), badRequest("n", "n must be 1")},
		{"logprobs number on chat", chatPath, chatJSON(`,"logprobs":1`), badRequest("logprobs", "logprobs must be a boolean")},
		{"logprobs 21", cmplPath, cmplJSON(`,"logprobs":21`), badRequest("logprobs", "logprobs must be between 0 and 20; got 21")},
		{"logprobs -1", cmplPath, cmplJSON(`,"logprobs":-1`), badRequest("logprobs", "logprobs must be between 0 and 20; got -1")},
		{"logprobs bool on completions", cmplPath, cmplJSON(`,"logprobs":true`), badRequest("logprobs", "logprobs must be an integer between 0 and 20")},
		{"top_logprobs without logprobs", chatPath, chatJSON(`,"top_logprobs":3`), badRequest("top_logprobs", "top_logprobs requires logprobs: true")},
		{"top_logprobs 21", chatPath, chatJSON(`,"logprobs":true,"top_logprobs":21`), badRequest("top_logprobs", "top_logprobs must be between 0 and 20; got 21")},
		{"top_logprobs on completions", cmplPath, cmplJSON(`,"logprobs":2,"top_logprobs":3`), badRequest("top_logprobs", "top_logprobs is a chat completions parameter")},
		{"stream_options without stream", chatPath, chatJSON(`,"stream_options":{"include_usage":true}`), badRequest("stream_options", "stream_options is only allowed with stream: true")},
		{"stream_options with stream false", cmplPath, cmplJSON(`,"stream":false,"stream_options":{}`), badRequest("stream_options", "stream_options is only allowed with stream: true")},
		{"timeout 0", chatPath, chatJSON(`,"timeout":0`), badRequest("timeout", "timeout must be a positive number of seconds")},
		{"timeout negative", cmplPath, cmplJSON(`,"timeout":-1`), badRequest("timeout", "timeout must be a positive number of seconds")},

		// A worker that never answers.
		{"worker silent", cmplPath, `{"model":"t","timeout":0.01,"prompt":"` + magicWorkerSilent + `"}`,
			apiErr{status: 504, typ: "timeout_error", code: "timeout", msg: "timed out"}},

		// Worker refusals after admission (non-streamed: a plain error).
		{"worker says invalid", cmplPath, `{"model":"t","prompt":"` + magicWorkerInvalid + `"}`,
			apiErr{status: 400, typ: "invalid_request_error", msg: "top_k must be >= 0"}},
		{"worker internal error", cmplPath, `{"model":"t","prompt":"` + magicWorkerInternal + `"}`,
			apiErr{status: 500, typ: "server_error", code: "internal", msg: "metal says no"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := h.do("POST", c.path, c.body)
			h.expectError(t, resp, body, c.want)
		})
	}
	if err := h.idle(5 * time.Second); err != nil {
		t.Error(err)
	}
}

// TestAcceptedRequests: boundary values, unknown fields and alternative
// shapes are accepted.
func TestAcceptedRequests(t *testing.T) {
	h := newHarness(t)
	eightStops := `["a","b","c","d","e","f","g","` + strings.Repeat("x", 256) + `"]`
	cases := []struct {
		name, path, body string
	}{
		{"minimal chat", chatPath, chatJSON(``)},
		{"minimal completion", cmplPath, cmplJSON(``)},
		{"model path", chatPath, `{"model":"/m/tiny","messages":[{"role":"user","content":"hi"}]}`},
		{"unknown fields", chatPath, chatJSON(`,"user":"u-1","foo":{"bar":[1,2,{"baz":null}]},"tools":[],"response_format":{"type":"text"},"parallel_tool_calls":false`)},
		{"unknown fields completion", cmplPath, cmplJSON(`,"user":"u-1","foo":1,"best_of":1`)},
		{"text parts", chatPath, `{"model":"t","messages":[{"role":"user","content":[{"type":"text","text":"hel"},{"type":"text","text":"lo"}]}]}`},
		{"empty text part list", chatPath, `{"model":"t","messages":[{"role":"system","content":[]},{"role":"user","content":"hi"}]}`},
		{"every role", chatPath, `{"model":"t","messages":[{"role":"system","content":"s"},{"role":"developer","content":"d"},{"role":"user","content":"u","name":"bob"},{"role":"assistant","content":"a"},{"role":"user","content":"u"}]}`},
		{"empty content string", chatPath, `{"model":"t","messages":[{"role":"user","content":""}]}`},
		{"prompt one-element array", cmplPath, `{"model":"t","prompt":["hi"]}`},
		{"token ids", cmplPath, `{"model":"t","prompt":[5,6,999,0,1e2]}`},
		{"prompt just under context", cmplPath, `{"model":"t","prompt":"` + strings.Repeat("a", 63) + `"}`},
		{"max_tokens at cap", chatPath, chatJSON(`,"max_tokens":512`)},
		{"max_tokens 1", chatPath, chatJSON(`,"max_tokens":1`)},
		{"max_completion_tokens", chatPath, chatJSON(`,"max_completion_tokens":7`)},
		{"nulls everywhere", chatPath, chatJSON(`,"max_tokens":null,"temperature":null,"top_p":null,"stop":null,"logprobs":null,"n":null,"stream_options":null,"seed":null,"logit_bias":null,"timeout":null`)},
		{"temperature bounds", chatPath, chatJSON(`,"temperature":0`)},
		{"temperature 2", chatPath, chatJSON(`,"temperature":2`)},
		{"top_p 1", chatPath, chatJSON(`,"top_p":1`)},
		{"top_p tiny", chatPath, chatJSON(`,"top_p":1e-9`)},
		{"top_k -1", chatPath, chatJSON(`,"top_k":-1`)},
		{"top_k 0", chatPath, chatJSON(`,"top_k":0`)},
		{"top_k 40", chatPath, chatJSON(`,"top_k":40`)},
		{"min_p bounds", chatPath, chatJSON(`,"min_p":0`)},
		{"min_p 1", chatPath, chatJSON(`,"min_p":1`)},
		{"penalties bounds", chatPath, chatJSON(`,"presence_penalty":-2,"frequency_penalty":2`)},
		{"repetition_penalty 10", chatPath, chatJSON(`,"repetition_penalty":10`)},
		{"logit_bias bounds", chatPath, chatJSON(`,"logit_bias":{"0":-100,"999":100,"+5":1,"007":2}`)},
		{"stop string", chatPath, chatJSON(`,"stop":"\n"`)},
		{"stop empty", chatPath, chatJSON(`,"stop":""`)},
		{"stop eight", cmplPath, cmplJSON(`,"stop":` + eightStops)},
		{"stop with empties", cmplPath, cmplJSON(`,"stop":["","","","","","","","","a"]`)},
		{"n 1", chatPath, chatJSON(`,"n":1`)},
		{"logprobs false", chatPath, chatJSON(`,"logprobs":false`)},
		{"logprobs 0", cmplPath, cmplJSON(`,"logprobs":0`)},
		{"top_logprobs 0", chatPath, chatJSON(`,"top_logprobs":0`)},
		{"logprobs true", chatPath, chatJSON(`,"logprobs":true,"top_logprobs":20`)},
		{"logprobs 20", cmplPath, cmplJSON(`,"logprobs":20`)},
		{"echo false", cmplPath, cmplJSON(`,"echo":false,"suffix":""`)},
		{"seed", chatPath, chatJSON(`,"seed":-9223372036854775808`)},
		{"ignore_eos", chatPath, chatJSON(`,"ignore_eos":true`)},
		{"timeout large", chatPath, chatJSON(`,"timeout":1e12`)},
		{"timeout huge", cmplPath, cmplJSON(`,"timeout":1e300`)},
		{"timeout fraction", cmplPath, cmplJSON(`,"timeout":30.5`)},
		{"whitespace around body", chatPath, " \n\t" + chatJSON(``) + " \r\n"},
		{"unicode", chatPath, `{"model":"t","messages":[{"role":"user","content":"h\u00e9\u4e16 \ud83d\ude00 \u0000"}]}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := h.do("POST", c.path, c.body)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
		})
	}
}

func TestBodyTooLarge(t *testing.T) {
	h := newHarness(t, func(c *harnessConfig) { c.api.MaxBodyBytes = 1000 })
	pad := strings.Repeat("x", 1000)
	for _, path := range []string{chatPath, cmplPath} {
		resp, body := h.do("POST", path, `{"model":"t","foo":"`+pad+`"}`)
		h.expectError(t, resp, body, apiErr{status: 413, typ: "invalid_request_error", code: "request_too_large", msg: "request body exceeds 1000 bytes"})
	}
	// Exactly at the limit is fine.
	b := chatJSON(`,"foo":"`)
	b = chatJSON(`,"foo":"` + strings.Repeat("x", 1000-len(b)-1) + `"`)
	if len(b) != 1000 {
		t.Fatalf("test body is %d bytes", len(b))
	}
	if resp, body := h.do("POST", chatPath, b); resp.StatusCode != 200 {
		t.Errorf("body of exactly MaxBodyBytes: status %d: %s", resp.StatusCode, body)
	}
}

func TestAPIKey(t *testing.T) {
	for _, protect := range []bool{false, true} {
		t.Run(fmt.Sprintf("ProtectOps=%v", protect), func(t *testing.T) {
			h := newHarness(t, func(c *harnessConfig) { c.api.APIKey, c.api.ProtectOps = "sekret", protect })
			unauth := apiErr{status: 401, typ: "authentication_error", code: "invalid_api_key", msg: "missing or invalid API key"}
			for _, hdr := range [][]string{
				nil,
				{"Authorization", "Bearer wrong"},
				{"Authorization", "Bearer sekret2"},
				{"Authorization", "Bearer "},
				{"Authorization", "sekret"},
				{"Authorization", "Basic c2VrcmV0"},
				{"X-Api-Key", "sekret"},
			} {
				for _, rt := range []struct{ method, path, body string }{
					{"POST", chatPath, chatJSON(``)},
					{"POST", cmplPath, cmplJSON(``)},
					{"GET", "/v1/models", ""},
					{"GET", "/v1/nope", ""},
					{"GET", chatPath, ""},
				} {
					resp, body := h.do(rt.method, rt.path, rt.body, hdr...)
					t.Run(fmt.Sprintf("%s %s %q", rt.method, rt.path, hdr), func(t *testing.T) { h.expectError(t, resp, body, unauth) })
				}
			}
			for _, hdr := range [][]string{{"Authorization", "Bearer sekret"}, {"Authorization", "Bearer  sekret "}} {
				if resp, body := h.do("POST", chatPath, chatJSON(``), hdr...); resp.StatusCode != 200 {
					t.Errorf("with key %q: status %d: %s", hdr[1], resp.StatusCode, body)
				}
				if resp, body := h.do("GET", "/v1/models", "", hdr...); resp.StatusCode != 200 {
					t.Errorf("models with key: status %d: %s", resp.StatusCode, body)
				}
			}
			// Health and readiness stay open.
			if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 200 || !strings.Contains(string(body), `"ok"`) {
				t.Errorf("/health without key: %d %s", resp.StatusCode, body)
			}
			if resp, body := h.do("GET", "/ready", ""); resp.StatusCode != 200 {
				t.Errorf("/ready without key: %d %s", resp.StatusCode, body)
			}
			h.ops.ready.Store(false)
			if resp, body := h.do("GET", "/ready", ""); resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "1" {
				t.Errorf("/ready not ready: %d %s", resp.StatusCode, body)
			}
			// Ops endpoints: protected only with ProtectOps.
			for _, p := range []string{"/metrics", "/stats"} {
				resp, body := h.do("GET", p, "")
				if protect {
					t.Run(p, func(t *testing.T) { h.expectError(t, resp, body, unauth) })
				} else if resp.StatusCode != 200 {
					t.Errorf("%s without key, ProtectOps off: %d", p, resp.StatusCode)
				}
				if resp, _ := h.do("GET", p, "", "Authorization", "Bearer sekret"); resp.StatusCode != 200 {
					t.Errorf("%s with key: %d", p, resp.StatusCode)
				}
			}
		})
	}
}

func TestProtectOpsWithoutKey(t *testing.T) {
	// ProtectOps without an API key protects nothing (there is no key).
	h := newHarness(t, func(c *harnessConfig) { c.api.ProtectOps = true })
	for _, p := range []string{"/metrics", "/stats", "/health", "/ready", "/v1/models"} {
		if resp, body := h.do("GET", p, ""); resp.StatusCode != 200 {
			t.Errorf("%s: %d %s", p, resp.StatusCode, body)
		}
	}
}

func TestRoutes(t *testing.T) {
	h := newHarness(t)
	notFound := func(m, p string) apiErr {
		return apiErr{status: 404, typ: "invalid_request_error", code: "not_found", msg: "no route for " + m + " " + p}
	}
	notAllowed := func(m, p, allow string) apiErr {
		return apiErr{status: 405, typ: "invalid_request_error", code: "method_not_allowed", msg: m + " is not allowed on " + p, allow: allow}
	}
	cases := []struct {
		method, path string
		want         apiErr
	}{
		{"GET", "/v1/nope", notFound("GET", "/v1/nope")},
		{"POST", "/v1/embeddings", notFound("POST", "/v1/embeddings")},
		{"POST", "/v1/chat/completions/", notFound("POST", "/v1/chat/completions/")},
		{"GET", "/v1/", notFound("GET", "/v1/")},
		{"GET", chatPath, notAllowed("GET", chatPath, "POST")},
		{"PUT", cmplPath, notAllowed("PUT", cmplPath, "POST")},
		{"DELETE", chatPath, notAllowed("DELETE", chatPath, "POST")},
		{"POST", "/v1/models", notAllowed("POST", "/v1/models", "GET, HEAD")},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			resp, body := h.do(c.method, c.path, "")
			h.expectError(t, resp, body, c.want)
		})
	}
	resp, body := h.do("GET", "/v1/models", "")
	if resp.StatusCode != 200 {
		t.Fatalf("/v1/models: %d %s", resp.StatusCode, body)
	}
	for _, s := range []string{`"object":"list"`, `"id":"t"`, `"id":"/m/tiny"`, `"owned_by":"krserve"`} {
		if !strings.Contains(string(body), s) {
			t.Errorf("/v1/models body %s lacks %s", body, s)
		}
	}
}

func TestNotReady(t *testing.T) {
	h := newHarness(t, func(c *harnessConfig) { c.hello = nil })
	want := apiErr{status: 503, typ: "server_error", code: "not_ready", msg: "no worker has loaded the model yet", retryAfter: "1"}
	for _, c := range []struct{ path, body string }{{chatPath, chatJSON(``)}, {cmplPath, cmplJSON(``)}} {
		resp, body := h.do("POST", c.path, c.body)
		h.expectError(t, resp, body, want)
	}
	// Only the served name is known before the first hello.
	resp, body := h.do("POST", chatPath, `{"model":"/m/tiny","messages":[{"role":"user","content":"hi"}]}`)
	h.expectError(t, resp, body, apiErr{status: 404, typ: "invalid_request_error", code: "model_not_found", param: "model", msg: "not served here"})
}

// TestNoWorker: with every worker given up, a request is refused at once
// (503, Retry-After) instead of waiting in the queue for its timeout; it is
// served again once a worker may serve.
func TestNoWorker(t *testing.T) {
	h := newHarness(t)
	h.pool.setNoServe(true)
	want := apiErr{status: 503, typ: "server_error", code: "no_worker", msg: "no worker is available right now", retryAfter: "1"}
	for _, c := range []struct{ path, body string }{{chatPath, chatJSON(``)}, {cmplPath, cmplJSON(``)}, {cmplPath, `{"model":"t","prompt":[5,6]}`}} {
		resp, body := h.do("POST", c.path, c.body)
		h.expectError(t, resp, body, want)
	}
	h.pool.setNoServe(false)
	if resp, body := h.do("POST", chatPath, chatJSON(``)); resp.StatusCode != 200 {
		t.Fatalf("after a worker is back: %d %s", resp.StatusCode, body)
	}
}

// TestTooManyConnections: the (MaxConcurrent+1)th request in flight is refused
// with 429 and Retry-After, and a slot frees when a request ends.
func TestTooManyConnections(t *testing.T) {
	hold := make(chan struct{})
	gen := make(chan uint64, 10)
	h := newHarness(t, func(c *harnessConfig) {
		c.api.MaxConcurrent = 2
		c.workers = []workerConfig{{tokens: 3, hold: hold, onGen: func(m *ipc.Message) { gen <- m.ID }}}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A held stream sends nothing before its first token, so the client
	// waits for the response in a goroutine; the worker's gen says when the
	// request is being served.
	resps := make(chan doResult, 2)
	for range 2 {
		go func() {
			resp, err := h.client.Do(h.newRequest(ctx, "POST", chatPath, chatJSON(`,"stream":true`)))
			resps <- doResult{resp, err}
		}()
		<-gen
	}
	want := apiErr{status: 429, typ: "rate_limit_error", code: "too_many_connections", msg: "more than 2 requests are being served", retryAfter: "1"}
	for _, c := range []struct{ method, path, body string }{{"POST", chatPath, chatJSON(``)}, {"POST", cmplPath, cmplJSON(``)}, {"GET", "/v1/models", ""}} {
		resp, body := h.do(c.method, c.path, c.body)
		h.expectError(t, resp, body, want)
	}
	// Ops endpoints are not counted.
	if resp, _ := h.do("GET", "/health", ""); resp.StatusCode != 200 {
		t.Errorf("/health while full: %d", resp.StatusCode)
	}
	close(hold)
	for range 2 {
		r := <-resps
		if r.err != nil {
			t.Fatal(r.err)
		}
		defer r.resp.Body.Close()
		data, _, err := newSSEReader(t, r.resp.Body).readAll()
		if err != nil || len(data) == 0 || data[len(data)-1] != "[DONE]" {
			t.Fatalf("held stream: %v %q", err, data)
		}
	}
	// The slots are free again (the counter drops just after the body ends).
	if err := h.handlersDone(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if resp, body := h.do("POST", chatPath, chatJSON(``)); resp.StatusCode != 200 {
		t.Errorf("after the held requests ended: %d %s", resp.StatusCode, body)
	}
}

// TestSchedulerRefusals: queue full is 429 overloaded, draining is 503, both
// with Retry-After.
func TestSchedulerRefusals(t *testing.T) {
	t.Run("queue full", func(t *testing.T) {
		h := newHarness(t, func(c *harnessConfig) {
			c.sched.MaxQueue = 1
			c.workers = nil // nothing dispatches: the first request waits
		})
		ctx, cancel := context.WithCancel(context.Background())
		first := make(chan doResult, 1)
		go func() { // a queued stream sends nothing yet: wait for it aside
			resp, err := h.client.Do(h.newRequest(ctx, "POST", chatPath, chatJSON(`,"stream":true`)))
			first <- doResult{resp, err}
		}()
		if err := h.eventually(5*time.Second, "the first request is queued", func() bool { return h.sched.State().QueueRequests == 1 }); err != nil {
			t.Fatal(err)
		}
		want := apiErr{status: 429, typ: "rate_limit_error", code: "overloaded", msg: "queue is full (1 requests waiting)", retryAfter: "1"}
		for _, c := range []struct{ path, body string }{{chatPath, chatJSON(``)}, {cmplPath, cmplJSON(`,"stream":true`)}} {
			r2, body := h.do("POST", c.path, c.body)
			h.expectError(t, r2, body, want)
		}
		cancel()
		if r := <-first; r.err == nil {
			r.resp.Body.Close()
		}
		if err := h.idle(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("draining", func(t *testing.T) {
		h := newHarness(t)
		h.sched.Drain()
		want := apiErr{status: 503, typ: "server_error", code: "draining", msg: "server is shutting down", retryAfter: "1"}
		for _, c := range []struct{ path, body string }{{chatPath, chatJSON(``)}, {cmplPath, cmplJSON(`,"stream":true`)}} {
			resp, body := h.do("POST", c.path, c.body)
			h.expectError(t, resp, body, want)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		hold := make(chan struct{})
		defer close(hold)
		h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{tokens: 3, hold: hold}} })
		resp, body := h.do("POST", cmplPath, cmplJSON(`,"timeout":0.02`))
		h.expectError(t, resp, body, apiErr{status: 504, typ: "timeout_error", code: "timeout", msg: "request timed out"})
		if err := h.idle(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		_, gens, cancels, _ := h.workers[0].snapshot()
		for id := range gens {
			if cancels[id] != 1 {
				t.Errorf("request %d: %d cancels", id, cancels[id])
			}
		}
	})
}

// TestParamsReachWorker: validated parameters arrive in the gen frame.
func TestParamsReachWorker(t *testing.T) {
	gens := make(chan ipc.Message, 1)
	h := newHarness(t, func(c *harnessConfig) {
		c.workers = []workerConfig{{tokens: 1, onGen: func(m *ipc.Message) { gens <- *m }}}
	})
	cases := []struct {
		name, path, body string
		check            func(m ipc.Message) string
	}{
		{"defaults", cmplPath, cmplJSON(``), func(m ipc.Message) string {
			if m.MaxTokens != 16 || m.Temperature != 1 || m.TopP != 0 || m.TopK != 0 || m.MinP != 0 || m.HasSeed || m.LogitBias != nil || m.Stop != nil || m.RepetitionPenalty != 0 {
				return "defaults wrong"
			}
			if m.Prompt != nil || m.Text != "hi" || !m.Special || m.Messages != nil {
				return fmt.Sprintf("prompt %v, text %q, special %v, messages %v", m.Prompt, m.Text, m.Special, m.Messages)
			}
			return ""
		}},
		{"tools and schema", chatPath, `{"model":"t","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_9","type":"function","function":{"name":"f","arguments":"{\"a\": 1}"}}]},{"role":"tool","tool_call_id":"call_9","content":"42"}],` +
			`"tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{ "type": "object" }}},{"type":"function","function":{"name":"g"}}],"tool_choice":{"type":"function","function":{"name":"g"}},"parallel_tool_calls":false,` +
			`"response_format":{"type":"json_schema","json_schema":{"name":"out","strict":true,"schema":{ "type": "object", "properties": {} }}}}`, func(m ipc.Message) string {
			if m.Tools != `[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object"}}},{"type":"function","function":{"name":"g"}}]` {
				return "tools " + m.Tools
			}
			if m.ToolChoice != "function" || m.ToolName != "g" || !m.OneCall || m.Schema != `{"type":"object","properties":{}}` {
				return fmt.Sprintf("choice %q name %q one %v schema %q", m.ToolChoice, m.ToolName, m.OneCall, m.Schema)
			}
			if len(m.Messages) != 3 || fmt.Sprint(m.Messages[1].ToolCalls) != `[{call_9 0 f {"a": 1}}]` || m.Messages[1].Content != "" || m.Messages[2].ToolCallID != "call_9" || m.Messages[2].Content != "42" {
				return fmt.Sprintf("messages %+v", m.Messages)
			}
			return ""
		}},
		{"json_object and tool_choice none", chatPath, chatJSON(`,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none","response_format":{"type":"json_object"}`), func(m ipc.Message) string {
			if m.ToolChoice != "none" || m.OneCall || m.Schema != `{"type":"object"}` {
				return fmt.Sprintf("choice %q one %v schema %q", m.ToolChoice, m.OneCall, m.Schema)
			}
			return ""
		}},
		{"all set", chatPath, chatJSON(`,"max_tokens":20,"temperature":0.5,"top_p":0.9,"top_k":40,"min_p":0.05,"seed":7,"presence_penalty":0.5,"frequency_penalty":-0.5,"repetition_penalty":1.1,"logit_bias":{"5":-1.5},"stop":["\n",""]`), func(m ipc.Message) string {
			if m.MaxTokens != 20 || m.Temperature != 0.5 || m.TopP != 0.9 || m.TopK != 40 || m.MinP != 0.05 || !m.HasSeed || m.Seed != 7 ||
				m.PresencePenalty != 0.5 || m.FrequencyPenalty != -0.5 || m.RepetitionPenalty != 1.1 || fmt.Sprint(m.LogitBias) != "map[5:-1.5]" || fmt.Sprintf("%q", m.Stop) != `["\n"]` {
				return fmt.Sprintf("%+v", m)
			}
			if m.Prompt != nil || m.Text != "" || m.Special || fmt.Sprint(m.Messages) != "[{user hi [] }]" {
				return fmt.Sprintf("prompt %v, text %q, special %v, messages %v", m.Prompt, m.Text, m.Special, m.Messages)
			}
			return ""
		}},
		{"off values", chatPath, chatJSON(`,"top_p":1,"top_k":-1,"repetition_penalty":1,"temperature":0`), func(m ipc.Message) string {
			if m.TopP != 0 || m.TopK != 0 || m.RepetitionPenalty != 0 || m.Temperature != 0 {
				return fmt.Sprintf("%+v", m)
			}
			return ""
		}},
		{"max_completion_tokens wins", chatPath, chatJSON(`,"max_tokens":5,"max_completion_tokens":9`), func(m ipc.Message) string {
			if m.MaxTokens != 9 {
				return fmt.Sprint("max_tokens ", m.MaxTokens)
			}
			return ""
		}},
		// Token ids are checked against the context here; a text prompt by
		// the worker, once tokenized.
		{"max_tokens clipped to the context", cmplPath, `{"model":"t","prompt":[` + strings.TrimSuffix(strings.Repeat("7,", 60), ",") + `],"max_tokens":500}`, func(m ipc.Message) string {
			if m.MaxTokens != 4 {
				return fmt.Sprint("max_tokens ", m.MaxTokens)
			}
			return ""
		}},
		{"max_tokens of a text prompt", cmplPath, `{"model":"t","prompt":"` + strings.Repeat("a", 60) + `","max_tokens":500}`, func(m ipc.Message) string {
			if m.MaxTokens != 500 {
				return fmt.Sprint("max_tokens ", m.MaxTokens)
			}
			return ""
		}},
		{"ignore_eos", cmplPath, cmplJSON(`,"ignore_eos":true,"logit_bias":{"7":3}`), func(m ipc.Message) string {
			if len(m.LogitBias) != 2 || m.LogitBias[2] > -1e8 || m.LogitBias[7] != 3 {
				return fmt.Sprint(m.LogitBias)
			}
			return ""
		}},
		{"token ids", cmplPath, `{"model":"t","prompt":[5,6,999,0]}`, func(m ipc.Message) string {
			if fmt.Sprint(m.Prompt) != "[5 6 999 0]" {
				return fmt.Sprint(m.Prompt)
			}
			return ""
		}},
		{"text parts joined", chatPath, `{"model":"t","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}`, func(m ipc.Message) string {
			if fmt.Sprint(m.Messages) != "[{user ab [] }]" {
				return fmt.Sprint(m.Messages)
			}
			return ""
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := h.do("POST", c.path, c.body)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d %s", resp.StatusCode, body)
			}
			if msg := c.check(<-gens); msg != "" {
				t.Error(msg)
			}
		})
	}
}

// TestLogitBiasDuplicateIDs: "5" and "05" name the same token; which bias won
// depended on map iteration order. Such a request is refused.
func TestLogitBiasDuplicateIDs(t *testing.T) {
	h := newHarness(t)
	for _, lb := range []string{`{"5":10,"05":-10}`, `{"5":1,"+5":1}`, `{"0":1,"-0":1}`} {
		resp, body := h.do("POST", chatPath, chatJSON(`,"logit_bias":`+lb))
		h.expectError(t, resp, body, badRequest("logit_bias", "logit_bias names token"))
	}
}
