package loadgen

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestTimingAndTokens(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		// 150 ms to the first content, then gaps of 10 and 20 ms; usage says
		// 7 tokens although only 3 content chunks came (held-back UTF-8).
		return 200, []step{
			{advance: 100 * time.Millisecond, data: roleOnly()}, // not content
			{raw: ": keepalive 3/10\n\n"},
			{advance: 50 * time.Millisecond, data: content("Hel")},
			{advance: 10 * time.Millisecond, data: content("lo")},
			{advance: 20 * time.Millisecond, data: content(" world")},
			{advance: 5 * time.Millisecond, data: finish("length")},
			{data: usage(11, 7)},
			{data: "[DONE]"},
		}
	})
	f.lockstep()
	res, err := Run(context.Background(), f.config("hi"))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) != 1 || res.Errors != 0 || res.Completed != 1 {
		t.Fatalf("records %d errors %d completed %d: %+v", len(res.Records), res.Errors, res.Completed, res.Records)
	}
	r := res.Records[0]
	if !near(r.TTFTMS, 150) {
		t.Errorf("TTFT = %v ms, want 150", r.TTFTMS)
	}
	if !near(r.E2EMS, 185) {
		t.Errorf("E2E = %v ms, want 185", r.E2EMS)
	}
	if !reflect.DeepEqual(r.GapsMS, []float64{10, 20}) {
		t.Errorf("gaps = %v, want [10 20]", r.GapsMS)
	}
	if r.Tokens != 7 || r.TokensSource != "usage" || r.Chunks != 3 || r.PromptTokens != 11 {
		t.Errorf("tokens %d (%s) chunks %d prompt %d, want 7 (usage) 3 11", r.Tokens, r.TokensSource, r.Chunks, r.PromptTokens)
	}
	if !near(r.TokPerS, 7/0.185) {
		t.Errorf("tok/s = %v, want %v", r.TokPerS, 7/0.185)
	}
	if r.FinishReason != "length" {
		t.Errorf("finish reason %q", r.FinishReason)
	}
	if !near(res.WallMS, 185) || res.TotalTokens != 7 || !near(res.TokPerS, 7/0.185) || !near(res.ReqPerS, 1/0.185) {
		t.Errorf("aggregate: wall %v tokens %d tok/s %v req/s %v", res.WallMS, res.TotalTokens, res.TokPerS, res.ReqPerS)
	}
	if res.ITLMS.N != 2 || !near(res.ITLMS.Mean, 15) {
		t.Errorf("ITL summary %+v", res.ITLMS)
	}
}

func TestTokensFallBackToChunks(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, standard(40*time.Millisecond, 5*time.Millisecond, []string{"a", "b", "c", "d"}, -1)
	})
	f.lockstep()
	res, err := Run(context.Background(), f.config("x"))
	if err != nil {
		t.Fatal(err)
	}
	r := res.Records[0]
	if r.Tokens != 4 || r.TokensSource != "chunks" {
		t.Errorf("tokens %d source %q, want 4 chunks", r.Tokens, r.TokensSource)
	}
	if !near(r.TTFTMS, 40) || !near(r.E2EMS, 55) {
		t.Errorf("ttft %v e2e %v, want 40 55", r.TTFTMS, r.E2EMS)
	}
}

