// Package scheduler owns admission and batching: the bounded queue, the
// batching window, how many sequences each worker decodes at once (B), and the
// fate of requests whose worker dies (retry or resume on probation, and the
// verdict on a request that crashes workers: probation.go).
//
// Workers are Backends: anything that accepts a batch of encoded frames. The
// supervisor registers a worker with AddWorker once it said hello, routes every
// generation frame the worker sends to Deliver, and calls RemoveWorker when the
// process is gone.
package scheduler

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
)

// Backend is a worker as the scheduler sees it.
type Backend interface {
	// Send queues encoded frames for the worker; it must not block on the pipe.
	Send(frames []byte) error
}

// Config holds the scheduler's settings.
type Config struct {
	Window         time.Duration // gather arrivals this long before a batched dispatch
	MaxQueue       int           // requests waiting
	MaxQueueTokens int           // prompt tokens waiting
	// MaxCrashes bounds the worker crashes one request may live through,
	// whatever caused them, so nothing is retried for ever (a livelock guard;
	// an innocent request is never failed by fewer).
	MaxCrashes int
	// PoisonAfter is how many times a suspect may crash the worker it runs
	// alone on (probation) before it is declared poison and failed.
	PoisonAfter int
	// ProbationTokens is how many tokens past its crash point a suspect must
	// produce alone before it is cleared and rejoins batching.
	ProbationTokens int
	Routing         RoutingConfig // which worker takes a request (affinity.go)
	TuneEvery       time.Duration // auto-tuner evaluation period
	Tune            TuneConfig
	Now             func() time.Time
	Log             *slog.Logger // poison verdicts; nil: discarded
}

// DefaultConfig returns the defaults documented in the README.
func DefaultConfig() Config {
	return Config{
		Window:          2 * time.Millisecond,
		MaxQueue:        256,
		MaxQueueTokens:  1 << 20,
		MaxCrashes:      8,
		PoisonAfter:     2,
		ProbationTokens: 2,
		Routing:         DefaultRoutingConfig(),
		TuneEvery:       200 * time.Millisecond,
		Tune:            DefaultTuneConfig(),
		Now:             time.Now,
	}
}

type slot struct {
	id           int
	label        string
	b            Backend
	inflight     map[uint64]*Request
	draining     bool
	lastProgress time.Time
	served       int
	probation    *Request     // a suspect running alone here: the slot takes nothing else
	reserved     bool         // kept for a waiting suspect: takes no new request until empty
	index        *prefixIndex // the text this worker process's prompt cache is believed to hold
	cache        bool         // the worker has a prompt cache (WorkerInfo.PromptCache)
}

// WorkerInfo is what the scheduler uses of a worker's hello.
type WorkerInfo struct {
	// PromptCache: the worker keeps a prompt cache (its hello advertised a
	// budget above 0). Cache-aware routing indexes only such workers' text:
	// one without a cache never matches, so it is chosen by load.
	PromptCache bool
}

// Scheduler is safe for concurrent use. Run must be running for dispatch.
type Scheduler struct {
	cfg  Config
	m    *metrics.Metrics
	st   *metrics.Stats
	tune *Controller

	wake chan struct{}

	mu          sync.Mutex
	queue       []*Request
	queueTokens int
	slots       map[int]*slot
	rr          int
	windowStart time.Time
	fast        bool // a request arrived to an empty queue and an idle worker
	draining    bool
	idle        chan struct{} // closed when draining and nothing is left
	avgService  float64       // EMA of seconds from dispatch to done
	windowWaits int
	dispatches  int
	poisoned    int    // requests declared poison
	lastPoison  string // the last verdict's reason
}

// New builds a scheduler. m and st receive its measurements.
func New(cfg Config, m *metrics.Metrics, st *metrics.Stats) *Scheduler {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.MaxCrashes = max(cfg.MaxCrashes, 1)
	cfg.PoisonAfter = max(cfg.PoisonAfter, 1)
	cfg.ProbationTokens = max(cfg.ProbationTokens, 1)
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Scheduler{
		cfg:   cfg,
		m:     m,
		st:    st,
		tune:  NewController(cfg.Tune),
		wake:  make(chan struct{}, 1),
		slots: map[int]*slot{},
	}
	m.BatchTargetSize.Set(float64(s.tune.B()))
	m.LatencyTarget.Set(cfg.Tune.Target.Seconds())
	return s
}

