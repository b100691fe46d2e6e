package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
)

type usageJSON struct {
	PromptTokens        *int `json:"prompt_tokens"`
	CompletionTokens    *int `json:"completion_tokens"`
	TotalTokens         *int `json:"total_tokens"`
	PromptTokensDetails *struct {
		CachedTokens *int `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
}

type choiceJSON struct {
	Index   *int `json:"index"`
	Message *struct {
		Role    string  `json:"role"`
		Content *string `json:"content"`
	} `json:"message"`
	Delta *struct {
		Role    *string `json:"role"`
		Content *string `json:"content"`
	} `json:"delta"`
	Text         *string         `json:"text"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason *string         `json:"finish_reason"`
}

type responseJSON struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint string       `json:"system_fingerprint"`
	Choices           []choiceJSON `json:"choices"`
	Usage             *usageJSON   `json:"usage"`
	Error             any          `json:"error"`
}

func decodeResponse(t *testing.T, b []byte) responseJSON {
	t.Helper()
	var r responseJSON
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return r
}

func checkUsage(t *testing.T, u *usageJSON, prompt, completion int) {
	t.Helper()
	checkUsageCached(t, u, prompt, completion, 0)
}

func checkUsageCached(t *testing.T, u *usageJSON, prompt, completion, cached int) {
	t.Helper()
	if u == nil || u.PromptTokens == nil || u.CompletionTokens == nil || u.TotalTokens == nil ||
		u.PromptTokensDetails == nil || u.PromptTokensDetails.CachedTokens == nil {
		t.Fatalf("usage incomplete: %+v", u)
	}
	if *u.PromptTokens != prompt || *u.CompletionTokens != completion || *u.TotalTokens != prompt+completion {
		t.Errorf("usage %d+%d=%d, want %d+%d=%d", *u.PromptTokens, *u.CompletionTokens, *u.TotalTokens, prompt, completion, prompt+completion)
	}
	if got := *u.PromptTokensDetails.CachedTokens; got != cached {
		t.Errorf("usage.prompt_tokens_details.cached_tokens %d, want %d", got, cached)
	}
}

func wantText(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "w%d ", i)
	}
	return b.String()
}

func checkCreated(t *testing.T, created int64, before time.Time) {
	t.Helper()
	if created < before.Unix() || created > time.Now().Unix() {
		t.Errorf("created %d not between %d and now", created, before.Unix())
	}
}

func TestChatResponse(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		name, body, model, finish string
		prompt, completion        int
	}{
		{"stop", `{"model":"t","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"max_tokens":10}`, "t", "stop", 1 + 8 + 1 + 2, 3},
		{"length", `{"model":"/m/tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`, "/m/tiny", "length", 3, 2},
		{"max_completion_tokens", `{"model":"t","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":1}`, "t", "length", 3, 1},
		{"context clips max_tokens", `{"model":"t","messages":[{"role":"user","content":"` + strings.Repeat("a", 61) + `"}],"max_tokens":50}`, "t", "length", 62, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := time.Now()
			resp, b := h.do("POST", chatPath, c.body)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			r := decodeResponse(t, b)
			if !strings.HasPrefix(r.ID, "chatcmpl-") || len(r.ID) <= len("chatcmpl-") {
				t.Errorf("id %q", r.ID)
			}
			if r.Object != "chat.completion" || r.Model != c.model || r.SystemFingerprint == "" {
				t.Errorf("object %q model %q fingerprint %q", r.Object, r.Model, r.SystemFingerprint)
			}
			checkCreated(t, r.Created, before)
			if len(r.Choices) != 1 {
				t.Fatalf("%d choices", len(r.Choices))
			}
			ch := r.Choices[0]
			if ch.Index == nil || *ch.Index != 0 || ch.Message == nil || ch.Delta != nil || ch.Text != nil {
				t.Fatalf("choice shape: %s", b)
			}
			if ch.Message.Role != "assistant" || ch.Message.Content == nil || *ch.Message.Content != wantText(c.completion) {
				t.Errorf("message %+v, want content %q", ch.Message, wantText(c.completion))
			}
			if string(ch.Logprobs) != "null" {
				t.Errorf("logprobs %s", ch.Logprobs)
			}
			if ch.FinishReason == nil || *ch.FinishReason != c.finish {
				t.Errorf("finish_reason %v, want %s", ch.FinishReason, c.finish)
			}
			checkUsage(t, r.Usage, c.prompt, c.completion)
		})
	}
	// Ids are unique.
	_, b1 := h.do("POST", chatPath, chatJSON(``))
	_, b2 := h.do("POST", chatPath, chatJSON(``))
	if id1, id2 := decodeResponse(t, b1).ID, decodeResponse(t, b2).ID; id1 == id2 {
		t.Errorf("two responses share id %s", id1)
	}
}