func TestTTFTOrdering(t *testing.T) {
	// Each prompt's prefill time is set by the script; TTFTs must follow it,
	// and every TTFT must precede the end of its request.
	prefill := map[string]time.Duration{"slow": 300 * time.Millisecond, "fast": 20 * time.Millisecond, "mid": 90 * time.Millisecond}
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, standard(prefill[p], 7*time.Millisecond, []string{"x", "y", "z"}, 3)
	})
	f.lockstep()
	res, err := Run(context.Background(), f.config("slow", "fast", "mid"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	prompts := []string{"slow", "fast", "mid"}
	for _, r := range res.Records {
		got[prompts[r.Prompt]] = r.TTFTMS
		if !(r.TTFTMS > 0 && r.TTFTMS < r.E2EMS) {
			t.Errorf("record %d: ttft %v e2e %v", r.Index, r.TTFTMS, r.E2EMS)
		}
		if !near(r.E2EMS-r.TTFTMS, 14) {
			t.Errorf("record %d: decode time %v, want 14", r.Index, r.E2EMS-r.TTFTMS)
		}
	}
	if !(got["fast"] < got["mid"] && got["mid"] < got["slow"]) {
		t.Errorf("TTFT order wrong: %v", got)
	}
	if !near(got["slow"], 300) || !near(got["fast"], 20) || !near(got["mid"], 90) {
		t.Errorf("TTFTs %v", got)
	}
	// Sequential: each request starts where the previous one ended.
	if !near(res.Records[1].StartMS, res.Records[0].E2EMS) {
		t.Errorf("start of 2nd %v, end of 1st %v", res.Records[1].StartMS, res.Records[0].E2EMS)
	}
	if !near(res.TTFTMS.Max, 300) || !near(res.TTFTMS.Min, 20) || !near(res.TTFTMS.Median, 90) {
		t.Errorf("TTFT summary %+v", res.TTFTMS)
	}
}

func TestRequestBody(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, standard(time.Millisecond, time.Millisecond, []string{"a"}, 1)
	})
	seed := 42
	cfg := f.config("q1")
	cfg.Seed = &seed
	cfg.IgnoreEOS = true
	cfg.Temperature = 0.7
	cfg.ResponseFormat = json.RawMessage(`{"type":"json_object"}`)
	cfg.URL += "/v1/" // accepted
	if _, err := Run(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	cfg = f.config("q2")
	cfg.Chat = false
	if _, err := Run(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if f.paths[0] != "/v1/chat/completions" || f.paths[1] != "/v1/completions" {
		t.Errorf("paths %v", f.paths)
	}
	b := f.bodies[0]
	if b["stream"] != true || b["model"] != "default" || b["max_tokens"] != 50.0 || b["temperature"] != 0.7 ||
		b["seed"] != 42.0 || b["ignore_eos"] != true {
		t.Errorf("chat body %v", b)
	}
	if rf, _ := b["response_format"].(map[string]any); rf["type"] != "json_object" || len(rf) != 1 {
		t.Errorf("response_format %v", b["response_format"])
	}
	if so, _ := b["stream_options"].(map[string]any); so["include_usage"] != true {
		t.Errorf("stream_options %v", b["stream_options"])
	}
	msgs, _ := b["messages"].([]any)
	if len(msgs) != 1 || msgs[0].(map[string]any)["role"] != "user" || msgs[0].(map[string]any)["content"] != "q1" {
		t.Errorf("messages %v", b["messages"])
	}
	b = f.bodies[1]
	if b["prompt"] != "q2" || b["messages"] != nil {
		t.Errorf("completions body %v", b)
	}
	if _, ok := b["seed"]; ok {
		t.Errorf("seed sent although nil: %v", b)
	}
	if _, ok := b["ignore_eos"]; ok {
		t.Errorf("ignore_eos sent although false: %v", b)
	}
	if _, ok := b["response_format"]; ok {
		t.Errorf("response_format sent although not set: %v", b)
	}
}

func TestTextCompletionsStream(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, []step{
			{advance: 30 * time.Millisecond, data: textChunk("")}, // empty text: not content
			{advance: 10 * time.Millisecond, data: textChunk("one")},
			{advance: 10 * time.Millisecond, data: textChunk(" two")},
			{data: usage(3, 2)},
			{data: "[DONE]"},
		}
	})
	f.lockstep()
	cfg := f.config("p")
	cfg.Chat = false
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	r := res.Records[0]
	if !near(r.TTFTMS, 40) || r.Chunks != 2 || r.Tokens != 2 || !near(r.E2EMS, 50) {
		t.Errorf("%+v", r)
	}
}

func TestSSEKeepAliveAndFraming(t *testing.T) {
	// Comments, CRLF framing, a data event split over two writes, an event
	// field, an empty "data:" event and a missing blank line before EOF
	// handling are all exercised in one stream.
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, []step{
			{raw: ": connected\r\n\r\n"},
			{raw: ":keepalive\n\n: another\n\n"},
			{raw: "event: message\r\nid: 1\r\n"},
			{raw: "data: " + content("A")[:10]},
			{raw: content("A")[10:] + "\r\n\r\n"},
			{raw: ": keepalive 5/5\n\n"},
			{raw: "data:" + content("B") + "\n\n"}, // no space after colon
			{raw: "retry: 100\n\n"},                // no data: no event
			{raw: "data: " + usage(1, 2) + "\n\n"},
			{raw: "data: [DONE]\n\n"},
		}
	})
	res, err := Run(context.Background(), f.config("p"))
	if err != nil {
		t.Fatal(err)
	}
	r := res.Records[0]
	if !r.OK() || r.Chunks != 2 || r.Tokens != 2 {
		t.Fatalf("%+v", r)
	}
}