func (s *Scheduler) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Submit admits r to the queue or refuses it at once with an *Error.
func (s *Scheduler) Submit(r *Request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.cfg.Now()
	if s.draining {
		s.m.AdmissionRejections.WithLabelValues("draining").Inc()
		return &Error{Reason: ReasonDraining, Msg: "server is shutting down", RetryAfter: time.Second}
	}
	if len(s.queue) >= s.cfg.MaxQueue {
		s.m.AdmissionRejections.WithLabelValues("queue_full").Inc()
		return &Error{Reason: ReasonOverloaded, Msg: fmt.Sprintf("queue is full (%d requests waiting)", len(s.queue)), RetryAfter: s.retryAfterLocked()}
	}
	if s.queueTokens+r.queueCost > s.cfg.MaxQueueTokens && len(s.queue) > 0 {
		s.m.AdmissionRejections.WithLabelValues("queue_tokens").Inc()
		return &Error{Reason: ReasonOverloaded, Msg: fmt.Sprintf("queue holds %d prompt tokens; limit %d", s.queueTokens, s.cfg.MaxQueueTokens), RetryAfter: s.retryAfterLocked()}
	}
	if !r.Deadline.IsZero() {
		if wait := s.estimatedWaitLocked(); wait > 0 && now.Add(wait).After(r.Deadline) {
			s.m.AdmissionRejections.WithLabelValues("deadline").Inc()
			return &Error{Reason: ReasonOverloaded, Msg: fmt.Sprintf("estimated queue wait %s exceeds the request's deadline", wait.Round(time.Millisecond)), RetryAfter: s.retryAfterLocked()}
		}
	}
	r.Enqueued = now
	r.slot = -1
	fast := len(s.queue) == 0 && s.idleWorkerLocked()
	s.queue = append(s.queue, r)
	s.queueTokens += r.queueCost
	s.m.NumRequestsWaiting.Set(float64(len(s.queue)))
	if fast {
		// The fast path: nothing waits and a worker is idle, so the request
		// goes out now, from the caller's goroutine (no hand-off to Run).
		s.fast = true
		s.dispatchLocked(now)
		return nil
	}
	s.poke()
	return nil
}

func (s *Scheduler) idleWorkerLocked() bool {
	for _, sl := range s.slots {
		if sl.open() && len(sl.inflight) == 0 {
			return true
		}
	}
	return false
}

// estimatedWaitLocked predicts how long a new arrival waits before dispatch.
func (s *Scheduler) estimatedWaitLocked() time.Duration {
	capacity, free := 0, 0
	for _, sl := range s.slots {
		if sl.draining {
			continue
		}
		capacity += s.tune.B()
		free += max(0, s.tune.B()-len(sl.inflight))
	}
	ahead := len(s.queue) + 1 - free
	if ahead <= 0 {
		return 0
	}
	if capacity == 0 || s.avgService == 0 {
		return 0 // no measurement yet: admit
	}
	return time.Duration(float64(ahead) / float64(capacity) * s.avgService * float64(time.Second))
}

func (s *Scheduler) retryAfterLocked() time.Duration {
	w := s.estimatedWaitLocked()
	if w < time.Second {
		return time.Second
	}
	return time.Duration(math.Ceil(w.Seconds())) * time.Second
}

// Cancel stops r: dropped if queued; cancelled in its worker if running. The
// request's stream ends with an *Error of the given reason. Idempotent.
func (s *Scheduler) Cancel(r *Request, reason, msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.finished {
		return
	}
	if r.slot < 0 {
		s.removeQueuedLocked(r)
	} else if sl := s.slots[r.slot]; sl != nil && !r.cancelled {
		r.cancelled = true
		f, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TCancel, ID: r.ID})
		_ = sl.b.Send(f) // a dead worker is removed by the supervisor anyway
	}
	s.failLocked(r, &Error{Reason: reason, Msg: msg})
}

