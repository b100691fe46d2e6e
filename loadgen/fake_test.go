package loadgen

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a manual clock: only Advance moves it.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// step is one action of a scripted SSE response.
type step struct {
	advance time.Duration // move the fake clock first
	data    string        // a data event ("" = none)
	raw     string        // raw bytes written as is (comments, odd framing)
}

func content(s string) string {
	b, _ := json.Marshal(map[string]any{
		"object":  "chat.completion.chunk",
		"choices": []any{map[string]any{"index": 0, "delta": map[string]any{"content": s}, "finish_reason": nil}},
	})
	return string(b)
}

func roleOnly() string {
	return `{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}`
}

func finish(reason string) string {
	return fmt.Sprintf(`{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":%q}]}`, reason)
}

func usage(prompt, completion int) string {
	return fmt.Sprintf(`{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`,
		prompt, completion, prompt+completion)
}

func textChunk(s string) string {
	b, _ := json.Marshal(map[string]any{
		"object":  "text_completion",
		"choices": []any{map[string]any{"index": 0, "text": s, "finish_reason": nil}},
	})
	return string(b)
}

// fakeServer is an OpenAI-compatible streaming server whose answers are
// scripted per prompt.
type fakeServer struct {
	t      *testing.T
	srv    *httptest.Server
	clock  *fakeClock
	script func(prompt string) (status int, steps []step)

	// lockstep: after writing each data event, wait until the client has
	// handled it (Config.onEvent sends on ack). Only with Concurrency 1.
	ack chan int

	// gate, when set, is called once a request has arrived and before it is
	// answered (used to hold requests in flight).
	gate func(r *http.Request)
	// onLeave, when set, is called when a handler has returned (after the
	// in-flight count is decremented).
	onLeave func()

	mu       sync.Mutex
	bodies   []map[string]any
	paths    []string
	inflight int
	maxIn    int
}

func newFakeServer(t *testing.T, script func(string) (int, []step)) *fakeServer {
	f := &fakeServer{t: t, clock: newFakeClock(), script: script}
	f.srv = httptest.NewServer(http.HandlerFunc(f.handle))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeServer) lockstep() {
	f.ack = make(chan int)
}

// config returns a Config wired to the fake's clock and lockstep.
func (f *fakeServer) config(prompts ...string) Config {
	cfg := Config{
		URL:         f.srv.URL,
		Model:       "default",
		Concurrency: 1,
		MaxTokens:   50,
		Prompts:     prompts,
		Chat:        true,
		now:         f.clock.Now,
	}
	if f.ack != nil {
		ack := f.ack
		cfg.onEvent = func(i int) { ack <- i }
	}
	return cfg
}

func (f *fakeServer) handle(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.inflight++
	if f.inflight > f.maxIn {
		f.maxIn = f.inflight
	}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inflight--
		f.mu.Unlock()
		if f.onLeave != nil {
			f.onLeave()
		}
	}()

	raw, _ := io.ReadAll(r.Body)
	var body map[string]any
	if err := json.Unmarshal(raw, &body); err != nil {
		http.Error(w, "bad json", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.bodies = append(f.bodies, body)
	f.paths = append(f.paths, r.URL.Path)
	f.mu.Unlock()

	prompt, _ := body["prompt"].(string)
	if msgs, ok := body["messages"].([]any); ok && len(msgs) > 0 {
		prompt, _ = msgs[len(msgs)-1].(map[string]any)["content"].(string)
	}
	if f.gate != nil {
		f.gate(r)
	}
	status, steps := f.script(prompt)
	if status != http.StatusOK {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"error":{"message":"fake %d","code":%d}}`, status, status)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	fl.Flush()
	for _, s := range steps {
		if s.advance > 0 {
			f.clock.Advance(s.advance)
		}
		if s.raw != "" {
			io.WriteString(w, s.raw)
			fl.Flush()
		}
		if s.data != "" {
			fmt.Fprintf(w, "data: %s\n\n", s.data)
			fl.Flush()
			if f.ack != nil {
				select {
				case <-f.ack:
				case <-r.Context().Done():
					return
				}
			}
		}
	}
}

func (f *fakeServer) maxInflight() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.maxIn
}

// standard is a well-behaved stream: role chunk, contents, finish, usage,
// [DONE].
func standard(prefill time.Duration, gap time.Duration, pieces []string, usageTokens int) []step {
	steps := []step{{advance: prefill / 2, data: roleOnly()}, {raw: ": keepalive 1/2\n\n"}}
	for i, p := range pieces {
		d := gap
		if i == 0 {
			d = prefill - prefill/2
		}
		steps = append(steps, step{advance: d, data: content(p)})
	}
	steps = append(steps, step{data: finish("length")})
	if usageTokens >= 0 {
		steps = append(steps, step{data: usage(7, usageTokens)})
	}
	return append(steps, step{data: "[DONE]"})
}

func promptsN(n int, f func(i int) string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = f(i)
	}
	return out
}

func mustContain(t *testing.T, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("output lacks %q:\n%s", sub, s)
		}
	}
}
