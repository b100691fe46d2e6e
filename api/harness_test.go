package api

// Test harness: the real scheduler, fake workers that speak the gen/cancel
// frames through Backend.Send and answer through Scheduler.Deliver from their
// own goroutines, a fake pool and fake ops, served with httptest.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// Magic prompt texts the fakes react to.
const (
	magicTemplateInvalid = "template-invalid" // worker: error frame, code invalid_prompt, as for a chat template's refusal
	magicWorkerSilent    = "worker-silent"    // worker: takes the request and never answers until cancelled
	magicWorkerInvalid   = "worker-invalid"   // worker: error frame, code invalid
	magicWorkerInternal  = "worker-internal"
	magicCached          = "cache-hit" // worker: done reports all but the prompt's last token as cached
)

// fakeCached is what the fake worker reports as taken from its prompt cache.
func fakeCached(m *ipc.Message) int {
	hit := strings.Contains(m.Text, magicCached)
	for _, cm := range m.Messages {
		hit = hit || strings.Contains(cm.Content, magicCached)
	}
	if !hit {
		return 0
	}
	return len(m.Prompt) + len(m.Resume) - 1
}

// ---------------------------------------------------------------- fake pool

type fakePool struct {
	mu      sync.Mutex
	hello   *supervisor.Hello
	noServe bool // CanServe is false: every worker has failed
}

func tinyHello() *supervisor.Hello {
	return &supervisor.Hello{Model: "/m/tiny", Context: 64, Vocab: 1000, EOS: []int32{2}}
}

func (p *fakePool) Hello() *supervisor.Hello {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hello
}

func (p *fakePool) CanServe() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.noServe
}

func (p *fakePool) setHello(h *supervisor.Hello) {
	p.mu.Lock()
	p.hello = h
	p.mu.Unlock()
}

func (p *fakePool) setNoServe(v bool) {
	p.mu.Lock()
	p.noServe = v
	p.mu.Unlock()
}

// fakeTokenize is the fake worker's tokenizer, deterministic: a completion
// prompt is its bytes; a chat is, per message, a marker token (1) followed by
// the bytes of its content.
func fakeTokenize(m *ipc.Message) []int32 {
	if m.Messages == nil {
		return appendBytes(nil, m.Text)
	}
	var ids []int32
	for _, cm := range m.Messages {
		ids = append(ids, 1)
		ids = appendBytes(ids, cm.Content)
	}
	return ids
}

func appendBytes(ids []int32, s string) []int32 {
	for i := 0; i < len(s); i++ {
		ids = append(ids, int32(s[i]))
	}
	return ids
}

// ----------------------------------------------------------------- fake ops

type fakeOps struct{ ready atomic.Bool }

func (o *fakeOps) Ready() (bool, any) {
	if o.ready.Load() {
		return true, map[string]any{"status": "ready"}
	}
	return false, map[string]any{"status": "starting"}
}

func (o *fakeOps) Stats() any { return map[string]any{"requests": 0} }

// -------------------------------------------------------------- fake worker

// workerConfig scripts a fake worker. Token i of a request has the text
// "w<i> " (i counts across resumes) and the id 3+i%900.
type workerConfig struct {
	tokens     int           // finish with "stop" once this many tokens exist (0: run to max_tokens, "length")
	stallAfter int           // >0: emit no more than this many tokens per dispatch, then wait for a cancel
	crashAfter int           // >0: after this many tokens of a dispatch the worker dies (RemoveWorker)
	pace       time.Duration // >0: one token per request per pace
	hold       chan struct{} // non-nil: no token at all until it is closed
	onGen      func(m *ipc.Message)
	cutCall    bool // the done says the output ended inside a tool call that is not whole
	ctx        int  // the model's context, checked as krserve_worker does (the harness sets it from its hello)
}

type genState struct {
	m       ipc.Message
	next    int // index of the next token (counts resumed tokens)
	emitted int // tokens emitted by this dispatch
	silent  bool
}

type fakeWorker struct {
	id    int
	cfg   workerConfig
	sched *scheduler.Scheduler

	mu      sync.Mutex
	inbox   [][]byte
	active  map[uint64]*genState
	gens    map[uint64]int // gen frames received, per request
	cancels map[uint64]int // cancel frames received, per request
	errs    []error
	dead    bool

	wake chan struct{}
	quit chan struct{}
	done chan struct{}
}