func TestCompletionResponse(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		name, body, finish string
		prompt, completion int
	}{
		{"stop", `{"model":"t","prompt":"hello","max_tokens":10}`, "stop", 5, 3},
		{"length", `{"model":"t","prompt":"hello","max_tokens":2}`, "length", 5, 2},
		{"token ids", `{"model":"t","prompt":[10,11,12,13],"max_tokens":1}`, "length", 4, 1},
		{"default max_tokens", `{"model":"/m/tiny","prompt":["x"]}`, "stop", 1, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := time.Now()
			resp, b := h.do("POST", cmplPath, c.body)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			r := decodeResponse(t, b)
			if !strings.HasPrefix(r.ID, "cmpl-") || r.Object != "text_completion" {
				t.Errorf("id %q object %q", r.ID, r.Object)
			}
			var req struct{ Model string }
			_ = json.Unmarshal([]byte(c.body), &req)
			if r.Model != req.Model {
				t.Errorf("model %q, want %q", r.Model, req.Model)
			}
			checkCreated(t, r.Created, before)
			if len(r.Choices) != 1 {
				t.Fatalf("%d choices", len(r.Choices))
			}
			ch := r.Choices[0]
			if ch.Index == nil || *ch.Index != 0 || ch.Message != nil || ch.Delta != nil || ch.Text == nil {
				t.Fatalf("choice shape: %s", b)
			}
			if *ch.Text != wantText(c.completion) {
				t.Errorf("text %q, want %q", *ch.Text, wantText(c.completion))
			}
			if ch.FinishReason == nil || *ch.FinishReason != c.finish {
				t.Errorf("finish_reason %v, want %s", ch.FinishReason, c.finish)
			}
			checkUsage(t, r.Usage, c.prompt, c.completion)
		})
	}
}

// streamRequest posts body and checks the SSE response headers.
func (h *harness) streamRequest(t *testing.T, ctx context.Context, path, body string) *http.Response {
	t.Helper()
	resp, err := h.client.Do(h.newRequest(ctx, "POST", path, body))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	if cc := resp.Header.Get("Cache-Control"); cc != "no-cache" {
		t.Errorf("Cache-Control %q", cc)
	}
	return resp
}

