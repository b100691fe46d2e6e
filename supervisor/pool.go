package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
)

// Router is what the pool needs from the scheduler.
type Router interface {
	AddWorker(id int, b scheduler.Backend, info scheduler.WorkerInfo)
	RemoveWorker(id int, cause string)
	Deliver(id int, m *ipc.Message) error // m is valid only during the call
	SetDraining(id int)
	WorkerLoad(id int) (inflight, served int, lastProgress time.Time)
}

// Config holds the pool's settings.
type Config struct {
	Workers int
	Command func(slot int) Command
	// GroupSize: processes per worker (a group of ranks, Group); 0 or 1 is
	// one process. Each rank runs Command with its rank's environment.
	GroupSize int
	// Hosts: where each group's ranks run (--hostfile; GroupSize is its
	// length); nil: every rank on this machine.
	Hosts             *Hosts
	StartTimeout      time.Duration // from spawn to hello
	HeartbeatInterval time.Duration
	HeartbeatTimeout  time.Duration // no pong for this long: wedged
	ProgressTimeout   time.Duration // requests in flight and no token for this long: wedged
	StopGrace         time.Duration // per stage of a staged stop
	Restart           RestartPolicy
	RecycleRequests   int   // replace a worker after serving this many requests (0: never)
	RecycleRSS        int64 // replace a worker whose resident memory passes this (0: never)
	// OnStartFailure, if set, hears of every worker that failed before its
	// hello (a model that cannot load); it must not block.
	OnStartFailure func(slot int, err error)
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Workers:           1,
		StartTimeout:      120 * time.Second,
		HeartbeatInterval: time.Second,
		HeartbeatTimeout:  5 * time.Second,
		ProgressTimeout:   60 * time.Second,
		StopGrace:         5 * time.Second,
		Restart:           DefaultRestartPolicy(),
	}
}

// Slot states.
const (
	StateStarting = "starting"
	StateReady    = "ready"
	StateDraining = "draining"
	StateBackoff  = "backoff"
	StateFailed   = "failed"
	StateStopped  = "stopped"
)

// Hello is what a worker announced about itself.
type Hello struct {
	Model    string            `json:"model"`
	Context  int               `json:"context_length"`
	Vocab    int               `json:"vocab"`
	EOS      []int32           `json:"eos"`
	Caps     []string          `json:"caps"`
	Versions map[string]string `json:"versions"`
	// CacheBytes is the worker's prompt cache budget (0: off).
	CacheBytes int64 `json:"prompt_cache_budget_bytes"`
}