func newFakeWorker(id int, cfg workerConfig, s *scheduler.Scheduler) *fakeWorker {
	w := &fakeWorker{id: id, cfg: cfg, sched: s, active: map[uint64]*genState{}, gens: map[uint64]int{}, cancels: map[uint64]int{},
		wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	go w.loop()
	return w
}

// Send is called by the scheduler with its mutex held: queue and return.
func (w *fakeWorker) Send(frames []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.dead {
		return errors.New("worker is dead")
	}
	w.inbox = append(w.inbox, slices.Clone(frames))
	select {
	case w.wake <- struct{}{}:
	default:
	}
	return nil
}

func (w *fakeWorker) stop() {
	close(w.quit)
	<-w.done
}

func (w *fakeWorker) fail(err error) {
	w.mu.Lock()
	w.errs = append(w.errs, err)
	w.mu.Unlock()
}

// snapshot returns copies of the bookkeeping.
func (w *fakeWorker) snapshot() (active int, gens, cancels map[uint64]int, errs []error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.active), maps(w.gens), maps(w.cancels), slices.Clone(w.errs)
}

func maps(m map[uint64]int) map[uint64]int {
	out := make(map[uint64]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (w *fakeWorker) deliver(m *ipc.Message) {
	if err := w.sched.Deliver(w.id, m); err != nil {
		w.fail(fmt.Errorf("worker %d: Deliver(%s %d): %w", w.id, m.T, m.ID, err))
	}
}

func (w *fakeWorker) loop() {
	defer close(w.done)
	hold := w.cfg.hold
	var tick <-chan time.Time
	if w.cfg.pace > 0 {
		t := time.NewTicker(w.cfg.pace)
		defer t.Stop()
		tick = t.C
	}
	canEmit := false
	for {
		if canEmit && tick == nil {
			select {
			case <-w.quit:
				return
			default:
			}
		} else {
			select {
			case <-w.quit:
				return
			case <-w.wake:
			case <-hold:
				hold = nil
			case <-tick:
			}
		}
		if hold != nil {
			select {
			case <-hold:
				hold = nil
			default:
			}
		}
		w.mu.Lock()
		inbox := w.inbox
		w.inbox = nil
		w.mu.Unlock()
		for _, frames := range inbox {
			w.handle(frames)
		}
		canEmit = false
		if hold != nil {
			continue
		}
		if w.cfg.pace > 0 && len(inbox) > 0 {
			// New work arrived: wait for the next tick before emitting.
			w.mu.Lock()
			canEmit = len(w.active) > 0
			w.mu.Unlock()
			continue
		}
		crashed := w.emit()
		if crashed {
			return
		}
		w.mu.Lock()
		for _, st := range w.active {
			if !st.silent && (w.cfg.stallAfter == 0 || st.emitted < w.cfg.stallAfter) {
				canEmit = true
			}
		}
		w.mu.Unlock()
	}
}

func (w *fakeWorker) handle(frames []byte) {
	r := bytes.NewReader(frames)
	for {
		body, err := ipc.ReadFrame(r, nil)
		if err == io.EOF {
			return
		}
		if err != nil {
			w.fail(fmt.Errorf("worker %d: %w", w.id, err))
			return
		}
		var m ipc.Message
		if err := ipc.Decode(body, &m); err != nil {
			w.fail(fmt.Errorf("worker %d: %w", w.id, err))
			return
		}
		switch m.T {
		case ipc.TGen:
			if w.cfg.onGen != nil {
				w.cfg.onGen(&m)
			}
			w.mu.Lock()
			w.gens[m.ID]++
			if w.active[m.ID] != nil {
				w.errs = append(w.errs, fmt.Errorf("worker %d: gen for active request %d", w.id, m.ID))
			}
			if m.Prompt == nil {
				m.Prompt = fakeTokenize(&m)
			}
			prompt, n := promptText(m.Prompt), len(m.Prompt)+len(m.Resume)
			if w.cfg.ctx > 0 {
				m.MaxTokens = min(m.MaxTokens, w.cfg.ctx-n)
			}
			var errFrame *ipc.Message
			switch {
			case len(m.Prompt) == 0:
				errFrame = &ipc.Message{T: ipc.TError, ID: m.ID, Code: scheduler.CodeInvalidPrompt, Msg: "the prompt is empty after tokenization"}
			case w.cfg.ctx > 0 && n >= w.cfg.ctx:
				errFrame = &ipc.Message{T: ipc.TError, ID: m.ID, Code: scheduler.CodeContextLength,
					Msg: fmt.Sprintf("This model's maximum context length is %d tokens. However, your prompt has %d tokens.", w.cfg.ctx, n)}
			case strings.Contains(prompt, magicTemplateInvalid):
				errFrame = &ipc.Message{T: ipc.TError, ID: m.ID, Code: scheduler.CodeInvalidPrompt, Msg: "chat template refused the messages"}
			case strings.Contains(prompt, magicWorkerInvalid):
				errFrame = &ipc.Message{T: ipc.TError, ID: m.ID, Code: "invalid", Msg: "top_k must be >= 0"}
			case strings.Contains(prompt, magicWorkerInternal):
				errFrame = &ipc.Message{T: ipc.TError, ID: m.ID, Code: "internal", Msg: "metal says no"}
			case m.MaxTokens < 1:
				w.errs = append(w.errs, fmt.Errorf("worker %d: gen %d with max_tokens %d", w.id, m.ID, m.MaxTokens))
			default:
				w.active[m.ID] = &genState{m: m, next: len(m.Resume), silent: strings.Contains(prompt, magicWorkerSilent)}
			}
			w.mu.Unlock()
			if errFrame != nil {
				w.deliver(errFrame)
			}
		case ipc.TCancel:
			w.mu.Lock()
			w.cancels[m.ID]++
			st := w.active[m.ID]
			delete(w.active, m.ID)
			w.mu.Unlock()
			if st != nil {
				w.deliver(&ipc.Message{T: ipc.TDone, ID: m.ID, Reason: "cancelled", PToks: len(st.m.Prompt) + len(st.m.Resume), CToks: st.next - len(st.m.Resume)})
			}
		default:
			w.fail(fmt.Errorf("worker %d: unexpected %q frame", w.id, m.T))
		}
	}
}

// addFakeLogprobs gives token i the logprob fakeLogprob(i), its text as its
// token, and top alternatives: itself, then "alt1".. with logprobs 1, 2.. lower.
func addFakeLogprobs(m *ipc.Message, i, top int) {
	lp := fakeLogprob(i)
	m.LPs, m.Toks = []float64{lp}, []string{m.Text}
	if top > 0 {
		lps, toks := []float64{lp}, []string{m.Text}
		for k := 1; k < top; k++ {
			lps, toks = append(lps, lp-float64(k)), append(toks, fmt.Sprintf("alt%d", k))
		}
		m.TopLPs, m.TopToks = [][]float64{lps}, [][]string{toks}
	}
}

func fakeLogprob(i int) float64 { return -0.25 * float64(1+i%4) }

func promptText(ids []int32) string {
	b := make([]byte, 0, len(ids))
	for _, id := range ids {
		if id < 256 {
			b = append(b, byte(id))
		}
	}
	return string(b)
}

// emit produces one token for every active request that may have one; it
// reports whether the worker crashed.
func (w *fakeWorker) emit() bool {
	w.mu.Lock()
	ids := make([]uint64, 0, len(w.active))
	for id := range w.active {
		ids = append(ids, id)
	}
	w.mu.Unlock()
	slices.Sort(ids)
	for _, id := range ids {
		w.mu.Lock()
		st := w.active[id]
		if st == nil || st.silent || (w.cfg.stallAfter > 0 && st.emitted >= w.cfg.stallAfter) {
			w.mu.Unlock()
			continue
		}
		i := st.next
		st.next++
		st.emitted++
		finish := ""
		switch {
		case w.cfg.tokens > 0 && st.next >= w.cfg.tokens:
			finish = "stop"
		case st.emitted >= st.m.MaxTokens:
			finish = "length"
		}
		crash := w.cfg.crashAfter > 0 && st.emitted >= w.cfg.crashAfter && finish == ""
		if finish != "" {
			delete(w.active, id)
		}
		w.mu.Unlock()
		tok := &ipc.Message{T: ipc.TTok, ID: id, IDs: []int32{int32(3 + i%900)}, Text: fmt.Sprintf("w%d ", i)}
		if st.m.Tools != "" && st.m.ToolChoice != "none" && i%2 == 1 {
			// A gen with tools: every odd token makes a call of the named (or
			// a fixed) function instead of adding text, in three entries as a
			// streamed call comes: its header, then two arguments fragments.
			k := i / 2
			tok.Text, tok.Calls = "", []ipc.ToolCall{{Index: k, Name: cmp.Or(st.m.ToolName, "f")},
				{Index: k, Arguments: `{"i":`}, {Index: k, Arguments: fmt.Sprintf(`%d}`, i)}}
		}
		if st.m.Logprobs {
			addFakeLogprobs(tok, i, st.m.TopLogprobs)
		}
		w.deliver(tok)
		if finish != "" {
			w.deliver(&ipc.Message{T: ipc.TDone, ID: id, Reason: finish, PToks: len(st.m.Prompt) + len(st.m.Resume), CToks: st.next - len(st.m.Resume),
				Cached: fakeCached(&st.m), CutCall: w.cfg.cutCall})
		}
		if crash {
			w.mu.Lock()
			w.dead = true
			w.active = map[uint64]*genState{}
			w.mu.Unlock()
			w.sched.RemoveWorker(w.id, "fake worker died (SIGSEGV)")
			return true
		}
	}
	return false
}

// ------------------------------------------------------------------ harness

type harnessConfig struct {
	api     Config
	sched   scheduler.Config
	workers []workerConfig
	hello   *supervisor.Hello
}

type harness struct {
	t       testing.TB
	cfg     harnessConfig
	sched   *scheduler.Scheduler
	m       *metrics.Metrics
	pool    *fakePool
	ops     *fakeOps
	front   *Server
	handler http.Handler
	workers []*fakeWorker
	srv     *httptest.Server
	client  *http.Client
	ids     atomic.Uint64
}

func testAPIConfig() Config {
	c := DefaultConfig()
	c.ModelName = "t"
	c.MaxBodyBytes = 64 << 10
	c.MaxTokens = 512
	c.DefaultMaxTokens = 16
	c.KeepAlive = time.Hour
	c.DefaultTimeout = time.Minute
	return c
}

// newHarness starts a scheduler with one fake worker per workerConfig
// (default: one worker that stops after 3 tokens) and an httptest server.
func newHarness(t testing.TB, opts ...func(*harnessConfig)) *harness {
	t.Helper()
	hc := harnessConfig{api: testAPIConfig(), sched: scheduler.DefaultConfig(), workers: []workerConfig{{tokens: 3}}, hello: tinyHello()}
	for _, o := range opts {
		o(&hc)
	}
	h := &harness{t: t, cfg: hc}
	h.m = metrics.New(metrics.ModelInfo{Model: "t"}, metrics.BuildInfo{})
	h.sched = scheduler.New(hc.sched, h.m, metrics.NewStats(time.Now))
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		_ = h.sched.Run(ctx)
	}()
	for i, wc := range hc.workers {
		if hc.hello != nil {
			wc.ctx = hc.hello.Context
		}
		w := newFakeWorker(i, wc, h.sched)
		h.workers = append(h.workers, w)
		h.sched.AddWorker(i, w, scheduler.WorkerInfo{PromptCache: true})
	}
	h.pool = &fakePool{hello: hc.hello}
	h.ops = &fakeOps{}
	h.ops.ready.Store(true)
	log := slog.New(slog.DiscardHandler)
	h.front = New(hc.api, h.sched, h.pool, h.ops, h.m, log, func() uint64 { return h.ids.Add(1) })
	h.handler = h.front.Handler()
	h.srv = httptest.NewServer(h.handler)
	h.client = h.srv.Client()
	t.Cleanup(func() {
		// Closing the client connections cancels the handlers still
		// waiting (e.g. on a held worker), so Close does not block.
		h.srv.CloseClientConnections()
		h.client.CloseIdleConnections()
		h.srv.Close()
		cancel()
		<-runDone
		for _, w := range h.workers {
			// Release held workers so they can quit.
			w.stop()
			_, _, _, errs := w.snapshot()
			for _, err := range errs {
				t.Errorf("fake worker: %v", err)
			}
		}
	})
	return h
}

// addWorker registers one more fake worker.
func (h *harness) addWorker(wc workerConfig) *fakeWorker {
	id := len(h.workers)
	if h.cfg.hello != nil {
		wc.ctx = h.cfg.hello.Context
	}
	w := newFakeWorker(id, wc, h.sched)
	h.workers = append(h.workers, w)
	h.sched.AddWorker(id, w, scheduler.WorkerInfo{PromptCache: true})
	return w
}

// do sends a request and returns the response with its body read.
func (h *harness) do(method, path, body string, hdr ...string) (*http.Response, []byte) {
	h.t.Helper()
	resp, err := h.client.Do(h.newRequest(context.Background(), method, path, body, hdr...))
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		h.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, b
}

func (h *harness) newRequest(ctx context.Context, method, path, body string, hdr ...string) *http.Request {
	h.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.srv.URL+path, rd)
	if err != nil {
		h.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	return req
}

// idle waits until the scheduler has nothing queued or running and every
// fake worker has nothing active.
func (h *harness) idle(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		st := h.sched.State()
		busy := st.QueueRequests + st.Running
		for _, w := range h.workers {
			a, _, _, _ := w.snapshot()
			busy += a
		}
		if busy == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not idle after %s: queued %d, running %d", d, st.QueueRequests, st.Running)
		}
		time.Sleep(time.Millisecond)
	}
}

