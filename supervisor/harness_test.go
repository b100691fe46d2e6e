package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
)

// waitLimit bounds every wait on an event: generous, because nothing here
// should take more than a fraction of it (it only matters when a test fails).
const waitLimit = 15 * time.Second

// testLog discards unless KRSERVE_TEST_LOG is set.
func testLog() *slog.Logger {
	if os.Getenv("KRSERVE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func fakeCommand(t testing.TB, spec string) Command {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return fakeCommandAt(exe, spec)
}

func fakeCommandAt(exe, spec string) Command {
	// atexit_sleep_ms: under -race the child would otherwise linger 1 s at exit.
	return Command{Path: exe, Env: []string{fakeEnv + "=" + spec, "GORACE=atexit_sleep_ms=0"}}
}

// plan chooses each start's fake worker mode: per slot, the n-th start uses
// the n-th spec, and every start past the end uses the last one.
type plan struct {
	exe     string
	mu      sync.Mutex
	specs   map[int][]string
	starts  map[int]int
	started chan int // the slot, once per Command call
}

func newPlan(t testing.TB, slot0 ...string) *plan {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return &plan{exe: exe, specs: map[int][]string{0: slot0}, starts: map[int]int{}, started: make(chan int, 4096)}
}

func (p *plan) command(slot int) Command {
	p.mu.Lock()
	n := p.starts[slot]
	p.starts[slot]++
	specs := p.specs[slot]
	p.mu.Unlock()
	spec := "ok"
	if len(specs) > 0 {
		spec = specs[min(n, len(specs)-1)]
	}
	select {
	case p.started <- slot:
	default:
	}
	return fakeCommandAt(p.exe, spec) // on the pool's goroutine: no t.Fatal here
}

func (p *plan) count(slot int) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.starts[slot]
}

// fastRestart restarts at once and never gives up.
func fastRestart() RestartPolicy {
	return RestartPolicy{BackoffBase: time.Millisecond, BackoffMax: 2 * time.Millisecond, HalfLife: time.Hour, Threshold: 1e9, FailedRetry: time.Hour}
}

func testConfig(p *plan) Config {
	return Config{
		Workers:           1,
		Command:           p.command,
		StartTimeout:      waitLimit,
		HeartbeatInterval: 20 * time.Millisecond,
		HeartbeatTimeout:  waitLimit, // tests of the heartbeat lower it
		StopGrace:         waitLimit,
		Restart:           fastRestart(),
	}
}

func newMetrics() *metrics.Metrics {
	return metrics.New(metrics.ModelInfo{Model: "fake-model"}, metrics.BuildInfo{Version: "test"})
}

// runPool starts p.Run; the returned stop cancels it and waits for Run to
// return (also done at cleanup).
func runPool(t testing.TB, p *Pool) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = p.Run(ctx)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(waitLimit):
				t.Errorf("Pool.Run did not return within %s of cancel", waitLimit)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// eventually polls cond (cheaply, every few ms) until it holds; it is for
// state that has no event to wait on, such as Pool.Status.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func waitDone(t testing.TB, proc *Process) *Exit {
	t.Helper()
	select {
	case <-proc.Done():
		return proc.Exit()
	case <-time.After(waitLimit):
		t.Fatalf("worker pid %d: not reaped within %s", proc.PID, waitLimit)
		return nil
	}
}

// assertGone checks that pid and its process group no longer exist.
func assertGone(t testing.TB, pid int) {
	t.Helper()
	if pid <= 0 {
		t.Fatalf("bad pid %d", pid)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("pid %d still exists after the worker was reaped (kill 0: %v)", pid, err)
	}
	if err := syscall.Kill(-pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process group %d still exists after the worker was reaped (kill 0: %v)", pid, err)
	}
}

// stderrPID finds "key=N" in stderr lines.
func stderrPID(lines []string, key string) int {
	for _, l := range lines {
		if i := strings.Index(l, key+"="); i >= 0 {
			var n int
			if _, err := fmt.Sscanf(l[i+len(key)+1:], "%d", &n); err == nil {
				return n
			}
		}
	}
	return 0
}

// routerEvent is one call the pool made on its Router.
type routerEvent struct {
	Kind  string // add, remove, deliver, draining
	ID    int
	Cause string
	Msg   ipc.Message
	B     scheduler.Backend
	Info  scheduler.WorkerInfo
}

// fakeRouter records the pool's calls. Requests are "dispatched" by the test
// with dispatch; Deliver refuses frames about requests the worker does not
// own, like the scheduler.
type fakeRouter struct {
	mu       sync.Mutex
	events   []routerEvent
	changed  chan struct{}
	backends map[int]scheduler.Backend
	owned    map[int]map[uint64]bool
	progress map[int]time.Time
	served   map[int]int
	extra    int // added to every worker's served count (to trigger recycling)
}