// ExitRecord is a worker's last exit, for /stats.
type ExitRecord struct {
	Signal string    `json:"signal,omitempty"`
	Code   int       `json:"code"`
	Cause  string    `json:"cause"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	Stderr []string  `json:"stderr,omitempty"`
}

// SlotStatus is a snapshot of one slot.
type SlotStatus struct {
	Slot       int         `json:"slot"`
	State      string      `json:"state"`
	PID        int         `json:"pid,omitempty"`
	UptimeS    float64     `json:"uptime_seconds"`
	Starts     int         `json:"starts"`
	Restarts   int         `json:"restarts"`
	Served     int         `json:"requests_served"`
	Inflight   int         `json:"requests_in_flight"`
	LastPongMS float64     `json:"last_heartbeat_ms_ago,omitempty"`
	RSS        int64       `json:"rss_bytes,omitempty"`
	MLXActive  int64       `json:"mlx_active_bytes,omitempty"`
	MLXPeak    int64       `json:"mlx_peak_bytes,omitempty"`
	Score      float64     `json:"failure_score"`
	Failure    string      `json:"failure,omitempty"`
	LastExit   *ExitRecord `json:"last_exit,omitempty"`
	Healthy    bool        `json:"healthy"`
	// The worker's prompt cache: bytes held and entries evicted (this
	// process), and its budget as its hello advertised it (0: off, or no
	// hello yet; the worker decides its default by its device).
	CacheBytes     int64 `json:"prompt_cache_bytes"`
	CacheEvictions int64 `json:"prompt_cache_evictions"`
	CacheBudget    int64 `json:"prompt_cache_budget_bytes"`
	// Ranks: each process of a worker that is a group of ranks
	// (GroupSize > 1) while it runs; PID is rank 0's.
	Ranks []RankStatus `json:"ranks,omitempty"`
}

type slotState struct {
	id      int
	restart *restartState

	mu       sync.Mutex
	state    string
	proc     *Group
	started  time.Time
	starts   int
	restarts int
	served   int // by earlier processes of this slot
	lastPong time.Time
	pong     ipc.Message
	budget   int64 // the process's prompt cache budget, from its hello (0: off)
	failure  string
	lastExit *ExitRecord
}

// Pool keeps Config.Workers worker processes alive.
type Pool struct {
	cfg    Config
	router Router
	m      *metrics.Metrics
	log    *slog.Logger
	slots  []*slotState
	now    func() time.Time

	helloMu sync.Mutex
	hello   *Hello
	ready   chan struct{} // closed at the first hello
	readyOn sync.Once
}

// NewPool builds a pool.
func NewPool(cfg Config, router Router, m *metrics.Metrics, log *slog.Logger) *Pool {
	p := &Pool{cfg: cfg, router: router, m: m, log: log, now: time.Now, ready: make(chan struct{})}
	for i := range cfg.Workers {
		p.slots = append(p.slots, &slotState{id: i, state: StateStarting, restart: newRestartState(cfg.Restart, nil)})
		m.WorkerUp.WithLabelValues(strconv.Itoa(i)).Set(0)
	}
	return p
}

// Ready is closed once any worker has said hello.
func (p *Pool) Ready() <-chan struct{} { return p.ready }

// Hello returns the first worker's announcement (nil before Ready).
func (p *Pool) Hello() *Hello {
	p.helloMu.Lock()
	defer p.helloMu.Unlock()
	return p.hello
}

// Run keeps the workers alive until ctx ends, then stops them all (staged)
// and returns once every process is reaped.
func (p *Pool) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, s := range p.slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.runSlot(ctx, s)
		}()
	}
	wg.Wait()
	return nil
}

func (p *Pool) setState(s *slotState, st string) {
	s.mu.Lock()
	s.state = st
	s.mu.Unlock()
	up := 0.0
	if st == StateReady || st == StateDraining {
		up = 1
	}
	p.m.WorkerUp.WithLabelValues(strconv.Itoa(s.id)).Set(up)
}

func (p *Pool) runSlot(ctx context.Context, s *slotState) {
	log := p.log.With("worker", s.id)
	for ctx.Err() == nil {
		p.setState(s, StateStarting)
		proc, err := p.start(ctx, s, log)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			p.m.WorkerRestarts.WithLabelValues("start_failure").Inc()
			if p.cfg.OnStartFailure != nil {
				p.cfg.OnStartFailure(s.id, err)
			}
			s.mu.Lock()
			wait, giveUp := s.restart.failure(p.now()) // under s.mu: Status reads the score
			s.failure = err.Error()
			s.proc = nil
			s.mu.Unlock()
			if giveUp {
				p.setState(s, StateFailed)
				log.Error("worker keeps failing at start-up; slot marked failed, will try again later", "err", err, "retry_in", wait)
			} else {
				p.setState(s, StateBackoff)
				log.Warn("worker failed to start", "err", err, "retry_in", wait.Round(time.Millisecond))
			}
			if !sleepCtx(ctx, wait) {
				break
			}
			continue
		}
		s.mu.Lock()
		s.failure = ""
		info := scheduler.WorkerInfo{PromptCache: s.budget > 0}
		s.mu.Unlock()
		p.setState(s, StateReady)
		p.router.AddWorker(s.id, proc.Leader(), info) // frames go to rank 0
		reason := p.watch(ctx, s, proc, log)
		exit := proc.Exit()
		inflight, served, _ := p.router.WorkerLoad(s.id)
		p.router.RemoveWorker(s.id, exit.String())
		p.recordExit(s, exit, reason, served)
		if ctx.Err() != nil {
			break
		}
		lvl := slog.LevelError
		if reason == "recycle" {
			lvl = slog.LevelInfo
		}
		log.Log(ctx, lvl, "worker exited", "pid", proc.PID, "reason", reason, "exit", exit.String(), "requests_in_flight", inflight, "uptime", exit.Uptime.Round(time.Millisecond))
		p.m.WorkerRestarts.WithLabelValues(reason).Inc()
		s.mu.Lock()
		s.restarts++
		s.mu.Unlock()
		if reason == "recycle" {
			continue
		}
		s.mu.Lock()
		wait, giveUp := s.restart.failure(p.now())
		s.mu.Unlock()
		if giveUp {
			p.setState(s, StateFailed)
			s.mu.Lock()
			s.failure = "worker crashed repeatedly: " + exit.String()
			s.mu.Unlock()
		} else {
			p.setState(s, StateBackoff)
		}
		if !sleepCtx(ctx, wait) {
			break
		}
	}
	p.setState(s, StateStopped)
}

func (p *Pool) recordExit(s *slotState, e *Exit, reason string, served int) {
	sig := e.SignalName()
	code := ""
	if e.Signal == 0 {
		code = strconv.Itoa(e.Code)
	}
	label := sig
	if label == "" {
		label = "none"
	}
	p.m.WorkerExits.WithLabelValues(label, code).Inc()
	cause := ""
	if e.Err != nil {
		cause = e.Err.Error()
	}
	s.mu.Lock()
	s.proc = nil
	s.served += served
	s.lastExit = &ExitRecord{Signal: sig, Code: e.Code, Cause: cause, Reason: reason, At: e.At, Stderr: e.Stderr}
	s.mu.Unlock()
	p.m.WorkerMemory.DeletePartialMatch(map[string]string{"worker": strconv.Itoa(s.id)})
	p.m.WorkerRankUp.DeletePartialMatch(map[string]string{"worker": strconv.Itoa(s.id)})
	p.m.WorkerRankMemory.DeletePartialMatch(map[string]string{"worker": strconv.Itoa(s.id)})
}

// start spawns a worker and waits for its hello.
func (p *Pool) start(ctx context.Context, s *slotState, log *slog.Logger) (*Group, error) {
	helloCh := make(chan *ipc.Message, 1)
	var gotHello atomic.Bool
	var fatalMu sync.Mutex // a group's ranks report from their own readers
	var fatal string       // a rank's fatal error frame
	setFatal := func(msg string) {
		fatalMu.Lock()
		if fatal == "" {
			fatal = msg
		}
		fatalMu.Unlock()
		s.mu.Lock()
		s.failure = msg
		s.mu.Unlock()
	}
	onMsg := func(m *ipc.Message) error {
		switch m.T {
		case ipc.THello:
			if gotHello.Swap(true) {
				return fmt.Errorf("%w: second hello", ipc.ErrProtocol)
			}
			if m.V != ipc.Version {
				return fmt.Errorf("worker speaks protocol version %d but this supervisor speaks version %d: install the krserve_worker that matches this krserve binary (make venv)", m.V, ipc.Version)
			}
			h := *m // m is reused for the next frame
			helloCh <- &h
			return nil
		case ipc.TPong:
			s.mu.Lock()
			sent := s.lastPong
			s.lastPong = p.now()
			evicted := m.Evicted - s.pong.Evicted // the worker's counter since its last pong
			s.pong = *m
			s.mu.Unlock()
			_ = sent
			p.onPong(s, m, evicted)
			return nil
		case ipc.TError:
			if m.ID == 0 {
				log.Error("worker reported a fatal error", "code", m.Code, "msg", m.Msg)
				setFatal(m.Msg)
				return nil
			}
		}
		if !gotHello.Load() {
			return fmt.Errorf("%w: %q frame before hello", ipc.ErrProtocol, m.T)
		}
		return p.router.Deliver(s.id, m)
	}
	t0 := time.Now()
	onFatal := func(rank int, msg string) {
		log.Error("worker rank reported a fatal error", "rank", rank, "msg", msg)
		setFatal(fmt.Sprintf("rank %d: %s", rank, msg))
	}
	proc, err := StartGroup(s.id, p.cfg.GroupSize, p.cfg.Hosts, p.cfg.Command(s.id), log, onMsg, onFatal)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.proc = proc
	s.started = t0
	s.starts++
	s.pong = ipc.Message{} // the last process's counters are not this one's
	s.budget = 0
	s.mu.Unlock()
	timer := time.NewTimer(p.cfg.StartTimeout)
	defer timer.Stop()
	select {
	case m := <-helloCh:
		p.m.WorkerStartDuration.Observe(time.Since(t0).Seconds())
		h := &Hello{Model: m.Model, Context: m.Ctx, Vocab: m.Vocab, EOS: m.EOS, Caps: m.Caps, Versions: m.Versions,
			CacheBytes: m.CacheBytes}
		p.helloMu.Lock()
		if p.hello == nil {
			p.hello = h
		}
		p.helloMu.Unlock()
		p.readyOn.Do(func() { close(p.ready) })
		s.mu.Lock()
		s.lastPong = p.now()
		s.budget = m.CacheBytes
		s.mu.Unlock()
		p.m.PromptCacheBudget.WithLabelValues(strconv.Itoa(s.id)).Set(float64(m.CacheBytes))
		log.Info("worker ready", "pid", proc.PID, "model", m.Model, "load_seconds", time.Since(t0).Seconds(), "context_length", m.Ctx, "versions", m.Versions, "prompt_cache_bytes", m.CacheBytes)
		return proc, nil
	case <-proc.Done():
		e := proc.Exit()
		fatalMu.Lock()
		defer fatalMu.Unlock()
		if fatal != "" {
			return nil, fmt.Errorf("worker exited before hello: %s (%s)", fatal, e)
		}
		return nil, fmt.Errorf("worker exited before hello: %s", e)
	case <-timer.C:
		proc.Kill(fmt.Errorf("no hello within %s", p.cfg.StartTimeout))
		<-proc.Done()
		return nil, fmt.Errorf("worker sent no hello within %s: %s", p.cfg.StartTimeout, proc.Exit())
	case <-ctx.Done():
		proc.Stop(p.cfg.StopGrace)
		return nil, ctx.Err()
	}
}

func (p *Pool) onPong(s *slotState, m *ipc.Message, evicted int64) {
	w := strconv.Itoa(s.id)
	p.m.PromptCacheBytes.WithLabelValues(w).Set(float64(m.Cache))
	if evicted > 0 {
		p.m.PrefixCacheEvictions.Add(float64(evicted))
	}
	p.m.WorkerMemory.WithLabelValues(w, "rss").Set(float64(m.RSS))
	p.m.WorkerMemory.WithLabelValues(w, "mlx_active").Set(float64(m.MemActive))
	p.m.WorkerMemory.WithLabelValues(w, "mlx_peak").Set(float64(m.MemPeak))
}

// watch supervises a running worker until it exits; it returns the reason
// the worker is replaced: crash, wedged, protocol, recycle or stop.
func (p *Pool) watch(ctx context.Context, s *slotState, proc *Group, log *slog.Logger) string {
	tick := time.NewTicker(p.cfg.HeartbeatInterval)
	defer tick.Stop()
	var seq uint64
	var pingAt time.Time
	var outstanding bool
	recycling, stopping := false, false
	stoppedSince := map[int]time.Time{} // a group's ranks seen stopped (SIGSTOP), since when
	for {
		select {
		case <-proc.Done():
			e := proc.Exit()
			switch {
			case recycling && e.Err == nil:
				return "recycle"
			case errors.Is(e.Err, ipc.ErrProtocol):
				return "protocol"
			case errors.Is(e.Err, errWedged):
				return "wedged"
			default:
				return "crash"
			}
		case <-ctx.Done():
			proc.Stop(p.cfg.StopGrace)
			return "stop"
		case <-tick.C:
			if stopping {
				// A recycle stop is under way and ends in SIGKILL; no pings are
				// sent any more, so the heartbeat must not call it wedged.
				continue
			}
			now := p.now()
			rankRSS, err := p.watchRanks(s, proc, now, stoppedSince)
			if err != nil {
				proc.Kill(err)
				continue
			}
			s.mu.Lock()
			last := s.lastPong
			pong := s.pong
			s.mu.Unlock()
			if outstanding && !last.Before(pingAt) {
				outstanding = false
				p.m.IPCRoundTrip.Observe(last.Sub(pingAt).Seconds())
			}
			if now.Sub(last) > p.cfg.HeartbeatTimeout {
				proc.Kill(fmt.Errorf("%w: no heartbeat for %s", errWedged, now.Sub(last).Round(time.Millisecond)))
				continue
			}
			inflight, served, progress := p.router.WorkerLoad(s.id)
			if inflight > 0 && p.cfg.ProgressTimeout > 0 && now.Sub(progress) > p.cfg.ProgressTimeout {
				proc.Kill(fmt.Errorf("%w: %d requests in flight and no token for %s", errWedged, inflight, now.Sub(progress).Round(time.Millisecond)))
				continue
			}
			rss := max(pong.RSS, rankRSS) // a group recycles when any rank is past the limit
			if !recycling && ((p.cfg.RecycleRequests > 0 && served >= p.cfg.RecycleRequests) || (p.cfg.RecycleRSS > 0 && rss > p.cfg.RecycleRSS)) {
				recycling = true
				p.setState(s, StateDraining)
				p.router.SetDraining(s.id)
				log.Info("recycling worker", "served", served, "rss", rss)
			}
			if recycling && inflight == 0 {
				stopping = true
				go proc.Stop(p.cfg.StopGrace)
				continue
			}
			seq++
			if !outstanding {
				pingAt = now
				outstanding = true
			}
			f, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TPing, Seq: seq})
			_ = proc.Leader().Send(f)
		}
	}
}

var errWedged = errors.New("worker wedged")

// watchRanks records each rank of a group in the metrics (at every
// heartbeat tick) and returns the largest rank's resident memory and why
// the group must be killed, if it must: a
// follower stopped (SIGSTOP, a debugger) for longer than the heartbeat
// timeout, as rank 0 would be for not answering its heartbeats. Followers
// answer no heartbeat, and one stopped while requests run blocks rank 0 in a
// collective, which the progress watchdog catches; this catches it while the
// group is idle, before a request waits on it.
func (p *Pool) watchRanks(s *slotState, g *Group, now time.Time, stoppedSince map[int]time.Time) (int64, error) {
	if g.Ranks() < 2 {
		return 0, nil
	}
	w := strconv.Itoa(s.id)
	var wedged error
	var maxRSS int64
	for _, r := range g.RankStatus() {
		up := 0.0
		if r.Alive && r.State != "stopped" && r.State != "zombie" {
			up = 1
		}
		rank := strconv.Itoa(r.Rank)
		p.m.WorkerRankUp.WithLabelValues(w, rank).Set(up)
		if r.RSS > 0 {
			p.m.WorkerRankMemory.WithLabelValues(w, rank).Set(float64(r.RSS))
		}
		maxRSS = max(maxRSS, r.RSS)
		if r.State != "stopped" {
			delete(stoppedSince, r.Rank)
			continue
		}
		since, seen := stoppedSince[r.Rank]
		if !seen {
			stoppedSince[r.Rank] = now
		} else if d := now.Sub(since); d > p.cfg.HeartbeatTimeout && wedged == nil {
			wedged = fmt.Errorf("%w: rank %d stopped (SIGSTOP) for %s", errWedged, r.Rank, d.Round(time.Millisecond))
		}
	}
	return maxRSS, wedged
}

// CanServe reports whether some slot may yet serve: one that is not given up
// (failed) or stopped is ready, starting, backing off, or about to be
// restarted. A request that arrives while every slot has failed is refused at
// once rather than left to wait out its timeout in the queue.
func (p *Pool) CanServe() bool {
	for _, s := range p.slots {
		s.mu.Lock()
		st := s.state
		s.mu.Unlock()
		if st != StateFailed && st != StateStopped {
			return true
		}
	}
	return false
}

// Status returns a snapshot of every slot.
func (p *Pool) Status() []SlotStatus {
	now := p.now()
	out := make([]SlotStatus, 0, len(p.slots))
	for _, s := range p.slots {
		inflight, served, _ := p.router.WorkerLoad(s.id)
		s.mu.Lock()
		st := SlotStatus{Slot: s.id, State: s.state, Starts: s.starts, Restarts: s.restarts,
			Served: s.served, Inflight: inflight, Failure: s.failure, LastExit: s.lastExit,
			Score: s.restart.Score(now)}
		if s.proc != nil {
			st.PID = s.proc.PID
			st.UptimeS = now.Sub(s.started).Seconds()
			st.Served += served
			if !s.lastPong.IsZero() {
				st.LastPongMS = float64(now.Sub(s.lastPong).Microseconds()) / 1000
			}
			st.RSS, st.MLXActive, st.MLXPeak = s.pong.RSS, s.pong.MemActive, s.pong.MemPeak
			st.CacheBytes, st.CacheEvictions, st.CacheBudget = s.pong.Cache, s.pong.Evicted, s.budget
			if s.proc.Ranks() > 1 {
				st.Ranks = s.proc.RankStatus()
			}
		}
		_, _, progress := p.router.WorkerLoad(s.id)
		stalled := inflight > 0 && p.cfg.ProgressTimeout > 0 && now.Sub(progress) > p.cfg.ProgressTimeout
		st.Healthy = (s.state == StateReady || s.state == StateDraining) && s.proc != nil &&
			now.Sub(s.lastPong) <= p.staleAfter() && !stalled
		s.mu.Unlock()
		out = append(out, st)
	}
	return out
}

// staleAfter is how old the last pong may be for a worker to count as
// healthy: a few heartbeat intervals, so /ready turns 503 soon after a worker
// stops answering, long before the wedge timeout kills it.
func (p *Pool) staleAfter() time.Duration {
	return min(p.cfg.HeartbeatTimeout, 3*p.cfg.HeartbeatInterval)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
