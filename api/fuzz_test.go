package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// Fuzzing feeds arbitrary bodies to the real handler (real scheduler, fake
// worker) and checks the invariants every answer must keep:
//   - no panic;
//   - the status is one a client can get for its own input: 200, 400, 404
//     (unknown model), 413 or 504 (a tiny "timeout");
//   - every non-200 answer is exactly an OpenAI error object, as JSON;
//   - a 200 is either one JSON completion object or an SSE stream of JSON
//     chunks that ends with [DONE];
//   - afterwards nothing is queued or running;
//   - fuzzOracle: what an independent reading of the body implies (one JSON
//     value or invalid_json; an error param names a field of the request;
//     stream and model are honoured; only a short timeout times out).
//
// The seed corpus is in testdata/fuzz/<FuzzName>/ (plain `go test` runs it).

var fuzzStatuses = map[int]bool{200: true, 400: true, 404: true, 413: true, 504: true}

func fuzzHarness(f *testing.F) *harness {
	return newHarness(f, func(c *harnessConfig) {
		c.api.MaxBodyBytes = 1 << 16
		// Bounds the cost of an input that blocks (magicWorkerSilent).
		c.api.DefaultTimeout, c.api.MaxTimeout = time.Second, time.Second
	})
}

func FuzzChatRequest(f *testing.F) {
	for _, s := range []string{
		chatJSON(``),
		chatJSON(`,"stream":true,"stream_options":{"include_usage":true}`),
		`{"model":"t","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"max_tokens":2,"temperature":0.5,"top_p":0.9,"top_k":-1,"min_p":0.1,"stop":["x"],"seed":1,"logit_bias":{"5":1},"timeout":1e-9}`,
		`{"model":"/m/tiny","messages":[{"role":"system","content":"s"},{"role":"assistant","content":null}]}`,
	} {
		f.Add([]byte(s))
	}
	h := fuzzHarness(f)
	f.Fuzz(func(t *testing.T, body []byte) { fuzzOne(t, h, chatPath, body) })
}

func FuzzCompletionRequest(f *testing.F) {
	for _, s := range []string{
		cmplJSON(``),
		cmplJSON(`,"stream":true`),
		`{"model":"t","prompt":[1,2,3.0,1e2],"max_completion_tokens":1,"echo":false,"suffix":null}`,
		`{"model":"t","prompt":["a"],"stop":"","n":1,"logprobs":0,"timeout":3}`,
	} {
		f.Add([]byte(s))
	}
	h := fuzzHarness(f)
	f.Fuzz(func(t *testing.T, body []byte) { fuzzOne(t, h, cmplPath, body) })
}

// FuzzRequestField sets one field of a valid request to an arbitrary raw
// JSON value: the byte-level mutator rarely keeps a whole body valid, so
// this one reaches the per-field validation more often.
func FuzzRequestField(f *testing.F) {
	for _, s := range []struct {
		chat       bool
		name, json string
	}{
		{true, "max_tokens", "0"}, {false, "max_tokens", "1e3"}, {true, "max_completion_tokens", "-1"},
		{true, "temperature", "2.0000001"}, {false, "top_p", "1e-320"}, {true, "top_k", "-1"},
		{true, "min_p", "1"}, {false, "presence_penalty", "-2"}, {true, "frequency_penalty", "2.5"},
		{true, "repetition_penalty", "1e-300"}, {false, "logit_bias", `{"999":-100,"0":1e2}`},
		{true, "stop", `["\u0000",""]`}, {false, "seed", "-9223372036854775808"}, {true, "n", "1"},
		{true, "logprobs", "false"}, {false, "top_logprobs", "0"}, {true, "stream", "true"},
		{true, "stream_options", `{"include_usage":true}`}, {false, "timeout", "1e-7"}, {true, "ignore_eos", "true"},
		{false, "echo", "false"}, {false, "suffix", `""`}, {true, "user", `"x"`}, {false, "prompt", "[1,2,3]"},
		{true, "messages", `[{"role":"assistant","content":[]}]`}, {true, "model", `"/m/tiny"`}, {false, "MODEL", `"x"`},
	} {
		f.Add(s.chat, s.name, s.json)
	}
	h := fuzzHarness(f)
	f.Fuzz(func(t *testing.T, chat bool, name, raw string) {
		key, _ := json.Marshal(name)
		path, body := cmplPath, `{"model":"t","prompt":"hi",`+string(key)+`:`+raw+`}`
		if chat {
			path, body = chatPath, `{"model":"t","messages":[{"role":"user","content":"hi"}],`+string(key)+`:`+raw+`}`
		}
		fuzzOne(t, h, path, []byte(body))
	})
}