func (s *Scheduler) removeQueuedLocked(r *Request) {
	if i := slices.Index(s.queue, r); i >= 0 {
		s.queue = slices.Delete(s.queue, i, i+1)
		s.queueTokens -= r.queueCost
		s.m.NumRequestsWaiting.Set(float64(len(s.queue)))
	}
}

func (s *Scheduler) failLocked(r *Request, e *Error) {
	if r.finished {
		return
	}
	r.finished = true
	s.m.RequestFailure.WithLabelValues(e.Reason).Inc()
	r.out.push(Event{Done: true, Err: e, PromptTokens: r.ptoks, CompletionTokens: len(r.generated)})
	s.checkIdleLocked()
}

// AddWorker makes a ready worker available for dispatch; info is what its
// hello said.
func (s *Scheduler) AddWorker(id int, b Backend, info WorkerInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.slots[id] = &slot{id: id, label: strconv.Itoa(id), b: b, inflight: map[uint64]*Request{}, lastProgress: s.cfg.Now(),
		index: newPrefixIndex(s.cfg.Routing.IndexBlocks), cache: info.PromptCache}
	s.m.BatchSize.WithLabelValues(strconv.Itoa(id)).Set(float64(s.tune.B()))
	s.poke()
}

// SetDraining stops new dispatches to worker id; its requests finish.
func (s *Scheduler) SetDraining(id int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sl := s.slots[id]; sl != nil {
		sl.draining = true
	}
}

// WorkerLoad reports requests in flight on worker id, requests it finished, and
// when it last made progress (a token, or becoming idle).
func (s *Scheduler) WorkerLoad(id int) (inflight, served int, lastProgress time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := s.slots[id]
	if sl == nil {
		return 0, 0, time.Time{}
	}
	return len(sl.inflight), sl.served, sl.lastProgress
}

// RemoveWorker takes a dead worker out. Every request it was running becomes
// a suspect and goes back to the head of the queue, to be retried (nothing
// streamed yet) or resumed (tokens already streamed) alone on a worker
// (probation.go); one that crashed its worker while alone is declared poison
// and fails. cause describes the death for error messages.
func (s *Scheduler) RemoveWorker(id int, cause string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := s.slots[id]
	if sl == nil {
		return
	}
	delete(s.slots, id)
	s.m.BatchSize.DeleteLabelValues(sl.label)
	if sl.probation != nil {
		s.m.RequestsOnProbation.Dec()
	}
	var back []*Request
	for _, r := range sl.inflight {
		r.slot = -1
		if r.cancelled || r.finished {
			continue
		}
		if s.crashLocked(r, sl.probation == r, cause) {
			back = append(back, r)
		}
	}
	s.m.NumRequestsRunning.Sub(float64(len(sl.inflight)))
	// Back at the head of the queue, oldest first. inflight is a map, so
	// requests admitted at the same instant need the id as tie-break.
	slices.SortFunc(back, func(a, b *Request) int {
		return cmp.Or(a.Enqueued.Compare(b.Enqueued), cmp.Compare(a.ID, b.ID))
	})
	for _, r := range back {
		s.queueTokens += r.queueCost
	}
	s.queue = append(back, s.queue...)
	s.m.NumRequestsWaiting.Set(float64(len(s.queue)))
	s.checkIdleLocked()
	s.poke()
}

