package scheduler

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Test harness: a scheduler running inside a synctest bubble (fake time) and
// fake workers that decode and record every batch of frames they are sent.
// Nothing here sleeps in real time; time.Sleep inside the bubble only moves
// the fake clock once every goroutine of the bubble is blocked.

// sendRec is one Send call as the worker saw it.
type sendRec struct {
	at   time.Time
	msgs []ipc.Message
}

// fakeWorker is a Backend that decodes the frames it receives.
type fakeWorker struct {
	t  *testing.T
	id int

	mu    sync.Mutex
	sends []sendRec
	fail  error // returned by Send when set (the frames are still recorded)
}

func (w *fakeWorker) Send(frames []byte) error {
	rec := sendRec{at: time.Now()}
	rd := bytes.NewReader(frames)
	for {
		body, err := ipc.ReadFrame(rd, nil)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			w.t.Errorf("worker %d: bad frames from the scheduler: %v", w.id, err)
			break
		}
		var m ipc.Message
		if err := ipc.Decode(body, &m); err != nil {
			w.t.Errorf("worker %d: undecodable frame: %v", w.id, err)
			break
		}
		rec.msgs = append(rec.msgs, m)
	}
	if len(rec.msgs) == 0 {
		w.t.Errorf("worker %d: Send with no frames", w.id)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sends = append(w.sends, rec)
	return w.fail
}

func (w *fakeWorker) setFail(err error) {
	w.mu.Lock()
	w.fail = err
	w.mu.Unlock()
}

// Sends returns a copy of every Send so far.
func (w *fakeWorker) Sends() []sendRec {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.sends)
}

// frames returns every frame of type typ, in the order sent.
func (w *fakeWorker) frames(typ string) []ipc.Message {
	var out []ipc.Message
	for _, s := range w.Sends() {
		for _, m := range s.msgs {
			if m.T == typ {
				out = append(out, m)
			}
		}
	}
	return out
}

func (w *fakeWorker) gens() []ipc.Message { return w.frames(ipc.TGen) }

func (w *fakeWorker) genIDs() []uint64 {
	var ids []uint64
	for _, m := range w.gens() {
		ids = append(ids, m.ID)
	}
	return ids
}

func (w *fakeWorker) cancelIDs() []uint64 {
	var ids []uint64
	for _, m := range w.frames(ipc.TCancel) {
		ids = append(ids, m.ID)
	}
	return ids
}

type harness struct {
	t       *testing.T
	s       *Scheduler
	m       *metrics.Metrics
	start   time.Time
	workers map[int]*fakeWorker
	nextID  uint64
}

// newHarness starts a scheduler with batch size b (auto-tuning off) and the
// default 2 ms window; mod may change the config. Call it inside
// synctest.Test.
func newHarness(t *testing.T, b int, mod func(*Config)) *harness {
	t.Helper()
	h := newHarnessNoRun(t, b, mod)
	h.run()
	return h
}

// newHarnessNoRun is newHarness without Run: call h.run to start it.
func newHarnessNoRun(t *testing.T, b int, mod func(*Config)) *harness {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Tune.Enabled = false
	cfg.Tune.Min, cfg.Tune.Max, cfg.Tune.Initial = 1, max(b, 8), b
	if mod != nil {
		mod(&cfg)
	}
	m := metrics.New(metrics.ModelInfo{Model: "t"}, metrics.BuildInfo{})
	st := metrics.NewStats(time.Now)
	h := &harness{t: t, s: New(cfg, m, st), m: m, start: time.Now(), workers: map[int]*fakeWorker{}}
	if got := h.s.tune.B(); got != b {
		t.Fatalf("B = %d, want %d", got, b)
	}
	return h
}

// run starts the scheduler's Run loop, stopped at the end of the test.
func (h *harness) run() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := h.s.Run(ctx); err != nil {
			h.t.Errorf("Run: %v", err)
		}
	}()
	h.t.Cleanup(func() {
		cancel()
		<-done
	})
	synctest.Wait()
}

// elapsed is the fake time since the harness started.
func (h *harness) elapsed() time.Duration { return time.Since(h.start) }

// advance moves fake time by d and lets the scheduler settle.
func (h *harness) advance(d time.Duration) {
	time.Sleep(d)
	synctest.Wait()
}

func (h *harness) addWorker(id int) *fakeWorker {
	return h.addWorkerInfo(id, WorkerInfo{PromptCache: true})
}

// addWorkerInfo adds a worker whose hello said info.
func (h *harness) addWorkerInfo(id int, info WorkerInfo) *fakeWorker {
	w := &fakeWorker{t: h.t, id: id}
	h.workers[id] = w
	h.s.AddWorker(id, w, info)
	synctest.Wait()
	return w
}