var fuzzMu sync.Mutex // one request at a time per harness, as the checks assume

func fuzzOne(t *testing.T, h *harness, path string, body []byte) {
	fuzzMu.Lock()
	defer fuzzMu.Unlock()
	req := httptest.NewRequest("POST", path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	start := time.Now()
	h.handler.ServeHTTP(rec, req)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("%v for %q: %s", d, body, rec.Body.Bytes())
	}
	res := rec.Result()
	out := rec.Body.Bytes()
	if !fuzzStatuses[res.StatusCode] && !fakeFailure(res.StatusCode, out) {
		t.Fatalf("status %d for %q: %s", res.StatusCode, body, out)
	}
	ct := res.Header.Get("Content-Type")
	switch {
	case res.StatusCode != 200:
		if ct != "application/json" {
			t.Fatalf("status %d with Content-Type %q", res.StatusCode, ct)
		}
		if _, _, _, _, err := checkErrorBody(out); err != nil {
			t.Fatalf("status %d for %q: %v", res.StatusCode, body, err)
		}
	case ct == "text/event-stream":
		if err := checkStreamBody(out); err != nil {
			t.Fatalf("stream for %q: %v\n%s", body, err, out)
		}
	case ct == "application/json":
		if err := checkCompletionBody(out); err != nil {
			t.Fatalf("200 for %q: %v", body, err)
		}
	default:
		t.Fatalf("200 with Content-Type %q: %s", ct, out)
	}
	if err := fuzzOracle(path, body, res.StatusCode, ct, out); err != nil {
		t.Fatalf("%s %q -> %d: %v\n%s", path, body, res.StatusCode, err, out)
	}
	if err := h.idle(5 * time.Second); err != nil {
		t.Fatalf("after %q: %v", body, err)
	}
}

// fuzzOracle checks the answer against what an independent reading of the
// body says it must be.
func fuzzOracle(path string, body []byte, status int, ct string, out []byte) error {
	// Exactly one JSON value, then only whitespace: otherwise invalid_json.
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	oneValue := dec.Decode(&v) == nil
	if oneValue {
		_, err := dec.Token()
		oneValue = err == io.EOF
	}
	if !oneValue {
		if _, code, _, _, err := checkErrorBody(out); status != 400 || err != nil || code != "invalid_json" {
			return fmt.Errorf("body is not one JSON value: want 400 invalid_json")
		}
		return nil
	}
	obj, isObj := v.(map[string]any)
	// field returns the value encoding/json gives a field (keys match
	// case-insensitively); ok is false when absent or ambiguous.
	field := func(name string) (val any, present, ok bool) {
		n := 0
		for k, x := range obj {
			if strings.EqualFold(k, name) {
				val, n = x, n+1
			}
		}
		return val, n > 0, n == 1
	}
	if status != 200 && !fakeFailure(status, out) {
		_, _, param, _, _ := checkErrorBody(out)
		if param != "" && isObj {
			// The param names a field the request has, or a required one.
			root, _, _ := strings.Cut(param, ".")
			root, _, _ = strings.Cut(root, "[")
			required := map[string]bool{"model": true, "messages": path == chatPath, "prompt": path == cmplPath}
			if _, present, _ := field(root); !present && !required[root] {
				return fmt.Errorf("error param %q names no field of the request", param)
			}
		}
	}
	if status == 200 && isObj {
		stream, _, ok := field("stream")
		if ok && (stream == true) != (ct == "text/event-stream") {
			return fmt.Errorf("stream %v answered with %s", stream, ct)
		}
		if model, _, ok := field("model"); ok {
			if !bytes.Contains(out, []byte(fmt.Sprintf(`"model":%q`, model))) && !bytes.Contains(out, []byte(`"model":`+mustJSON(model))) {
				return fmt.Errorf("model %q not echoed", model)
			}
		}
	}
	// Nothing here can take a second: only a short timeout may time out.
	if isObj && !bytes.Contains(body, []byte(magicWorkerSilent)) {
		timedOut := status == 504 || (status == 200 && bytes.Contains(out, []byte(`"code":"timeout"`)))
		to, present, ok := field("timeout")
		short := present && (!ok || func() bool {
			n, isNum := to.(json.Number)
			f, err := n.Float64()
			return !isNum || err != nil || f < 0.5
		}())
		if timedOut && !short {
			return fmt.Errorf("timed out with timeout %v", to)
		}
	}
	return nil
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// fakeFailure tells the 500s that the fakes produce on purpose (magic
// prompts) from real ones.
func fakeFailure(status int, b []byte) bool {
	_, _, _, msg, err := checkErrorBody(b)
	return status == 500 && err == nil && (strings.Contains(msg, "metal says no") || strings.Contains(msg, "pipe burst"))
}

// checkCompletionBody: one JSON object with one choice and consistent usage.
func checkCompletionBody(b []byte) error {
	var r responseJSON
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return fmt.Errorf("not a completion object: %v: %s", err, b)
	}
	if len(r.Choices) != 1 || r.Choices[0].FinishReason == nil || r.Usage == nil || r.Usage.PromptTokens == nil ||
		r.Usage.CompletionTokens == nil || r.Usage.TotalTokens == nil || *r.Usage.TotalTokens != *r.Usage.PromptTokens+*r.Usage.CompletionTokens {
		return fmt.Errorf("bad completion object: %s", b)
	}
	if r.Object != "chat.completion" && r.Object != "text_completion" {
		return fmt.Errorf("object %q", r.Object)
	}
	return nil
}