func TestSSEReader(t *testing.T) {
	in := ": hello\r\n\r\ndata: a\r\ndata: b\r\n\r\nevent: x\n\n" +
		"data: c\rdata:d\r\r" + ":c\n" + "data\n\n" + "data: last"
	s := newSSEReader(strings.NewReader(in))
	var got []string
	for {
		d, err := s.Next()
		if err != nil {
			break
		}
		got = append(got, string(d))
	}
	want := []string{"a\nb", "c\nd", "", "last"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	if s.comments != 2 {
		t.Errorf("comments %d, want 2", s.comments)
	}
	// A long line crosses the buffer boundary intact.
	long := strings.Repeat("x", 200<<10)
	s = newSSEReader(strings.NewReader("data: " + long + "\n\n"))
	d, err := s.Next()
	if err != nil || string(d) != long {
		t.Errorf("long line: len %d err %v", len(d), err)
	}
}

func TestErrorsCounted(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		switch p {
		case "e500":
			return 500, nil
		case "e429":
			return 429, nil
		case "midstream":
			return 200, []step{{data: content("a")}, {data: `{"error":{"message":"worker died"}}`}}
		case "truncated":
			return 200, []step{{data: content("a")}, {data: content("b")}}
		case "garbage":
			return 200, []step{{data: "{not json"}}
		}
		return 200, standard(10*time.Millisecond, time.Millisecond, []string{"ok"}, 1)
	})
	cfg := f.config("ok", "e500", "e429", "ok", "midstream", "truncated", "garbage", "e429")
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Completed != 2 || res.Errors != 6 {
		t.Errorf("completed %d errors %d", res.Completed, res.Errors)
	}
	want := map[string]int{"500": 1, "429": 2, "stream": 3}
	if !reflect.DeepEqual(res.ErrorsByStatus, want) {
		t.Errorf("errors by status %v, want %v", res.ErrorsByStatus, want)
	}
	if r := res.Records[1]; r.Status != 500 || r.ErrorKind != "http" || !strings.Contains(r.Error, "fake 500") {
		t.Errorf("500 record %+v", r)
	}
	if r := res.Records[2]; r.Status != 429 {
		t.Errorf("429 record %+v", r)
	}
	if r := res.Records[4]; !strings.Contains(r.Error, "worker died") {
		t.Errorf("midstream record %+v", r)
	}
	if r := res.Records[5]; !strings.Contains(r.Error, "before [DONE]") {
		t.Errorf("truncated record %+v", r)
	}
	// Summaries only cover the successful requests.
	if res.ResponseMS.N != 2 || res.TTFTMS.N != 2 || res.TotalTokens != 2 {
		t.Errorf("summaries cover failures: %+v %+v tokens %d", res.ResponseMS, res.TTFTMS, res.TotalTokens)
	}
	var buf bytes.Buffer
	res.WriteTable(&buf)
	mustContain(t, buf.String(), "25% (2/8)", "6 (429×2, 500×1, stream×3)")
}

func TestTransportError(t *testing.T) {
	f := newFakeServer(t, nil)
	url := f.srv.URL
	f.srv.Close()
	res, err := Run(context.Background(), Config{URL: url, Prompts: []string{"a", "b"}, Chat: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 2 || res.ErrorsByStatus["transport"] != 2 {
		t.Errorf("%+v", res.ErrorsByStatus)
	}
}

func TestConcurrencyBounded(t *testing.T) {
	const N, C = 20, 4
	arrivals := make(chan struct{})
	release := make(chan struct{})
	left := make(chan struct{})
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, standard(time.Millisecond, time.Millisecond, []string{"a", "b"}, 2)
	})
	f.gate = func(*http.Request) {
		arrivals <- struct{}{}
		<-release
	}
	f.onLeave = func() { left <- struct{}{} }
	// Coordinator: let one request finish only when C of them (or all that
	// remain) are in flight, so the bound is reached deterministically and
	// a client that exceeded it would push the fake's maximum above C.
	coordDone := make(chan struct{})
	go func() {
		defer close(coordDone)
		inflight, done := 0, 0
		for done < N {
			for inflight < min(C, N-done) {
				<-arrivals
				inflight++
			}
			release <- struct{}{}
			<-left
			inflight--
			done++
		}
	}()
	cfg := f.config(promptsN(7, func(i int) string { return string(rune('a' + i)) })...)
	cfg.Requests = N
	cfg.Concurrency = C
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	<-coordDone
	if res.Completed != N || len(res.Records) != N {
		t.Fatalf("completed %d of %d", res.Completed, len(res.Records))
	}
	if m := f.maxInflight(); m != C {
		t.Errorf("max in flight %d, want %d", m, C)
	}
	// Prompts are used round-robin.
	for _, r := range res.Records {
		if r.Prompt != r.Index%7 {
			t.Errorf("record %d used prompt %d", r.Index, r.Prompt)
		}
	}
}