// Deliver routes one generation frame (tok, done, error) from worker id. An
// error means the worker broke the protocol and must be replaced.
func (s *Scheduler) Deliver(id int, m *ipc.Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := s.slots[id]
	if sl == nil {
		return fmt.Errorf("%w: frame %q from unregistered worker %d", ipc.ErrProtocol, m.T, id)
	}
	r := sl.inflight[m.ID]
	if r == nil {
		return fmt.Errorf("%w: %q for request %d, which worker %d does not own", ipc.ErrProtocol, m.T, m.ID, id)
	}
	now := s.cfg.Now()
	sl.lastProgress = now
	switch m.T {
	case ipc.TTok:
		if err := checkLogprobs(m); err != nil {
			return err
		}
		if err := checkCalls(m, r.sentCalls); err != nil {
			return err
		}
		s.onTokensLocked(r, m.IDs, m.Text, logprobs(m), m.Calls, now)
		if sl.probation == r && len(r.generated) >= r.crashAt+s.cfg.ProbationTokens {
			s.endProbationLocked(sl)
		}
	case ipc.TDone:
		if err := checkCalls(m, r.sentCalls); err != nil {
			return err
		}
		if m.Text != "" || len(m.IDs) > 0 || len(m.Calls) > 0 {
			s.onTokensLocked(r, m.IDs, m.Text, nil, m.Calls, now)
		}
		r.ptoks = m.PToks
		r.cached = m.Cached
		s.m.PrefixCacheQueries.Add(float64(m.PToks))
		s.m.PrefixCacheHits.Add(float64(m.Cached))
		s.st.ObservePrefixCache(m.PToks, m.Cached)
		if r.Prompt == nil { // prefilled: the prompt, then what earlier workers generated
			r.promptToks = max(0, m.PToks-(len(r.generated)-r.dispatchToks))
		}
		s.rememberLocked(sl, r, m.Cached)
		// Tokens the worker generated but did not send (the EOS token) still
		// count as completion tokens, as in mlx-lm and vLLM.
		r.unsent = max(0, m.CToks-r.dispatchToks)
		s.releaseLocked(sl, r, now)
		if r.cancelled || r.finished {
			return nil
		}
		reason := m.Reason
		if reason == "cancelled" { // not asked by us: the worker gave up on it
			s.failLocked(r, &Error{Reason: ReasonInternal, Msg: "worker cancelled the request"})
			return nil
		}
		s.completeLocked(r, reason, m.CutCall, now)
	case ipc.TError:
		s.releaseLocked(sl, r, now)
		e := &Error{Reason: ReasonInternal, Msg: m.Msg}
		switch m.Code {
		case "invalid":
			e.Reason = ReasonInvalid
		case CodeContextLength, CodeInvalidPrompt:
			e.Reason, e.Code = ReasonInvalid, m.Code
		}
		s.failLocked(r, e)
	default:
		return fmt.Errorf("%w: unexpected %q frame for request %d", ipc.ErrProtocol, m.T, m.ID)
	}
	return nil
}

// completeLocked ends r successfully with reason (stop or length); cutCall:
// its output ended inside a tool call that is not whole.
func (s *Scheduler) completeLocked(r *Request, reason string, cutCall bool, now time.Time) {
	r.finished = true
	s.m.RequestSuccess.WithLabelValues(reason).Inc()
	s.observeDoneLocked(r, now)
	r.out.push(Event{Done: true, FinishReason: reason, CutCall: cutCall, PromptTokens: r.promptTokens(), CachedTokens: r.cachedTokens(),
		CompletionTokens: len(r.generated) + r.unsent})
	s.checkIdleLocked()
}

func (s *Scheduler) onTokensLocked(r *Request, ids []int32, text string, lps []TokenLogprob, calls []ipc.ToolCall, now time.Time) {
	n := len(ids)
	r.dispatchToks += n
	r.generated = append(r.generated, ids...)
	r.sentBytes += len(text)
	if r.keepReply {
		r.reply.WriteString(text)
	}
	for _, c := range calls {
		if c.Name != "" {
			r.sentCalls++
			r.sentArgs = 0
		}
		r.sentArgs += len(c.Arguments)
	}
	if n > 0 {
		if r.firstToken.IsZero() {
			r.firstToken = now
			s.m.TTFT.Observe(now.Sub(r.Enqueued).Seconds())
			s.m.PrefillTime.Observe(now.Sub(r.dispatched).Seconds())
		} else if !r.lastToken.IsZero() {
			gap := now.Sub(r.lastToken) / time.Duration(n)
			for range n {
				s.m.InterTokenLatency.Observe(gap.Seconds())
				s.tune.Observe(gap)
			}
		}
		r.lastToken = now
		s.m.GenerationTokens.Add(float64(n))
		s.st.ObserveTokens(n)
	}
	if r.cancelled || r.finished {
		return
	}
	if n > 0 || text != "" || len(calls) > 0 {
		r.out.push(Event{Text: text, Tokens: n, Logprobs: lps, Calls: calls})
	}
}

