package api

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

const toolsJSON = `"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}},{"type":"function","function":{"name":"g"}}]`

// TestToolCallsResponse: calls the worker parsed come back in OpenAI's shape,
// with unique ids, content beside them and finish_reason tool_calls.
func TestToolCallsResponse(t *testing.T) {
	h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{tokens: 4}} })
	resp, body := h.do("POST", chatPath, chatJSON(`,`+toolsJSON+`,"tool_choice":{"type":"function","function":{"name":"g"}}`))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d %s", resp.StatusCode, body)
	}
	var out struct {
		Choices []struct {
			Message struct {
				Role      string  `json:"role"`
				Content   *string `json:"content"`
				ToolCalls []struct {
					ID       string `json:"id"`
					Type     string `json:"type"`
					Function struct {
						Name      string `json:"name"`
						Arguments string `json:"arguments"`
					} `json:"function"`
				} `json:"tool_calls"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	c := out.Choices[0]
	if c.FinishReason != "tool_calls" || c.Message.Content == nil || *c.Message.Content != "w0 w2 " || len(c.Message.ToolCalls) != 2 {
		t.Fatalf("%s", body)
	}
	for i, tc := range c.Message.ToolCalls {
		if tc.Type != "function" || tc.Function.Name != "g" || tc.Function.Arguments != fmt.Sprintf(`{"i":%d}`, 2*i+1) || !strings.HasPrefix(tc.ID, "call_") {
			t.Errorf("call %d: %+v", i, tc)
		}
	}
	if c.Message.ToolCalls[0].ID == c.Message.ToolCalls[1].ID {
		t.Errorf("ids repeat: %s", body)
	}
	// Without tool calls the finish reason stays stop, and content is a string.
	_, body = h.do("POST", chatPath, chatJSON(`,`+toolsJSON+`,"tool_choice":"none"`))
	if !strings.Contains(string(body), `"content":"w0 w1 w2 w3 "`) || !strings.Contains(string(body), `"finish_reason":"stop"`) || strings.Contains(string(body), "tool_calls") {
		t.Errorf("tool_choice none: %s", body)
	}
}

// TestToolCallsStream: each call's id, type and name are sent once, in its
// first chunk with arguments "" (the client concatenates strings), then its
// arguments in fragments under the same index.
func TestToolCallsStream(t *testing.T) {
	h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{tokens: 4}} })
	resp, body := h.do("POST", chatPath, chatJSON(`,"stream":true,`+toolsJSON+`,"tool_choice":"required"`))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d %s", resp.StatusCode, body)
	}
	type call struct{ id, typ, name, args string }
	calls := map[int]*call{}
	ids, names, frags, roles := map[int]int{}, map[int]int{}, map[int]int{}, 0
	finish := ""
	for _, line := range strings.Split(string(body), "\n") {
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var ch struct {
			Choices []struct {
				Delta        map[string]json.RawMessage `json:"delta"`
				FinishReason *string                    `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &ch); err != nil {
			t.Fatal(err)
		}
		if len(ch.Choices) == 0 {
			continue
		}
		d := ch.Choices[0].Delta
		if _, ok := d["role"]; ok {
			roles++
		}
		if ch.Choices[0].FinishReason != nil {
			finish = *ch.Choices[0].FinishReason
		}
		var tcs []struct {
			Index    *int    `json:"index"`
			ID       *string `json:"id"`
			Type     *string `json:"type"`
			Function struct {
				Name      *string `json:"name"`
				Arguments *string `json:"arguments"`
			} `json:"function"`
		}
		if raw, ok := d["tool_calls"]; ok {
			if err := json.Unmarshal(raw, &tcs); err != nil {
				t.Fatal(err)
			}
		}
		for _, tc := range tcs {
			if tc.Index == nil {
				t.Fatalf("tool call delta without index: %s", data)
			}
			c := calls[*tc.Index]
			if c == nil {
				c = &call{}
				calls[*tc.Index] = c
			}
			if tc.ID != nil {
				ids[*tc.Index]++
				c.id += *tc.ID
			}
			if tc.Type != nil {
				c.typ += *tc.Type
			}
			if tc.Function.Name != nil {
				names[*tc.Index]++
				c.name += *tc.Function.Name
			}
			if tc.Function.Arguments != nil {
				if tc.ID != nil && *tc.Function.Arguments != "" {
					t.Errorf("a call's header carries arguments %q: %s", *tc.Function.Arguments, data)
				}
				if tc.ID == nil {
					if tc.Function.Name != nil || tc.Type != nil {
						t.Errorf("a fragment repeats name or type: %s", data)
					}
					frags[*tc.Index]++
				}
				c.args += *tc.Function.Arguments
			}
		}
	}
	if roles != 1 || finish != "tool_calls" || len(calls) != 2 {
		t.Fatalf("roles %d, finish %q, %d calls:\n%s", roles, finish, len(calls), body)
	}
	for i := range 2 {
		c := calls[i]
		if ids[i] != 1 || names[i] != 1 || frags[i] != 2 || c.typ != "function" || c.name != "f" || c.args != fmt.Sprintf(`{"i":%d}`, 2*i+1) ||
			!strings.HasPrefix(c.id, "call_") || !strings.HasSuffix(c.id, fmt.Sprintf("_%d", i)) {
			t.Errorf("call %d: %+v (id sent %d times, name %d times, %d arguments fragments)", i, c, ids[i], names[i], frags[i])
		}
	}
}

// TestFinishReason: tool_calls only when the model stopped after calls and
// none was cut short; otherwise the reason the worker gave.
func TestFinishReason(t *testing.T) {
	for _, c := range []struct {
		reason string
		calls  int
		cut    bool
		want   string
	}{
		{"stop", 0, false, "stop"},
		{"stop", 1, false, "tool_calls"},
		{"stop", 3, false, "tool_calls"},
		{"stop", 1, true, "stop"}, // a stop string cut the last call
		{"stop", 0, true, "stop"}, // cut before the call's name was out: no call reported
		{"length", 2, false, "length"},
		{"length", 1, true, "length"}, // max_tokens cut the call
		{"length", 0, false, "length"},
	} {
		if got := finishReason(c.reason, c.calls, c.cut); got != c.want {
			t.Errorf("finishReason(%q, %d, %v) = %q, want %q", c.reason, c.calls, c.cut, got, c.want)
		}
	}
}

// TestCutToolCallFinishReason: a done that says the last call was cut short
// keeps finish_reason stop, streamed and not, with the calls as far as they
// were generated; the same output without the flag is tool_calls.
func TestCutToolCallFinishReason(t *testing.T) {
	for _, cut := range []bool{true, false} {
		want := map[bool]string{true: "stop", false: "tool_calls"}[cut]
		h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{tokens: 4, cutCall: cut}} })
		_, body := h.do("POST", chatPath, chatJSON(`,`+toolsJSON+`,"tool_choice":"required"`))
		var out struct {
			Choices []struct {
				Message struct {
					ToolCalls []json.RawMessage `json:"tool_calls"`
				} `json:"message"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(body, &out); err != nil {
			t.Fatal(err)
		}
		if c := out.Choices[0]; c.FinishReason != want || len(c.Message.ToolCalls) != 2 {
			t.Errorf("cut %v: %s", cut, body)
		}
		_, body = h.do("POST", chatPath, chatJSON(`,"stream":true,`+toolsJSON+`,"tool_choice":"required"`))
		if !strings.Contains(string(body), `"finish_reason":"`+want+`"`) || !strings.Contains(string(body), `"tool_calls"`) {
			t.Errorf("cut %v, streamed: %s", cut, body)
		}
	}
}
