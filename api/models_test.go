package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krserve/krserve/models"
	"github.com/krserve/krserve/scheduler"
)

// harnessModel is the harness's scheduler and pool as a loaded model.
type harnessModel struct {
	*scheduler.Scheduler
	*fakePool
}

func (harnessModel) MemoryBytes() int64 { return 0 }
func (harnessModel) Stop()              {}

// multi serves models "a" and "broken" through a real models.Manager whose
// loader hands out the harness's scheduler once release is closed (broken:
// fails with its reason).
type multi struct {
	h       *harness
	srv     *httptest.Server
	release chan struct{}
	loads   atomic.Int32
}

func newMulti(t *testing.T) *multi {
	h := newHarness(t)
	mu := &multi{h: h, release: make(chan struct{})}
	mgr, err := models.New(models.Config{
		Models: []models.Spec{{Name: "a", Path: "/m/a", Aliases: []string{"alpha"}, Workers: 1, TTL: models.Never},
			{Name: "broken", Path: "/m/broken", Workers: 1}},
		Load: func(ctx context.Context, s models.Spec) (models.Instance, error) {
			mu.loads.Add(1)
			if s.Name == "broken" {
				return nil, errors.New("No safetensors found in /m/broken")
			}
			select {
			case <-mu.release:
				return harnessModel{h.sched, h.pool}, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = mgr.Run(ctx) }()
	cfg := testAPIConfig()
	cfg.KeepAlive = 5 * time.Millisecond
	var ids atomic.Uint64
	front := NewModels(cfg, mgr, h.ops, h.m, slog.New(slog.DiscardHandler), func() uint64 { return ids.Add(1) })
	mu.srv = httptest.NewServer(front.Handler())
	t.Cleanup(func() {
		mu.srv.Close()
		cancel()
		<-done
	})
	return mu
}

func (mu *multi) post(t *testing.T, path, body string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Post(mu.srv.URL+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// TestStreamWaitsForItsModelWithKeepAlives: a stream whose model is loading
// gets its headers and SSE comments, then its tokens once the model is in.
func TestStreamWaitsForItsModelWithKeepAlives(t *testing.T) {
	mu := newMulti(t)
	resp, err := http.Post(mu.srv.URL+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"alpha","prompt":"hi","max_tokens":3,"stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(resp.Body)
	line, err := r.ReadString('\n')
	if err != nil || line != ": keep-alive\n" {
		t.Fatalf("first line %q, %v; want a keep-alive comment while the model loads", line, err)
	}
	close(mu.release)
	rest, _ := io.ReadAll(r)
	text := string(rest)
	if !strings.Contains(text, `"text":"w0 "`) || !strings.Contains(text, `"finish_reason":"stop"`) || !strings.HasSuffix(text, "data: [DONE]\n\n") {
		t.Fatalf("stream after the load:\n%s", text)
	}
	if n := mu.loads.Load(); n != 1 {
		t.Fatalf("%d loads", n)
	}
}

func TestModelErrors(t *testing.T) {
	mu := newMulti(t)
	resp, body := mu.post(t, "/v1/completions", `{"model":"nope","prompt":"hi"}`)
	if resp.StatusCode != 404 || !strings.Contains(string(body), `"code":"model_not_found"`) {
		t.Fatalf("unknown: %d %s", resp.StatusCode, body)
	}
	resp, body = mu.post(t, "/v1/completions", `{"model":"broken","prompt":"hi"}`)
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" ||
		!strings.Contains(string(body), `"code":"model_unavailable"`) || !strings.Contains(string(body), "No safetensors found") {
		t.Fatalf("broken: %d %s", resp.StatusCode, body)
	}
	// A stream whose model fails to load gets the reason: as an HTTP error,
	// or as an error event when a keep-alive already sent the headers.
	resp, body = mu.post(t, "/v1/completions", `{"model":"broken","prompt":"hi","stream":true}`)
	if !strings.Contains(string(body), "No safetensors found") ||
		(resp.StatusCode != 503 && !(resp.StatusCode == 200 && strings.HasSuffix(string(body), "data: [DONE]\n\n"))) {
		t.Fatalf("broken stream: %d %s", resp.StatusCode, body)
	}
	resp, body = mu.post(t, "/v1/completions", `{"model":"a","prompt":"hi","keep_alive":"soon"}`)
	if resp.StatusCode != 400 || !strings.Contains(string(body), `"param":"keep_alive"`) {
		t.Fatalf("keep_alive: %d %s", resp.StatusCode, body)
	}
	close(mu.release)
	// The vocabulary is known only once the model is in: checked then.
	resp, body = mu.post(t, "/v1/completions", `{"model":"a","prompt":"hi","logit_bias":{"5000":1}}`)
	if resp.StatusCode != 400 || !strings.Contains(string(body), `"param":"logit_bias"`) {
		t.Fatalf("logit_bias: %d %s", resp.StatusCode, body)
	}
	resp, body = mu.post(t, "/v1/completions", `{"model":"a","prompt":"hi","keep_alive":-1}`)
	if resp.StatusCode != 200 {
		t.Fatalf("a: %d %s", resp.StatusCode, body)
	}
}

func TestModelEndpoints(t *testing.T) {
	mu := newMulti(t)
	close(mu.release)
	get := func(path string) (int, map[string]any) {
		resp, err := http.Get(mu.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&v)
		return resp.StatusCode, v
	}
	_, list := get("/v1/models")
	if b, _ := json.Marshal(list["data"]); !strings.Contains(string(b), `"id":"a"`) || !strings.Contains(string(b), `"state":"unloaded"`) ||
		!strings.Contains(string(b), `"aliases":["alpha"]`) {
		t.Fatalf("/v1/models: %s", b)
	}
	if _, ps := get("/api/ps"); len(ps["models"].([]any)) != 0 {
		t.Fatalf("nothing loaded yet: %v", ps)
	}
	resp, body := mu.post(t, "/api/models/alpha/load", "")
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"state":"ready"`) {
		t.Fatalf("load: %d %s", resp.StatusCode, body)
	}
	_, ps := get("/api/ps")
	m := ps["models"].([]any)[0].(map[string]any)
	if m["name"] != "a" || m["model"] != "/m/a" || m["state"] != "ready" || m["workers"] != 1.0 {
		t.Fatalf("/api/ps: %v", ps)
	}
	if resp, body := mu.post(t, "/api/models/nope/load", ""); resp.StatusCode != 404 {
		t.Fatalf("load unknown: %d %s", resp.StatusCode, body)
	}
	resp, body = mu.post(t, "/api/models/a/unload", "")
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"state":"unloaded"`) {
		t.Fatalf("unload: %d %s", resp.StatusCode, body)
	}
	if code, _ := get("/ready?model=nope"); code != 404 {
		t.Fatalf("/ready?model=nope: %d", code)
	}
}
