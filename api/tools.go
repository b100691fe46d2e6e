package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"

	"github.com/krserve/krserve/ipc"
)

// Structured output (response_format) and tool calling (tools, tool_choice,
// parallel_tool_calls): what the front door can decide is checked here, the
// rest (a schema llguidance cannot compile, the chat template) by the worker,
// whose refusal is a 400 as well.

// maxTools is OpenAI's limit on tools per request.
const maxTools = 128

// functionName is OpenAI's rule for function and json_schema names.
var functionName = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
		Strict *bool           `json:"strict"`
	} `json:"json_schema"`
}

// parseResponseFormat returns the JSON Schema text the output must match
// ("" for free text). json_object is any JSON object.
func parseResponseFormat(r json.RawMessage) (string, *apiError) {
	if isNull(r) {
		return "", nil
	}
	var f responseFormat
	if err := json.Unmarshal(r, &f); err != nil {
		return "", invalid("response_format", "response_format must be an object {type: text | json_object | json_schema}: %v", err)
	}
	switch f.Type {
	case "text":
		return "", nil
	case "json_object":
		return `{"type":"object"}`, nil
	case "json_schema":
		js := f.JSONSchema
		if js == nil {
			return "", invalid("response_format.json_schema", "response_format of type json_schema needs json_schema: {name, schema}")
		}
		if !functionName.MatchString(js.Name) {
			return "", invalid("response_format.json_schema.name", "response_format.json_schema.name must be 1 to 64 letters, digits, _ or -; got %q", js.Name)
		}
		if isNull(js.Schema) {
			return `{"type":"object"}`, nil
		}
		s, e := compactObject(js.Schema, "response_format.json_schema.schema")
		return s, e
	case "":
		return "", invalid("response_format.type", "response_format needs a type: text, json_object or json_schema")
	default:
		return "", invalid("response_format.type", "response_format.type %q is not supported (use text, json_object or json_schema)", f.Type)
	}
}

// compactObject returns the JSON object r as compact text.
func compactObject(r json.RawMessage, param string) (string, *apiError) {
	t := bytes.TrimSpace(r)
	if len(t) == 0 || t[0] != '{' {
		return "", invalid(param, "%s must be a JSON object (a JSON Schema)", param)
	}
	var b bytes.Buffer
	if err := json.Compact(&b, t); err != nil {
		return "", invalid(param, "%s is not valid JSON: %v", param, err)
	}
	return b.String(), nil
}

type toolDef struct {
	Type     string `json:"type"`
	Function *struct {
		Name        string          `json:"name"`
		Description string          `json:"description,omitempty"`
		Parameters  json.RawMessage `json:"parameters,omitempty"`
		Strict      *bool           `json:"strict,omitempty"`
	} `json:"function"`
}

// toolSpec is a chat request's tool settings, as the worker gets them.
type toolSpec struct {
	Tools   string // JSON text of the tools array ("" without tools)
	Choice  string // auto, none, required, function
	Name    string // with Choice function
	OneCall bool
}