func TestCancel(t *testing.T) {
	arrived := make(chan struct{}, 1)
	f := newFakeServer(t, func(p string) (int, []step) {
		return 200, standard(time.Millisecond, time.Millisecond, []string{"a"}, 1)
	})
	f.gate = func(r *http.Request) { arrived <- struct{}{}; <-r.Context().Done() }
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-arrived; cancel() }()
	cfg := f.config("a", "b", "c")
	res, err := Run(ctx, cfg)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
	if res == nil || len(res.Records) != 1 || res.Records[0].ErrorKind != "canceled" {
		t.Fatalf("%+v", res)
	}
}

func TestTimeout(t *testing.T) {
	f := newFakeServer(t, nil)
	f.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	cfg := f.config("a")
	cfg.now = time.Now
	cfg.Timeout = 20 * time.Millisecond
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 1 || res.Records[0].ErrorKind != "timeout" || res.ErrorsByStatus["timeout"] != 1 {
		t.Errorf("%+v", res.Records[0])
	}
}

func TestProgress(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		if p == "bad" {
			return 500, nil
		}
		return 200, standard(10*time.Millisecond, 10*time.Millisecond, []string{"a", "b"}, 5)
	})
	var buf bytes.Buffer
	cfg := f.config("a", "bad", "c")
	cfg.Progress = &buf
	if _, err := Run(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if !strings.HasPrefix(out, "\r") || !strings.HasSuffix(out, "\n") || strings.Count(out, "\n") != 1 {
		t.Errorf("not a single redrawn line: %q", out)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\r")
	last := strings.TrimSpace(lines[len(lines)-1])
	mustContain(t, last, "[########################]", "3/3", "errors 1", "tok/s")
	// 10 tokens over the fake 40 ms of the two good requests (+0 for the 500).
	mustContain(t, last, "250.0 tok/s")
}

func TestPercentiles(t *testing.T) {
	xs := []float64{10, 1, 9, 2, 8, 3, 7, 4, 6, 5}
	s := Summarize(xs)
	// Reference values: numpy.percentile(range(1, 11), [50, 95, 99]),
	// numpy.std(range(1, 11)).
	if s.N != 10 || !near(s.Mean, 5.5) || !near(s.Median, 5.5) || !near(s.P95, 9.55) || !near(s.P99, 9.91) ||
		s.Min != 1 || s.Max != 10 || !near(s.StdDev, math.Sqrt(8.25)) {
		t.Errorf("%+v", s)
	}
	if xs[0] != 10 {
		t.Error("Summarize sorted its input")
	}
	if (Summarize(nil) != Summary{}) {
		t.Error("empty")
	}
	one := Summarize([]float64{3})
	if one.P99 != 3 || one.Median != 3 || one.StdDev != 0 {
		t.Errorf("%+v", one)
	}
	ys := make([]float64, 50)
	for i := range ys {
		ys[i] = float64(i * i)
	}
	// numpy.percentile([i*i for i in range(50)], [95, 99]) = 2167.15, 2353.47
	if p := Percentile(ys, 95); math.Abs(p-2167.15) > 1e-9 {
		t.Errorf("p95 %v", p)
	}
	if p := Percentile(ys, 99); math.Abs(p-2353.47) > 1e-9 {
		t.Errorf("p99 %v", p)
	}
	if Percentile(ys, 0) != 0 || Percentile(ys, 100) != 2401 {
		t.Error("bounds")
	}
}

func sample(name string, e2e, ttft, tps []float64, wall float64) *Result {
	r := &Result{Schema: SchemaVersion, Name: name, Run: RunInfo{Engine: "http", Concurrency: 1, Requests: len(e2e), MaxTokens: 50}}
	for i := range e2e {
		r.Records = append(r.Records, Record{Index: i, E2EMS: e2e[i], TTFTMS: ttft[i], TokPerS: tps[i], Tokens: 50, Chunks: 50, GapsMS: []float64{6, 7}})
	}
	r.WallMS = wall
	r.finalize()
	return r
}

func TestCompareAndTable(t *testing.T) {
	base := sample("mlx-engine (baseline)", []float64{400, 410}, []float64{90, 100}, []float64{125, 120}, 810)
	cand := sample("krserve", []float64{410, 420}, []float64{100, 110}, []float64{120, 115}, 830)
	var buf bytes.Buffer
	Compare(&buf, base, cand, [2]string{})
	out := buf.String()
	mustContain(t, out,
		"| Metric | krserve | mlx-engine (baseline) | Speedup | Overhead |",
		"| **Mean** | 415.00 ms | 405.00 ms | 0.976x | +2.5% |", // response
		"| **Mean** | 105.00 ms | 95.00 ms | 0.905x | +10.5% |", // TTFT
		"| **Mean** | 117.50 tok/s | 122.50 tok/s | 0.959x | -4.1% |",
		"| **Std Dev** | 5.00 ms | 5.00 ms | - | +0.0% |",
		"| krserve | 0.83 s | 100% (2/2) | 100 |",
		"| **Difference** | **+0.02 s** | **+0** | **+0** |",
		"| **Speedup** | **0.976x** |",
	)
	buf.Reset()
	Compare(&buf, base, cand, [2]string{"in-process", "mlx_lm.server"})
	mustContain(t, buf.String(), "## mlx_lm.server vs in-process")

	buf.Reset()
	cand.WriteTable(&buf)
	mustContain(t, buf.String(), "## krserve", "| **P99** | 419.90 ms | 109.90 ms |", "| 0.83 s | 100% (2/2) | 0 | 100 | 120.48 | 2.41 |")
}

func TestJSONRoundTrip(t *testing.T) {
	f := newFakeServer(t, func(p string) (int, []step) {
		if p == "bad" {
			return 429, nil
		}
		return 200, standard(10*time.Millisecond, 3*time.Millisecond, []string{"a", "b", "c"}, 3)
	})
	seed := 1
	cfg := f.config("a", "bad")
	cfg.Seed = &seed
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	res.Name = "x"
	p := filepath.Join(t.TempDir(), "r.json")
	if err := res.WriteJSON(p); err != nil {
		t.Fatal(err)
	}
	back, err := ReadResult(p)
	if err != nil {
		t.Fatal(err)
	}
	if !back.StartedAt.Equal(res.StartedAt) {
		t.Errorf("started_at %v vs %v", back.StartedAt, res.StartedAt)
	}
	back.StartedAt = res.StartedAt
	if !reflect.DeepEqual(back, res) {
		t.Errorf("round trip differs:\n%+v\n%+v", back, res)
	}
}

// TestInprocessSchema reads a result written by scripts/bench/inprocess.py
// and checks that Go recomputes the very summaries Python stored: the two
// sides share the schema and the statistics (percentiles, std dev).
func TestInprocessSchema(t *testing.T) {
	r, err := ReadResult(filepath.Join("testdata", "inprocess.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Run.Engine != "inprocess" || len(r.Records) != 5 || r.Completed != 5 || r.StartedAt.IsZero() {
		t.Fatalf("%+v", r.Run)
	}
	stored := *r
	r.finalize()
	pairs := []struct {
		name    string
		got, py Summary
	}{
		{"response", r.ResponseMS, stored.ResponseMS},
		{"ttft", r.TTFTMS, stored.TTFTMS},
		{"tok/s", r.ReqTokPerS, stored.ReqTokPerS},
		{"itl", r.ITLMS, stored.ITLMS},
	}
	for _, p := range pairs {
		g, w := summaryRows(p.got), summaryRows(p.py)
		if p.got.N != p.py.N || p.got.N == 0 {
			t.Errorf("%s: n %d vs %d", p.name, p.got.N, p.py.N)
		}
		for i := range g {
			if math.Abs(g[i]-w[i]) > 1e-9*math.Max(1, math.Abs(w[i])) {
				t.Errorf("%s %s: go %v, python %v", p.name, rowNames[i], g[i], w[i])
			}
		}
	}
	if math.Abs(r.TokPerS-stored.TokPerS) > 1e-9 || r.TotalTokens != stored.TotalTokens {
		t.Errorf("aggregate: go %v %d, python %v %d", r.TokPerS, r.TotalTokens, stored.TokPerS, stored.TotalTokens)
	}
	var buf bytes.Buffer
	Compare(&buf, &stored, &stored, [2]string{})
	mustContain(t, buf.String(), "in-process mlx-lm (baseline)", "| 1.000x | +0.0% |")
}