// doResult is an HTTP client call's outcome, for calls made in a goroutine.
type doResult struct {
	resp *http.Response
	err  error
}

// eventually waits until cond holds, checking every millisecond for up to d.
func (h *harness) eventually(d time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not true after %s: %s", d, what)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// handlersDone waits until no request is counted as being served.
func (h *harness) handlersDone(d time.Duration) error {
	deadline := time.Now().Add(d)
	for h.front.active.Load() != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d requests still counted as being served after %s", h.front.active.Load(), d)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// --------------------------------------------------------- response parsing

type errorEnvelope struct {
	Error *struct {
		Message *string `json:"message"`
		Type    *string `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

// checkErrorBody verifies that b is exactly an OpenAI error object and
// returns its fields ("" for null param/code).
func checkErrorBody(b []byte) (typ, code, param, msg string, err error) {
	var raw map[string]map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return "", "", "", "", fmt.Errorf("error body is not a JSON object of objects: %v: %q", err, b)
	}
	if len(raw) != 1 || raw["error"] == nil {
		return "", "", "", "", fmt.Errorf("error body has keys other than \"error\": %q", b)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := raw["error"][k]; !ok {
			return "", "", "", "", fmt.Errorf("error object lacks %q: %q", k, b)
		}
	}
	var env errorEnvelope
	if err := json.Unmarshal(b, &env); err != nil {
		return "", "", "", "", fmt.Errorf("error body fields have wrong types: %v: %q", err, b)
	}
	e := env.Error
	if e.Message == nil || *e.Message == "" || e.Type == nil || *e.Type == "" {
		return "", "", "", "", fmt.Errorf("error body without message or type: %q", b)
	}
	if e.Param != nil {
		if *e.Param == "" {
			return "", "", "", "", fmt.Errorf("error param is an empty string, want null: %q", b)
		}
		param = *e.Param
	}
	if e.Code != nil {
		if *e.Code == "" {
			return "", "", "", "", fmt.Errorf("error code is an empty string, want null: %q", b)
		}
		code = *e.Code
	}
	return *e.Type, code, param, *e.Message, nil
}

// sseEvent is one SSE line of interest: a data payload or a comment.
type sseEvent struct {
	data    string // payload after "data: "
	comment string // text after ":"
}

// sseReader reads SSE events one at a time, checking the framing.
type sseReader struct {
	t  testing.TB
	br *bufio.Reader
}

func newSSEReader(t testing.TB, r io.Reader) *sseReader {
	return &sseReader{t: t, br: bufio.NewReader(r)}
}

// next returns the next event, or io.EOF.
func (s *sseReader) next() (sseEvent, error) {
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			if err == io.EOF && line == "" {
				return sseEvent{}, io.EOF
			}
			return sseEvent{}, fmt.Errorf("reading SSE line %q: %w", line, err)
		}
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue // event separator
		}
		// Every event is a single line followed by a blank line.
		blank, err := s.br.ReadString('\n')
		if err != nil || blank != "\n" {
			return sseEvent{}, fmt.Errorf("SSE event %q not followed by a blank line (got %q, %v)", line, blank, err)
		}
		switch {
		case strings.HasPrefix(line, "data: "):
			return sseEvent{data: strings.TrimPrefix(line, "data: ")}, nil
		case strings.HasPrefix(line, ":"):
			return sseEvent{comment: strings.TrimSpace(strings.TrimPrefix(line, ":"))}, nil
		default:
			return sseEvent{}, fmt.Errorf("unexpected SSE line %q", line)
		}
	}
}

// readAll returns every data payload up to EOF, and the comments seen.
func (s *sseReader) readAll() (data []string, comments int, err error) {
	for {
		ev, err := s.next()
		if err == io.EOF {
			return data, comments, nil
		}
		if err != nil {
			return data, comments, err
		}
		if ev.comment != "" {
			comments++
			continue
		}
		data = append(data, ev.data)
	}
}