// parseTools validates tools, tool_choice and parallel_tool_calls.
func parseTools(toolsRaw, choiceRaw json.RawMessage, parallel *bool) (toolSpec, *apiError) {
	var ts toolSpec
	var tools []toolDef
	if !isNull(toolsRaw) {
		if err := json.Unmarshal(toolsRaw, &tools); err != nil {
			return ts, invalid("tools", "tools must be an array of {type: function, function: {name, description, parameters}}: %v", err)
		}
		if len(tools) > maxTools {
			return ts, invalid("tools", "at most %d tools are allowed; got %d", maxTools, len(tools))
		}
	}
	names := map[string]bool{}
	for i, t := range tools {
		p := fmt.Sprintf("tools[%d]", i)
		if t.Type != "function" {
			return ts, invalid(p+".type", "%s.type must be \"function\"; got %q", p, t.Type)
		}
		if t.Function == nil {
			return ts, invalid(p+".function", "%s needs a function: {name, description, parameters}", p)
		}
		if !functionName.MatchString(t.Function.Name) {
			return ts, invalid(p+".function.name", "%s.function.name must be 1 to 64 letters, digits, _ or -; got %q", p, t.Function.Name)
		}
		if names[t.Function.Name] {
			return ts, invalid(p+".function.name", "two tools are named %q", t.Function.Name)
		}
		names[t.Function.Name] = true
		if !isNull(t.Function.Parameters) {
			s, e := compactObject(t.Function.Parameters, p+".function.parameters")
			if e != nil {
				return ts, e
			}
			t.Function.Parameters = json.RawMessage(s)
		} else {
			t.Function.Parameters = nil
		}
	}
	if len(tools) > 0 {
		b, err := json.Marshal(tools)
		if err != nil {
			return ts, invalid("tools", "tools: %v", err)
		}
		ts.Tools = string(b)
	}
	if parallel != nil && len(tools) > 0 { // without tools it means nothing (clients send it anyway)
		ts.OneCall = !*parallel
	}
	ts.Choice = "auto"
	if isNull(choiceRaw) {
		if len(tools) == 0 {
			ts.Choice = ""
		}
		return ts, nil
	}
	var mode string
	if err := json.Unmarshal(choiceRaw, &mode); err == nil {
		switch mode {
		case "none", "auto", "required":
		default:
			return ts, invalid("tool_choice", "tool_choice must be none, auto, required or {type: function, function: {name}}; got %q", mode)
		}
		if len(tools) == 0 {
			if mode == "required" {
				return ts, invalid("tool_choice", "tool_choice \"required\" needs tools")
			}
			ts.Choice = ""
			return ts, nil
		}
		ts.Choice = mode
		return ts, nil
	}
	var named struct {
		Type     string `json:"type"`
		Function *struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal(choiceRaw, &named); err != nil || named.Type != "function" || named.Function == nil {
		return ts, invalid("tool_choice", "tool_choice must be none, auto, required or {type: function, function: {name}}")
	}
	if !names[named.Function.Name] {
		return ts, invalid("tool_choice", "tool_choice names function %q, which is not in tools", named.Function.Name)
	}
	ts.Choice, ts.Name = "function", named.Function.Name
	return ts, nil
}

// inToolCall is a tool call in an assistant message of the history.
type inToolCall struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// historyCalls converts an assistant message's tool calls for the worker.
// Arguments are a JSON string (OpenAI) or, leniently, an object.
func historyCalls(i int, calls []inToolCall) ([]ipc.ToolCall, *apiError) {
	out := make([]ipc.ToolCall, len(calls))
	for j, c := range calls {
		p := fmt.Sprintf("messages[%d].tool_calls[%d]", i, j)
		if c.Type != "" && c.Type != "function" {
			return nil, invalid(p+".type", "%s.type must be \"function\"; got %q", p, c.Type)
		}
		if c.Function.Name == "" {
			return nil, invalid(p+".function.name", "%s has no function name", p)
		}
		args := ""
		a := bytes.TrimSpace(c.Function.Arguments)
		switch {
		case isNull(a):
		case a[0] == '"':
			if err := json.Unmarshal(a, &args); err != nil {
				return nil, invalid(p+".function.arguments", "%s.function.arguments must be a JSON string", p)
			}
		case a[0] == '{':
			var b bytes.Buffer
			if err := json.Compact(&b, a); err != nil {
				return nil, invalid(p+".function.arguments", "%s.function.arguments is not valid JSON", p)
			}
			args = b.String()
		default:
			return nil, invalid(p+".function.arguments", "%s.function.arguments must be a JSON string", p)
		}
		out[j] = ipc.ToolCall{ID: c.ID, Name: c.Function.Name, Arguments: args}
	}
	return out, nil
}

// outToolCall is a tool call in a response: message.tool_calls, or a
// delta.tool_calls entry (with Index; the first chunk of a call carries id,
// type and name, later ones only arguments).
type outToolCall struct {
	Index    *int         `json:"index,omitempty"`
	ID       string       `json:"id,omitempty"`
	Type     string       `json:"type,omitempty"`
	Function outToolCallF `json:"function"`
}

type outToolCallF struct {
	Name      string  `json:"name,omitempty"`
	Arguments *string `json:"arguments,omitempty"`
}

// callID names call n of request id: unique per request and across requests.
func callID(reqID uint64, n int) string { return fmt.Sprintf("call_%x_%d", reqID, n) }