func (s *Scheduler) releaseLocked(sl *slot, r *Request, now time.Time) {
	if sl.probation == r {
		s.endProbationLocked(sl)
	}
	delete(sl.inflight, r.ID)
	sl.served++
	r.slot = -1
	s.m.NumRequestsRunning.Dec()
	svc := now.Sub(r.dispatched).Seconds()
	if s.avgService == 0 {
		s.avgService = svc
	} else {
		s.avgService = 0.8*s.avgService + 0.2*svc
	}
	if len(s.queue) > 0 { // a freed slot matters only to a waiting request
		s.poke()
	}
}

func (s *Scheduler) observeDoneLocked(r *Request, now time.Time) {
	e2e := now.Sub(r.Enqueued)
	s.m.E2ELatency.Observe(e2e.Seconds())
	if !r.firstToken.IsZero() {
		s.m.DecodeTime.Observe(now.Sub(r.firstToken).Seconds())
	}
	s.m.PromptTokens.Add(float64(r.promptTokens()))
	s.m.RequestPromptTokens.Observe(float64(r.promptTokens()))
	s.m.RequestGenerationTokens.Observe(float64(len(r.generated)))
	ttft := time.Duration(0)
	if !r.firstToken.IsZero() {
		ttft = r.firstToken.Sub(r.Enqueued)
	}
	s.st.ObserveRequest(e2e, ttft, len(r.generated))
}

// Run dispatches until ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var tick <-chan time.Time
	if s.cfg.Tune.Enabled && s.cfg.TuneEvery > 0 {
		t := time.NewTicker(s.cfg.TuneEvery)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-s.wake:
		case <-timer.C:
		case <-tick:
			s.evaluateTuner()
		}
		s.mu.Lock()
		wait := s.dispatchLocked(s.cfg.Now())
		s.mu.Unlock()
		timer.Stop()
		if wait > 0 {
			timer.Reset(wait)
		}
	}
}

func (s *Scheduler) evaluateTuner() {
	s.mu.Lock()
	waiting := len(s.queue) > 0
	s.mu.Unlock()
	b, adj := s.tune.Evaluate(s.cfg.Now(), waiting)
	if adj == nil {
		return
	}
	s.m.AutotuneAdjustments.WithLabelValues(adj.Reason).Inc()
	s.m.BatchTargetSize.Set(float64(b))
	s.mu.Lock()
	for _, sl := range s.slots {
		s.m.BatchSize.WithLabelValues(sl.label).Set(float64(b))
	}
	s.mu.Unlock()
	s.poke()
}

// dispatchLocked sends what can be sent and returns how long to wait before
// the open batching window closes (0: nothing to wait for).
func (s *Scheduler) dispatchLocked(now time.Time) time.Duration {
	b := s.tune.B()
	s.reserveLocked()
	free, idle := 0, false
	for _, sl := range s.slots {
		switch {
		case sl.open():
			free += max(0, b-len(sl.inflight))
			idle = idle || len(sl.inflight) == 0
		case sl.reserved && len(sl.inflight) == 0 && !sl.draining:
			free++ // room for one suspect
		}
	}
	if len(s.queue) == 0 || free == 0 {
		s.windowStart = time.Time{}
		s.fast = false
		return 0
	}
	if s.fast {
		s.windowStart = now
	} else if s.windowStart.IsZero() {
		s.windowStart = now
		fast := len(s.queue) == 1 && idle
		if !fast && len(s.queue) < free && s.cfg.Window > 0 {
			return s.cfg.Window
		}
	} else if len(s.queue) < free && now.Sub(s.windowStart) < s.cfg.Window {
		return s.windowStart.Add(s.cfg.Window).Sub(now)
	}
	s.m.BatchWindowWait.Observe(now.Sub(s.windowStart).Seconds())
	s.windowStart = time.Time{}
	s.fast = false
	s.assignLocked(now, b)
	return 0
}

