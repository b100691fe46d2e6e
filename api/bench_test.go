package api

// BenchmarkFrontDoor: the supervisor's CPU per request with a worker that
// answers instantly. The real Server and scheduler serve chat requests from an
// in-process HTTP client (keep-alive); the fake worker does its IPC through
// the ipc codec as the real process and reader do (gen frame out, carrying
// the chat messages; tok and done frames in, each decoded from its bytes), so
// only the pipes and the worker's own work (tokenizing too) are missing.
//
// cpu-µs/req is the whole process's CPU (getrusage: every goroutine, GC, the
// client and the fake worker included) per request. server=trivial replays the
// bytes krserve answered from a handler that does nothing else: it is the
// client's and net/http's share (both ends of the connection), so
// krserve - trivial estimates the front door's own cost (JSON, validation,
// scheduler, IPC, SSE encoding), net/http's server side excluded.
//
//	go test -run '^$' -bench FrontDoor -count 6 ./api | benchstat -col /server -

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

const benchPromptTokens = 64

// benchPool is a pool whose workers are all up.
type benchPool struct{ hello *supervisor.Hello }

func newBenchPool() *benchPool {
	return &benchPool{hello: &supervisor.Hello{Model: "/m/bench", Context: 8192, Vocab: 49152, EOS: []int32{2}}}
}

func (p *benchPool) Hello() *supervisor.Hello { return p.hello }
func (p *benchPool) CanServe() bool           { return true }

type benchOps struct{}

func (benchOps) Ready() (bool, any) { return true, nil }
func (benchOps) Stats() any         { return nil }

// benchWorker answers every gen with toks tok frames and a done, at once.
type benchWorker struct {
	id    int
	toks  int
	sched *scheduler.Scheduler
	in    chan []byte
	errs  chan error
}

// Send runs under the scheduler's mutex: hand the frames to the worker's
// goroutine.
func (w *benchWorker) Send(frames []byte) error {
	select {
	case w.in <- frames:
		return nil
	default:
		return errors.New("instant worker: inbox full")
	}
}

func (w *benchWorker) run(ctx context.Context) {
	var stream []byte
	for {
		var frames []byte
		select {
		case frames = <-w.in:
		case <-ctx.Done():
			return
		}
		err := benchReadFrames(frames, func(m *ipc.Message) error {
			if m.T != ipc.TGen {
				return nil // cancel: every request is already done
			}
			var err error
			stream = stream[:0]
			tok := &ipc.Message{T: ipc.TTok, ID: m.ID, IDs: []int32{4242}, Text: " tok"}
			for range w.toks {
				if stream, err = ipc.AppendMessage(stream, tok); err != nil {
					return err
				}
			}
			done := &ipc.Message{T: ipc.TDone, ID: m.ID, Reason: "length", PToks: benchPromptTokens, CToks: w.toks}
			if stream, err = ipc.AppendMessage(stream, done); err != nil {
				return err
			}
			// The supervisor's side: what Process.readLoop and the pool do
			// with the worker's output.
			return benchReadFrames(stream, func(m *ipc.Message) error { return w.sched.Deliver(w.id, m) })
		})
		if err != nil {
			select {
			case w.errs <- err:
			default:
			}
		}
	}
}

// benchReadFrames decodes frames as Process.readLoop does: one reused frame
// buffer and one reused Message.
func benchReadFrames(frames []byte, onMsg func(*ipc.Message) error) error {
	r := bytes.NewReader(frames)
	var buf []byte
	m := new(ipc.Message)
	for {
		body, err := ipc.ReadFrame(r, buf)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		buf = body[:0]
		if err := ipc.Decode(body, m); err != nil {
			return err
		}
		if err := onMsg(m); err != nil {
			return err
		}
	}
}

// benchFrontDoor is a krserve front door with one instant worker.
type benchFrontDoor struct {
	srv    *httptest.Server
	worker *benchWorker
	stop   func()
}

func newBenchFrontDoor(toks, conc int) *benchFrontDoor {
	m := metrics.New(metrics.ModelInfo{Model: "bench"}, metrics.BuildInfo{})
	cfg := scheduler.DefaultConfig()
	cfg.Tune.Initial, cfg.Tune.Max = max(32, conc), max(32, conc)
	sched := scheduler.New(cfg, m, metrics.NewStats(time.Now))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = sched.Run(ctx) }()
	w := &benchWorker{id: 1, toks: toks, sched: sched, in: make(chan []byte, 4096), errs: make(chan error, 1)}
	go func() { defer wg.Done(); w.run(ctx) }()
	sched.AddWorker(1, w, scheduler.WorkerInfo{PromptCache: true})
	acfg := DefaultConfig()
	acfg.ModelName = "bench"
	var ids atomic.Uint64
	front := New(acfg, sched, newBenchPool(), benchOps{}, m, slog.New(slog.DiscardHandler), func() uint64 { return ids.Add(1) })
	srv := httptest.NewServer(front.Handler())
	return &benchFrontDoor{srv: srv, worker: w, stop: func() { srv.Close(); cancel(); wg.Wait() }}
}