// req builds a request with a fresh id, a prompt of n tokens and maxTokens.
func (h *harness) req(n, maxTokens int) *Request {
	h.nextID++
	prompt := make([]int32, n)
	for i := range prompt {
		prompt[i] = int32(i + 1)
	}
	return NewRequest(h.nextID, prompt, Params{MaxTokens: maxTokens})
}

// submit admits a new request (prompt of 4 tokens, max_tokens 16) and lets
// the scheduler settle.
func (h *harness) submit() *Request {
	h.t.Helper()
	r := h.req(4, 16)
	h.mustSubmit(r)
	return r
}

func (h *harness) mustSubmit(r *Request) {
	h.t.Helper()
	if err := h.s.Submit(r); err != nil {
		h.t.Fatalf("Submit(%d): %v", r.ID, err)
	}
	synctest.Wait()
}

// deliver hands the scheduler a frame from worker wid and expects it to be
// accepted.
func (h *harness) deliver(wid int, m *ipc.Message) {
	h.t.Helper()
	if err := h.s.Deliver(wid, m); err != nil {
		h.t.Fatalf("Deliver(%d, %s id=%d): %v", wid, m.T, m.ID, err)
	}
	synctest.Wait()
}

func (h *harness) tok(wid int, r *Request, text string, ids ...int32) {
	h.t.Helper()
	h.deliver(wid, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: ids, Text: text})
}

func (h *harness) done(wid int, r *Request, reason string) {
	h.t.Helper()
	h.deliver(wid, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: reason, PToks: len(r.Prompt)})
}

func (h *harness) crash(wid int) {
	h.s.RemoveWorker(wid, "signal: segmentation fault")
	synctest.Wait()
}

// ownerOf names the worker(s) that were sent a gen frame for r.
func (h *harness) ownerOf(r *Request) []int {
	var ids []int
	for id, w := range h.workers {
		if slices.Contains(w.genIDs(), r.ID) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// events drains r's pending events.
func events(r *Request) []Event {
	var evs []Event
	for {
		e, ok := r.Poll()
		if !ok {
			return evs
		}
		evs = append(evs, e)
	}
}

func textOf(evs []Event) string {
	var b []byte
	for _, e := range evs {
		b = append(b, e.Text...)
	}
	return string(b)
}

// wantFailed checks that evs ends the request with an *Error of reason.
func wantFailed(t *testing.T, r *Request, evs []Event, reason string) *Error {
	t.Helper()
	if len(evs) == 0 {
		t.Fatalf("request %d: no events, want a %s failure", r.ID, reason)
	}
	last := evs[len(evs)-1]
	if !last.Done {
		t.Fatalf("request %d: last event %+v is not Done", r.ID, last)
	}
	var e *Error
	if !errors.As(last.Err, &e) {
		t.Fatalf("request %d: Done with err %v, want *Error %s", r.ID, last.Err, reason)
	}
	if e.Reason != reason {
		t.Fatalf("request %d: failed with reason %q (%v), want %q", r.ID, e.Reason, e, reason)
	}
	for _, ev := range evs[:len(evs)-1] {
		if ev.Done {
			t.Fatalf("request %d: more than one Done event: %+v", r.ID, evs)
		}
	}
	return e
}

// wantRefused checks that err is an *Error with reason and a Retry-After of
// at least a second.
func wantRefused(t *testing.T, err error, reason string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("Submit: %v, want *Error %s", err, reason)
	}
	if e.Reason != reason {
		t.Fatalf("Submit refused with %q (%v), want %q", e.Reason, e, reason)
	}
	if e.RetryAfter < time.Second {
		t.Fatalf("Retry-After %v, want at least 1s", e.RetryAfter)
	}
	if !strings.HasPrefix(e.Error(), reason+": ") || e.Msg == "" {
		t.Fatalf("error text %q", e.Error())
	}
	return e
}

// metricValue reads a counter, gauge or histogram (its sample count and sum).
func metricValue(t *testing.T, c prometheus.Metric) (value float64, count uint64) {
	t.Helper()
	var d dto.Metric
	if err := c.Write(&d); err != nil {
		t.Fatal(err)
	}
	switch {
	case d.Counter != nil:
		return d.Counter.GetValue(), 0
	case d.Gauge != nil:
		return d.Gauge.GetValue(), 0
	case d.Histogram != nil:
		return d.Histogram.GetSampleSum(), d.Histogram.GetSampleCount()
	}
	t.Fatalf("unsupported metric %v", c.Desc())
	return 0, 0
}

func counter(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	v, _ := metricValue(t, c)
	return v
}

// noPanic runs f and turns a panic into a test failure.
func noPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("%s panicked: %v", what, p)
		}
	}()
	f()
}