// assignLocked moves queued requests to workers, one batch of frames per
// worker: a suspect to an empty reserved worker, where it runs alone; every
// other request, in queue order, to the open worker with the most free slots
// (ties: round robin). Suspects that find no empty worker keep their place
// at the head of the queue and do not hold up the others.
func (s *Scheduler) assignLocked(now time.Time, b int) {
	ids := make([]int, 0, len(s.slots))
	for id, sl := range s.slots {
		if !sl.draining {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return
	}
	slices.Sort(ids)
	batches := map[int][]*Request{}
	keep := s.queue[:0]
	full := false
	for _, r := range s.queue {
		id := -1
		if r.suspect {
			id = s.probationSlotLocked(ids, batches)
		} else if !full {
			if id = s.routeLocked(r, ids, batches, b); id < 0 {
				full = true
			}
		}
		if id < 0 {
			keep = append(keep, r)
			continue
		}
		s.queueTokens -= r.queueCost
		batches[id] = append(batches[id], r)
	}
	clear(s.queue[len(keep):])
	s.queue = keep
	for id, reqs := range batches {
		sl := s.slots[id]
		var frames []byte
		for _, r := range reqs {
			var err error
			if frames, err = ipc.AppendMessage(frames, r.genMessage()); err != nil {
				s.failLocked(r, &Error{Reason: ReasonInternal, Msg: err.Error()})
				continue
			}
			r.slot = id
			r.dispatched = now
			r.dispatchToks = 0
			sl.inflight[r.ID] = r
			if r.suspect { // not routed: what this worker holds is the prediction
				r.predicted = sl.index.match(r.prefixBlocks(s.cfg.Routing.Policy))
			}
			if sl.cache {
				sl.index.insert(r.prefixBlocks(s.cfg.Routing.Policy))
			}
			if r.suspect {
				s.startProbationLocked(sl, r)
			}
			s.m.QueueTime.Observe(now.Sub(r.Enqueued).Seconds())
		}
		if len(frames) == 0 {
			continue
		}
		s.m.NumRequestsRunning.Add(float64(len(reqs)))
		if err := sl.b.Send(frames); err != nil {
			// The worker is going away; the supervisor's RemoveWorker requeues.
			continue
		}
		sl.lastProgress = now
		s.m.BatchDispatched.Observe(float64(len(reqs)))
		s.st.ObserveBatch(len(sl.inflight))
		s.dispatches++
	}
	s.m.NumRequestsWaiting.Set(float64(len(s.queue)))
}

// routeLocked picks the worker for one more request among the open workers
// with a free slot (route, affinity.go), or -1 when all are full.
func (s *Scheduler) routeLocked(r *Request, ids []int, batches map[int][]*Request, b int) int {
	blocks := r.prefixBlocks(s.cfg.Routing.Policy)
	cands := make([]routeCandidate, 0, len(ids))
	for k := range ids {
		id := ids[(s.rr+k)%len(ids)]
		sl := s.slots[id]
		f := b - len(sl.inflight) - len(batches[id])
		if !sl.open() || f <= 0 {
			continue
		}
		cands = append(cands, routeCandidate{id: id, load: len(sl.inflight) + len(batches[id]), free: f,
			match: sl.index.match(blocks)})
	}
	if len(cands) == 0 {
		return -1
	}
	s.rr = (s.rr + 1) % len(ids)
	i, why := route(cands, len(blocks), s.cfg.Routing)
	s.m.RoutingDecisions.WithLabelValues(why).Inc()
	r.predicted = cands[i].match
	s.cfg.Log.Debug("routed", "request", r.ID, "worker", cands[i].id, "reason", why,
		"match_blocks", cands[i].match, "prompt_blocks", len(blocks), "candidates", len(cands))
	return cands[i].id
}

// rememberLocked records, on a request's done, that worker sl now holds its
// prompt and reply (the worker's cache keeps the finished sequence, where
// the next turn resumes). It first checks the worker's report of cached
// prompt tokens against what the index predicted at dispatch: a worker that
// found less evicted text the index still lists, so the index shrinks.
func (s *Scheduler) rememberLocked(sl *slot, r *Request, cached int) {
	if s.cfg.Routing.Policy != RoutingCacheAware || r.Prompt != nil || !sl.cache {
		return
	}
	if cached >= 0 && r.predicted > 0 && r.promptToks > 0 && !r.suspect {
		// Blocks the worker really had: its cached tokens at the request's
		// own bytes per token.
		had := cached * r.textBytes / r.promptToks / blockBytes
		if had < r.predicted/2 {
			sl.index.shrink()
			s.m.RoutingMispredictions.Inc()
		} else {
			sl.index.grow(s.cfg.Routing.IndexBlocks)
		}
	}
	sl.index.insert(blockHashes(canonical(&r.Input, r.reply.String())))
}

// Drain refuses new requests from now on and returns a channel closed once
// the queue is empty and no request is in flight.
func (s *Scheduler) Drain() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.draining = true
	if s.idle == nil { // Abort may have set draining already
		s.idle = make(chan struct{})
		s.checkIdleLocked()
	}
	return s.idle
}