// checkStreamBody: "data: <json>\n\n" events (or comments), ending with
// [DONE]; an error chunk may only come last.
func checkStreamBody(b []byte) error {
	sse := newSSEReader(nil, bytes.NewReader(b))
	data, _, err := sse.readAll()
	if err != nil {
		return err
	}
	if len(data) == 0 || data[len(data)-1] != "[DONE]" {
		return fmt.Errorf("no [DONE] at the end")
	}
	for i, d := range data[:len(data)-1] {
		if strings.HasPrefix(d, `{"error"`) {
			if i != len(data)-2 {
				return fmt.Errorf("error chunk %d is not the last", i)
			}
			if _, _, _, _, err := checkErrorBody([]byte(d)); err != nil {
				return err
			}
			continue
		}
		var r responseJSON
		dec := json.NewDecoder(strings.NewReader(d))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			return fmt.Errorf("chunk %d %q: %v", i, d, err)
		}
		if r.Object != "chat.completion.chunk" && r.Object != "text_completion" {
			return fmt.Errorf("chunk %d object %q", i, r.Object)
		}
		if r.Usage == nil && len(r.Choices) != 1 {
			return fmt.Errorf("chunk %d has %d choices", i, len(r.Choices))
		}
	}
	return nil
}

// TestFuzzCheckersCatch: the fuzz checkers refuse what they must refuse.
func TestFuzzCheckersCatch(t *testing.T) {
	for _, b := range []string{``, `{}`, `{"error":"x"}`, `{"error":{"message":"m","type":"t"}}`, `{"error":{"message":"m","type":"t","param":"","code":null}}`, `{"error":{"message":"","type":"t","param":null,"code":null}}`} {
		if _, _, _, _, err := checkErrorBody([]byte(b)); err == nil {
			t.Errorf("checkErrorBody accepted %s", b)
		}
	}
	for _, b := range []string{"data: {}\n\n", "data: [DONE]\n", "data: x\n\ndata: [DONE]\n\n", "data: {\"error\":{}}\n\ndata: [DONE]\n\n", "event: x\n\ndata: [DONE]\n\n"} {
		if err := checkStreamBody([]byte(b)); err == nil {
			t.Errorf("checkStreamBody accepted %q", b)
		}
	}
}

// FuzzMessageContent: a message's string content decodes to exactly what
// encoding/json makes of the same literal (the decoder takes a shortcut for
// strings without escapes), for any bytes, escaped or raw.
func FuzzMessageContent(f *testing.F) {
	for _, s := range []string{"hi", "", `a"b`, "é", "\u2028", "\xff\xfe", "tab\there", `back\slash`, "😀", "\x00"} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, raw bool) {
		lit, _ := json.Marshal(s)
		if raw { // the bytes as they are, only quotes and backslashes escaped
			lit = []byte(`"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`)
		}
		body := append(append([]byte(`{"messages":[{"role":"user","content":`), lit...), `}]}`...)
		var want string
		if json.Unmarshal(lit, &want) != nil {
			return // not a JSON string (a raw control character)
		}
		var req chatRequest
		if e := decodeJSON(body, &req); e != nil {
			t.Fatalf("%q: %v", body, e.Message)
		}
		texts, e := parseMessages(req.Messages)
		if e != nil {
			t.Fatalf("%q: %v", body, e.Message)
		}
		if texts[0] != want {
			t.Fatalf("%q: got %q, want %q", body, texts[0], want)
		}
	})
}