func newFakeRouter() *fakeRouter {
	return &fakeRouter{changed: make(chan struct{}, 1), backends: map[int]scheduler.Backend{},
		owned: map[int]map[uint64]bool{}, progress: map[int]time.Time{}, served: map[int]int{}}
}

func (r *fakeRouter) recordLocked(e routerEvent) {
	r.events = append(r.events, e)
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *fakeRouter) AddWorker(id int, b scheduler.Backend, info scheduler.WorkerInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.backends[id] = b
	r.owned[id] = map[uint64]bool{}
	r.progress[id] = time.Now()
	r.served[id] = 0
	r.recordLocked(routerEvent{Kind: "add", ID: id, B: b, Info: info})
}

func (r *fakeRouter) RemoveWorker(id int, cause string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.backends, id)
	delete(r.owned, id)
	r.recordLocked(routerEvent{Kind: "remove", ID: id, Cause: cause})
}

func (r *fakeRouter) Deliver(id int, m *ipc.Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.owned[id][m.ID] {
		return fmt.Errorf("%w: %q for request %d, which worker %d does not own", ipc.ErrProtocol, m.T, m.ID, id)
	}
	r.progress[id] = time.Now()
	if m.T == ipc.TDone || m.T == ipc.TError {
		delete(r.owned[id], m.ID)
		r.served[id]++
	}
	r.recordLocked(routerEvent{Kind: "deliver", ID: id, Msg: *m})
	return nil
}

func (r *fakeRouter) SetDraining(id int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recordLocked(routerEvent{Kind: "draining", ID: id})
}

func (r *fakeRouter) WorkerLoad(id int) (int, int, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.backends[id]; !ok {
		return 0, 0, time.Time{}
	}
	return len(r.owned[id]), r.served[id] + r.extra, r.progress[id]
}

func (r *fakeRouter) setExtraServed(n int) {
	r.mu.Lock()
	r.extra = n
	r.mu.Unlock()
}

// dispatch sends a gen to worker id as the scheduler would.
func (r *fakeRouter) dispatch(t testing.TB, id int, m *ipc.Message) {
	t.Helper()
	r.mu.Lock()
	b := r.backends[id]
	if b == nil {
		r.mu.Unlock()
		t.Fatalf("dispatch: worker %d is not registered", id)
	}
	r.owned[id][m.ID] = true
	r.progress[id] = time.Now()
	r.mu.Unlock()
	f, err := ipc.AppendMessage(nil, m)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Send(f); err != nil {
		t.Fatalf("dispatch: %v", err)
	}
}

// wait blocks until pred holds for the recorded events.
func (r *fakeRouter) wait(t testing.TB, what string, pred func([]routerEvent) bool) []routerEvent {
	t.Helper()
	deadline := time.NewTimer(waitLimit)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		evs := append([]routerEvent(nil), r.events...)
		r.mu.Unlock()
		if pred(evs) {
			return evs
		}
		select {
		case <-r.changed:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; router saw %s", what, summarize(evs))
		}
	}
}

func count(evs []routerEvent, kind string) int {
	n := 0
	for _, e := range evs {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// nth returns the n-th (from 1) event of kind.
func nth(evs []routerEvent, kind string, n int) routerEvent {
	for _, e := range evs {
		if e.Kind == kind {
			if n--; n == 0 {
				return e
			}
		}
	}
	return routerEvent{}
}

func (r *fakeRouter) waitCount(t testing.TB, kind string, n int) []routerEvent {
	t.Helper()
	return r.wait(t, fmt.Sprintf("%d %q calls", n, kind), func(evs []routerEvent) bool { return count(evs, kind) >= n })
}

func summarize(evs []routerEvent) string {
	var b strings.Builder
	for _, e := range evs {
		switch e.Kind {
		case "deliver":
			fmt.Fprintf(&b, "[deliver %d %s %d] ", e.ID, e.Msg.T, e.Msg.ID)
		case "remove":
			fmt.Fprintf(&b, "[remove %d: %s] ", e.ID, e.Cause)
		default:
			fmt.Fprintf(&b, "[%s %d] ", e.Kind, e.ID)
		}
	}
	return b.String()
}

// newScheduler builds a real scheduler and runs it until cleanup.
func newScheduler(t testing.TB, m *metrics.Metrics) *scheduler.Scheduler {
	t.Helper()
	s := scheduler.New(scheduler.DefaultConfig(), m, metrics.NewStats(time.Now))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

// collect reads r's events until Done and returns the concatenated text and
// the final event.
func collect(t testing.TB, r *scheduler.Request) (string, scheduler.Event) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	var b strings.Builder
	for {
		ev, err := r.Next(ctx)
		if err != nil {
			t.Fatalf("request %d: %v after text %q", r.ID, err, b.String())
		}
		b.WriteString(ev.Text)
		if ev.Done {
			return b.String(), ev
		}
	}
}

func slot0(p *Pool) SlotStatus { return p.Status()[0] }