// checkChatStream verifies a complete chat stream and returns its text.
func checkChatStream(t *testing.T, data []string, model, finish string, includeUsage bool, prompt, completion int) {
	t.Helper()
	if len(data) < 3 {
		t.Fatalf("stream too short: %q", data)
	}
	if data[len(data)-1] != "[DONE]" {
		t.Fatalf("stream does not end with [DONE]: %q", data)
	}
	data = data[:len(data)-1]
	var chunks []responseJSON
	for _, d := range data {
		chunks = append(chunks, decodeResponse(t, []byte(d)))
	}
	id := chunks[0].ID
	for i, c := range chunks {
		if c.ID != id || !strings.HasPrefix(id, "chatcmpl-") || c.Object != "chat.completion.chunk" || c.Model != model || c.Created == 0 || c.Error != nil {
			t.Errorf("chunk %d: id %q object %q model %q created %d error %v", i, c.ID, c.Object, c.Model, c.Created, c.Error)
		}
	}
	// First: the role.
	first := chunks[0]
	if len(first.Choices) != 1 || first.Choices[0].Delta == nil || first.Choices[0].Delta.Role == nil || *first.Choices[0].Delta.Role != "assistant" || first.Choices[0].FinishReason != nil || first.Usage != nil {
		t.Errorf("first chunk %s", data[0])
	}
	if first.Choices[0].Delta.Content != nil && *first.Choices[0].Delta.Content != "" {
		t.Errorf("first chunk has content: %s", data[0])
	}
	rest := chunks[1:]
	if includeUsage {
		last := rest[len(rest)-1]
		rest = rest[:len(rest)-1]
		if last.Choices == nil || len(last.Choices) != 0 {
			t.Errorf("usage chunk choices %v, want []: %s", last.Choices, data[len(data)-1])
		}
		if !strings.Contains(data[len(data)-1], `"choices":[]`) {
			t.Errorf("usage chunk lacks \"choices\":[]: %s", data[len(data)-1])
		}
		checkUsage(t, last.Usage, prompt, completion)
	}
	fin := rest[len(rest)-1]
	rest = rest[:len(rest)-1]
	if len(fin.Choices) != 1 || fin.Choices[0].FinishReason == nil || *fin.Choices[0].FinishReason != finish || fin.Usage != nil {
		t.Errorf("finish chunk %+v", fin)
	} else if d := fin.Choices[0].Delta; d == nil || d.Content != nil || d.Role != nil {
		t.Errorf("finish chunk delta %+v, want {}", d)
	}
	var text strings.Builder
	for i, c := range rest {
		if len(c.Choices) != 1 || c.Choices[0].Delta == nil || c.Choices[0].Delta.Content == nil || *c.Choices[0].Delta.Content == "" || c.Choices[0].FinishReason != nil || c.Usage != nil {
			t.Errorf("content chunk %d: %s", i, data[i+1])
			continue
		}
		if c.Choices[0].Delta.Role != nil {
			t.Errorf("content chunk %d repeats the role", i)
		}
		text.WriteString(*c.Choices[0].Delta.Content)
	}
	if text.String() != wantText(completion) {
		t.Errorf("streamed text %q, want %q", text.String(), wantText(completion))
	}
}

func TestChatStream(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		name, body, model, finish string
		usage                     bool
		prompt, completion        int
	}{
		{"stop", chatJSON(`,"stream":true,"max_tokens":10`), "t", "stop", false, 3, 3},
		{"length with usage", `{"model":"/m/tiny","messages":[{"role":"user","content":"hey"}],"stream":true,"max_tokens":2,"stream_options":{"include_usage":true}}`, "/m/tiny", "length", true, 4, 2},
		{"usage off", chatJSON(`,"stream":true,"stream_options":{"include_usage":false}`), "t", "stop", false, 3, 3},
		{"one token", chatJSON(`,"stream":true,"max_tokens":1,"stream_options":{"include_usage":true}`), "t", "length", true, 3, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp := h.streamRequest(t, context.Background(), chatPath, c.body)
			defer resp.Body.Close()
			data, _, err := newSSEReader(t, resp.Body).readAll()
			if err != nil {
				t.Fatal(err)
			}
			checkChatStream(t, data, c.model, c.finish, c.usage, c.prompt, c.completion)
		})
	}
}