func (s *Scheduler) checkIdleLocked() {
	if !s.draining || len(s.queue) > 0 {
		return
	}
	select {
	case <-s.idle:
		return
	default:
	}
	for _, sl := range s.slots {
		for _, r := range sl.inflight {
			if !r.cancelled && !r.finished {
				return
			}
		}
	}
	close(s.idle)
}

// Abort fails every queued and running request with a draining error (used
// when the drain deadline passes at shutdown).
func (s *Scheduler) Abort(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.draining = true
	if s.idle == nil { // without a Drain first, checkIdleLocked closed nil
		s.idle = make(chan struct{})
	}
	defer s.checkIdleLocked() // also when nothing was in flight
	for _, r := range s.queue {
		s.failLocked(r, &Error{Reason: ReasonDraining, Msg: msg})
	}
	s.queue = nil
	s.queueTokens = 0
	s.m.NumRequestsWaiting.Set(0)
	for _, sl := range s.slots {
		for _, r := range sl.inflight {
			if !r.cancelled && !r.finished {
				r.cancelled = true
				f, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TCancel, ID: r.ID})
				_ = sl.b.Send(f)
				s.failLocked(r, &Error{Reason: ReasonDraining, Msg: msg})
			}
		}
	}
}

// State is the scheduler's view for /stats.
type State struct {
	QueueRequests int            `json:"queue_requests"`
	QueueTokens   int            `json:"queue_prompt_tokens"`
	Running       int            `json:"running"`
	Draining      bool           `json:"draining"`
	WindowMS      float64        `json:"window_ms"`
	Dispatches    int            `json:"dispatches"`
	BatchSize     map[string]int `json:"batch_size_per_worker"`
	InFlight      map[string]int `json:"in_flight_per_worker"`
	AutoTune      TuneState      `json:"autotune"`
	// Crash containment (probation.go): suspects waiting for a worker of
	// their own, suspects running alone, requests declared poison so far and
	// the reason of the last verdict.
	Suspects    int    `json:"suspects_waiting"`
	OnProbation int    `json:"on_probation"`
	Poisoned    int    `json:"poisoned"`
	LastPoison  string `json:"last_poison,omitempty"`
	// Routing (affinity.go): the policy, whether it routes by cache now (it
	// is cache-aware and some worker advertised a prompt cache: without one,
	// every request goes by load), and the blocks of text each worker's
	// index believes its prompt cache holds.
	Routing        string         `json:"routing"`
	RoutingByCache bool           `json:"routing_by_cache"`
	RoutingIndex   map[string]int `json:"routing_index_blocks"`
}

// State returns a snapshot.
func (s *Scheduler) State() State {
	tune := s.tune.State()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := State{QueueRequests: len(s.queue), QueueTokens: s.queueTokens, Draining: s.draining,
		WindowMS: float64(s.cfg.Window.Microseconds()) / 1000, Dispatches: s.dispatches,
		BatchSize: map[string]int{}, InFlight: map[string]int{}, AutoTune: tune,
		Poisoned: s.poisoned, LastPoison: s.lastPoison, Routing: s.cfg.Routing.Policy, RoutingIndex: map[string]int{}}
	for _, r := range s.queue {
		if r.suspect {
			st.Suspects++
		}
	}
	for _, sl := range s.slots {
		if sl.probation != nil {
			st.OnProbation++
		}
		st.Running += len(sl.inflight)
		st.RoutingIndex[sl.label] = len(sl.index.blocks)
		st.RoutingByCache = st.RoutingByCache || (sl.cache && s.cfg.Routing.Policy == RoutingCacheAware)
		st.BatchSize[sl.label] = s.tune.B()
		st.InFlight[sl.label] = len(sl.inflight)
	}
	return st
}

// Draining reports whether Drain or Abort was called.
func (s *Scheduler) Draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}