// benchReplay serves a recorded answer, flushed as serveStream flushes it
// when every token is ready at once: the first event (after the headers)
// flushed, the rest written when the handler returns. A JSON answer is one write.
func benchReplay(contentType string, events [][]byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(200)
		for i, e := range events {
			_, _ = w.Write(e)
			if i == 0 && len(events) > 1 {
				_ = http.NewResponseController(w).Flush()
			}
		}
	}
}

func BenchmarkFrontDoor(b *testing.B) {
	for _, stream := range []bool{false, true} {
		for _, toks := range []int{16, 128} {
			for _, conc := range []int{1, 16} {
				mode := "json"
				if stream {
					mode = "stream"
				}
				body := fmt.Sprintf(`{"model":"bench","messages":[{"role":"user","content":"Say something."}],"max_tokens":%d,"stream":%t}`, toks, stream)
				fd := newBenchFrontDoor(toks, conc)
				client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conc, DisableCompression: true}}
				answer := benchCheck(b, client, fd.srv.URL, body, toks, stream)
				events := [][]byte{answer}
				if stream {
					events = bytes.SplitAfter(answer, []byte("\n\n"))
				}
				trivial := httptest.NewServer(benchReplay(map[bool]string{false: "application/json", true: "text/event-stream"}[stream], events))
				for _, srv := range []struct {
					name string
					url  string
				}{{"krserve", fd.srv.URL}, {"trivial", trivial.URL}} {
					b.Run(fmt.Sprintf("mode=%s/tok=%d/c=%d/server=%s", mode, toks, conc, srv.name), func(b *testing.B) {
						benchDrive(b, client, srv.url, body, conc)
					})
				}
				client.CloseIdleConnections()
				trivial.Close()
				fd.stop()
				select {
				case err := <-fd.worker.errs:
					b.Fatal(err)
				default:
				}
			}
		}
	}
}

// benchCheck sends one request and returns the answer after checking it.
func benchCheck(b *testing.B, client *http.Client, url, body string, toks int, stream bool) []byte {
	resp, err := client.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	answer, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		b.Fatalf("status %d, %v: %s", resp.StatusCode, err, answer)
	}
	want := strings.Repeat(" tok", toks)
	if stream {
		if n := bytes.Count(answer, []byte(`"content":" tok"`)); n != toks || !bytes.HasSuffix(answer, []byte("data: [DONE]\n\n")) {
			b.Fatalf("%d tok chunks, want %d:\n%s", n, toks, answer)
		}
	} else if !bytes.Contains(answer, []byte(`"content":"`+want+`"`)) {
		b.Fatalf("answer without the %d tokens:\n%s", toks, answer)
	}
	return answer
}

// benchDrive sends b.N requests from conc clients, each with one in flight.
func benchDrive(b *testing.B, client *http.Client, url, body string, conc int) {
	var next atomic.Int64
	var failed atomic.Pointer[error]
	var wg sync.WaitGroup
	b.ResetTimer()
	t0, cpu0 := time.Now(), benchCPUTime(b)
	for range conc {
		wg.Go(func() {
			buf := make([]byte, 32<<10)
			for next.Add(1) <= int64(b.N) {
				resp, err := client.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(body))
				if err == nil {
					_, err = io.CopyBuffer(io.Discard, resp.Body, buf)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Store(&err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed, cpu := time.Since(t0), benchCPUTime(b)-cpu0
	b.StopTimer()
	if err := failed.Load(); err != nil {
		b.Fatal(*err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/1000, "cpu-µs/req")
}

// benchCPUTime is the CPU (user+system) this process has used, every thread.
func benchCPUTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkDecodeChat: decoding and validating a typical chat body, the
// largest krserve-specific cost of a request on the front door.
func BenchmarkDecodeChat(b *testing.B) {
	body := []byte(`{"model":"default","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"max_tokens":50,"temperature":0,"stream":true}`)
	b.ReportAllocs()
	for b.Loop() {
		var req chatRequest
		if e := decodeJSON(body, &req); e != nil {
			b.Fatal(e.Message)
		}
		if _, e := parseMessages(req.Messages); e != nil {
			b.Fatal(e.Message)
		}
	}
}