func TestCompletionStream(t *testing.T) {
	h := newHarness(t)
	for _, usage := range []bool{false, true} {
		t.Run(fmt.Sprint("usage=", usage), func(t *testing.T) {
			body := `{"model":"t","prompt":"hello","stream":true,"max_tokens":10}`
			if usage {
				body = `{"model":"t","prompt":"hello","stream":true,"max_tokens":2,"stream_options":{"include_usage":true}}`
			}
			resp := h.streamRequest(t, context.Background(), cmplPath, body)
			defer resp.Body.Close()
			data, _, err := newSSEReader(t, resp.Body).readAll()
			if err != nil {
				t.Fatal(err)
			}
			if len(data) < 2 || data[len(data)-1] != "[DONE]" {
				t.Fatalf("stream %q", data)
			}
			data = data[:len(data)-1]
			completion, finish := 3, "stop"
			if usage {
				completion, finish = 2, "length"
				last := decodeResponse(t, []byte(data[len(data)-1]))
				if !strings.Contains(data[len(data)-1], `"choices":[]`) {
					t.Errorf("usage chunk %s", data[len(data)-1])
				}
				checkUsage(t, last.Usage, 5, 2)
				data = data[:len(data)-1]
			}
			var text strings.Builder
			var id string
			for i, d := range data {
				c := decodeResponse(t, []byte(d))
				if id == "" {
					id = c.ID
				}
				if c.ID != id || !strings.HasPrefix(c.ID, "cmpl-") || c.Object != "text_completion" || c.Model != "t" || len(c.Choices) != 1 || c.Choices[0].Text == nil || c.Usage != nil {
					t.Fatalf("chunk %d: %s", i, d)
				}
				last := i == len(data)-1
				if fr := c.Choices[0].FinishReason; last != (fr != nil) {
					t.Errorf("chunk %d finish_reason %v", i, fr)
				} else if last && *fr != finish {
					t.Errorf("finish_reason %q, want %q", *fr, finish)
				}
				if last && *c.Choices[0].Text != "" {
					t.Errorf("finish chunk has text %q", *c.Choices[0].Text)
				}
				text.WriteString(*c.Choices[0].Text)
			}
			if text.String() != wantText(completion) {
				t.Errorf("text %q, want %q", text.String(), wantText(completion))
			}
		})
	}
}

// TestStreamKeepAlive: while the first token is held back, the stream carries
// SSE comments; once released, the tokens follow.
func TestStreamKeepAlive(t *testing.T) {
	for _, path := range []string{chatPath, cmplPath} {
		t.Run(path, func(t *testing.T) {
			hold := make(chan struct{})
			gen := make(chan struct{}, 1)
			h := newHarness(t, func(c *harnessConfig) {
				c.api.KeepAlive = 5 * time.Millisecond
				c.workers = []workerConfig{{tokens: 3, hold: hold, onGen: func(*ipc.Message) { gen <- struct{}{} }}}
			})
			body := chatJSON(`,"stream":true`)
			if path == cmplPath {
				body = cmplJSON(`,"stream":true`)
			}
			resp := h.streamRequest(t, context.Background(), path, body)
			defer resp.Body.Close()
			<-gen // the worker holds the request
			sse := newSSEReader(t, resp.Body)
			var data []string
			keepAlives := 0
			for keepAlives < 2 {
				ev, err := sse.next()
				if err != nil {
					t.Fatal(err)
				}
				switch {
				case ev.comment != "":
					if ev.comment != "keep-alive" {
						t.Errorf("comment %q", ev.comment)
					}
					keepAlives++
				case path == chatPath && len(data) == 0:
					data = append(data, ev.data) // the role chunk comes first
				default:
					t.Fatalf("data before the first token was released: %q", ev.data)
				}
			}
			close(hold)
			rest, _, err := sse.readAll()
			if err != nil {
				t.Fatal(err)
			}
			data = append(data, rest...)
			if path == chatPath {
				checkChatStream(t, data, "t", "stop", false, 3, 3)
			} else if len(data) != 5 || data[4] != "[DONE]" {
				t.Errorf("completion stream %q", data)
			}
		})
	}
}

// TestStreamNoKeepAlive: KeepAlive 0 turns keep-alives off (it used to panic
// in time.NewTicker).
func TestStreamNoKeepAlive(t *testing.T) {
	h := newHarness(t, func(c *harnessConfig) { c.api.KeepAlive = 0 })
	resp := h.streamRequest(t, context.Background(), chatPath, chatJSON(`,"stream":true`))
	defer resp.Body.Close()
	data, comments, err := newSSEReader(t, resp.Body).readAll()
	if err != nil {
		t.Fatal(err)
	}
	if comments != 0 {
		t.Errorf("%d comments", comments)
	}
	checkChatStream(t, data, "t", "stop", false, 3, 3)
}

// checkErrorChunk verifies that data ends with an error chunk and [DONE].
func checkErrorChunk(t *testing.T, data []string, typ, code, msg string) {
	t.Helper()
	if len(data) < 2 || data[len(data)-1] != "[DONE]" {
		t.Fatalf("stream does not end with [DONE]: %q", data)
	}
	gotTyp, gotCode, _, gotMsg, err := checkErrorBody([]byte(data[len(data)-2]))
	if err != nil {
		t.Fatalf("last chunk before [DONE]: %v", err)
	}
	if gotTyp != typ || gotCode != code || !strings.Contains(gotMsg, msg) {
		t.Errorf("error chunk (%q, %q, %q), want (%q, %q, ~%q)", gotTyp, gotCode, gotMsg, typ, code, msg)
	}
}

// TestStreamWorkerCrash: a request that fails with worker_crash mid-stream
// ends with an error chunk and [DONE]; non-streamed, it is a 500.
func TestStreamWorkerCrash(t *testing.T) {
	crash := func(c *harnessConfig) {
		c.sched.MaxCrashes = 1
		c.workers = []workerConfig{{crashAfter: 2}}
	}
	t.Run("chat stream", func(t *testing.T) {
		h := newHarness(t, crash)
		resp := h.streamRequest(t, context.Background(), chatPath, chatJSON(`,"stream":true,"max_tokens":10,"stream_options":{"include_usage":true}`))
		defer resp.Body.Close()
		data, _, err := newSSEReader(t, resp.Body).readAll()
		if err != nil {
			t.Fatal(err)
		}
		checkErrorChunk(t, data, "server_error", "worker_crash", "fake worker died (SIGSEGV)")
		// role, w0, w1, error, [DONE]: no finish chunk, no usage chunk.
		if len(data) != 5 {
			t.Fatalf("stream %q", data)
		}
		var text strings.Builder
		for _, d := range data[1:3] {
			c := decodeResponse(t, []byte(d))
			text.WriteString(*c.Choices[0].Delta.Content)
		}
		if text.String() != "w0 w1 " {
			t.Errorf("text before the crash %q", text.String())
		}
	})
	t.Run("completion stream", func(t *testing.T) {
		h := newHarness(t, crash)
		resp := h.streamRequest(t, context.Background(), cmplPath, cmplJSON(`,"stream":true,"max_tokens":10`))
		defer resp.Body.Close()
		data, _, err := newSSEReader(t, resp.Body).readAll()
		if err != nil {
			t.Fatal(err)
		}
		checkErrorChunk(t, data, "server_error", "worker_crash", "in flight during 1 worker crashes")
	})
	t.Run("not streamed", func(t *testing.T) {
		h := newHarness(t, crash)
		resp, body := h.do("POST", chatPath, chatJSON(`,"max_tokens":10`))
		h.expectError(t, resp, body, apiErr{status: 500, typ: "server_error", code: "worker_crash", msg: "fake worker died (SIGSEGV)"})
	})
	t.Run("resumed on another worker", func(t *testing.T) {
		// MaxCrashes 2: the first crash resumes the request on worker 1 and
		// the client sees one seamless stream.
		h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{crashAfter: 2}} })
		resp := h.streamRequest(t, context.Background(), chatPath, chatJSON(`,"stream":true,"max_tokens":5,"stream_options":{"include_usage":true}`))
		defer resp.Body.Close()
		sse := newSSEReader(t, resp.Body)
		var data []string
		for len(data) < 3 { // role, w0, w1
			ev, err := sse.next()
			if err != nil {
				t.Fatal(err)
			}
			if ev.comment == "" {
				data = append(data, ev.data)
			}
		}
		h.addWorker(workerConfig{})
		rest, _, err := sse.readAll()
		if err != nil {
			t.Fatal(err)
		}
		checkChatStream(t, append(data, rest...), "t", "length", true, 3, 5)
	})
}

// TestStreamErrors: failures after the 200 went out are error chunks.
// TestStreamErrors: a streamed request that fails before its first token gets
// a real HTTP error status (nothing has been written yet); one that fails
// after it ends its event stream with an error chunk and [DONE].
func TestStreamErrors(t *testing.T) {
	t.Run("timeout before the first token", func(t *testing.T) {
		hold := make(chan struct{})
		defer close(hold)
		h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{hold: hold}} })
		resp, body := h.do("POST", chatPath, chatJSON(`,"stream":true,"timeout":0.02`))
		h.expectError(t, resp, body, apiErr{status: 504, typ: "timeout_error", code: "timeout", msg: "request timed out"})
		if err := h.idle(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("timeout mid-stream", func(t *testing.T) {
		h := newHarness(t, func(c *harnessConfig) { c.workers = []workerConfig{{stallAfter: 1}} })
		resp := h.streamRequest(t, context.Background(), chatPath, chatJSON(`,"stream":true,"timeout":0.05`))
		defer resp.Body.Close()
		data, _, err := newSSEReader(t, resp.Body).readAll()
		if err != nil {
			t.Fatal(err)
		}
		if len(data) != 4 || !strings.Contains(data[1], `"content":"w0 "`) {
			t.Fatalf("want role, one token, error, [DONE]; got %q", data)
		}
		checkErrorChunk(t, data, "timeout_error", "timeout", "request timed out")
		if err := h.idle(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("worker refuses", func(t *testing.T) {
		h := newHarness(t)
		resp, body := h.do("POST", cmplPath, `{"model":"t","stream":true,"prompt":"`+magicWorkerInvalid+`"}`)
		h.expectError(t, resp, body, apiErr{status: 400, typ: "invalid_request_error", msg: "top_k must be >= 0"})
	})
}

// The worker's done.cached reaches usage.prompt_tokens_details.cached_tokens
// in every response shape: chat and completions, whole and streamed.
func TestUsageCachedTokens(t *testing.T) {
	h := newHarness(t)
	chat := `{"model":"t","messages":[{"role":"user","content":"` + magicCached + `"}],"max_tokens":2`
	cmpl := `{"model":"t","prompt":"` + magicCached + `","max_tokens":2`
	chatPrompt, cmplPrompt := 1+len(magicCached), len(magicCached)
	for _, c := range []struct {
		name, path, body string
		prompt           int
		stream           bool
	}{
		{"chat", chatPath, chat + `}`, chatPrompt, false},
		{"chat stream", chatPath, chat + `,"stream":true,"stream_options":{"include_usage":true}}`, chatPrompt, true},
		{"completion", cmplPath, cmpl + `}`, cmplPrompt, false},
		{"completion stream", cmplPath, cmpl + `,"stream":true,"stream_options":{"include_usage":true}}`, cmplPrompt, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var last []byte
			if c.stream {
				resp := h.streamRequest(t, context.Background(), c.path, c.body)
				defer resp.Body.Close()
				data, _, err := newSSEReader(t, resp.Body).readAll()
				if err != nil {
					t.Fatal(err)
				}
				if len(data) < 2 || data[len(data)-1] != "[DONE]" {
					t.Fatalf("stream %q", data)
				}
				last = []byte(data[len(data)-2])
			} else {
				resp, b := h.do("POST", c.path, c.body)
				if resp.StatusCode != 200 {
					t.Fatalf("status %d: %s", resp.StatusCode, b)
				}
				last = b
			}
			checkUsageCached(t, decodeResponse(t, last).Usage, c.prompt, 2, c.prompt-1)
		})
	}
}
