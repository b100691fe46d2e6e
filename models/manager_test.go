package models

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

type fakeInst struct {
	name    string
	mem     atomic.Int64
	stopped chan struct{}
	drained chan struct{}
}

func (f *fakeInst) MemoryBytes() int64     { return f.mem.Load() }
func (f *fakeInst) Drain() <-chan struct{} { return f.drained }
func (f *fakeInst) Abort(string)           {}
func (f *fakeInst) Stop()                  { close(f.stopped) }

type fakeLoad struct {
	spec Spec
	ctx  context.Context
	res  chan error
	inst *fakeInst
}

// ok lets the load succeed; fail makes it fail with msg.
func (l *fakeLoad) ok()             { l.res <- nil }
func (l *fakeLoad) fail(msg string) { l.res <- errors.New(msg) }

type fakeLoader struct {
	mu    sync.Mutex
	calls map[string]int
	loads chan *fakeLoad
}

func (f *fakeLoader) load(ctx context.Context, spec Spec) (Instance, error) {
	f.mu.Lock()
	f.calls[spec.Name]++
	f.mu.Unlock()
	l := &fakeLoad{spec: spec, ctx: ctx, res: make(chan error, 1),
		inst: &fakeInst{name: spec.Name, stopped: make(chan struct{}), drained: closed()}}
	f.loads <- l
	select {
	case err := <-l.res:
		if err != nil {
			return nil, err
		}
		return l.inst, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (f *fakeLoader) count(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[name]
}

func closed() chan struct{} { c := make(chan struct{}); close(c); return c }

type harness struct {
	t      *testing.T
	m      *Manager
	clock  *fakeClock
	tick   chan time.Time
	loader *fakeLoader
	evicts chan string
}

func newHarness(t *testing.T, cfg Config) *harness {
	t.Helper()
	h := &harness{t: t, clock: &fakeClock{t: time.Unix(1_000_000, 0)}, tick: make(chan time.Time),
		loader: &fakeLoader{calls: map[string]int{}, loads: make(chan *fakeLoad, 16)}, evicts: make(chan string, 16)}
	cfg.Load, cfg.Now, cfg.Tick = h.loader.load, h.clock.Now, h.tick
	cfg.Hooks.Evict = func(model, reason string) { h.evicts <- model + ":" + reason }
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.m = m
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return h
}

func (h *harness) nextLoad(name string) *fakeLoad {
	h.t.Helper()
	select {
	case l := <-h.loader.loads:
		if l.spec.Name != name {
			h.t.Fatalf("loading %q; want %q", l.spec.Name, name)
		}
		return l
	case <-time.After(10 * time.Second):
		h.t.Fatalf("no load of %q started", name)
	}
	return nil
}

func (h *harness) noLoad() {
	h.t.Helper()
	h.m.Status() // the owner has handled everything sent before
	select {
	case l := <-h.loader.loads:
		h.t.Fatalf("unexpected load of %q", l.spec.Name)
	default:
	}
}

func (h *harness) advance(d time.Duration) {
	h.clock.Advance(d)
	h.tick <- time.Time{}
}

func (h *harness) state(name string) Status {
	h.t.Helper()
	st, ok := h.m.StatusOf(name)
	if !ok {
		h.t.Fatalf("no model %q", name)
	}
	return st
}

// waitState waits for the owner to have handled an event of a load or stop
// goroutine that moves the model to state.
func (h *harness) waitState(name, state string) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.state(name).State != state {
		if time.Now().After(deadline) {
			h.t.Fatalf("%s is %s; want %s", name, h.state(name).State, state)
		}
		time.Sleep(time.Millisecond)
	}
}

type acquired struct {
	lease *Lease
	err   error
}

// acquire starts an Acquire and waits until the manager has queued or
// answered it.
func (h *harness) acquire(name string) chan acquired {
	h.t.Helper()
	before := h.state(name).Queued
	out := make(chan acquired, 1)
	go func() {
		l, err := h.m.Acquire(context.Background(), name, nil, nil)
		out <- acquired{l, err}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for len(out) == 0 && h.state(name).Queued == before {
		if time.Now().After(deadline) {
			h.t.Fatal("Acquire neither queued nor answered")
		}
		time.Sleep(time.Millisecond)
	}
	return out
}

func get(t *testing.T, c chan acquired) acquired {
	t.Helper()
	select {
	case a := <-c:
		return a
	case <-time.After(10 * time.Second):
		t.Fatal("Acquire did not return")
	}
	return acquired{}
}

func spec(name string) Spec {
	return Spec{Name: name, Path: "/models/" + name, TTL: 5 * time.Minute, Estimate: 100, Workers: 1}
}

func TestConcurrentRequestsShareOneLoad(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a")}})
	var waits []chan acquired
	for range 5 {
		waits = append(waits, h.acquire("a"))
	}
	l := h.nextLoad("a")
	if st := h.state("a"); st.State != StateLoading || st.Queued != 5 {
		t.Fatalf("status %+v; want loading with 5 queued", st)
	}
	h.noLoad()
	l.ok()
	for _, w := range waits {
		a := get(t, w)
		if a.err != nil || a.lease.Instance() != Instance(l.inst) {
			t.Fatalf("acquire: %v", a.err)
		}
		a.lease.Release(nil)
	}
	if n := h.loader.count("a"); n != 1 {
		t.Fatalf("%d loads; want 1", n)
	}
	if st := h.state("a"); st.State != StateReady || st.InFlight != 0 {
		t.Fatalf("status %+v", st)
	}
	// Ready: a lease at once, no load.
	a := get(t, h.acquire("a"))
	a.lease.Release(nil)
	h.noLoad()
}

func TestFailedLoadAnswersEveryoneAndBacksOff(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a"), spec("b")}, Backoff: 10 * time.Second})
	w1, w2 := h.acquire("a"), h.acquire("a")
	l := h.nextLoad("a")
	// b loads beside a's failing load (no limit here).
	wb := h.acquire("b")
	h.nextLoad("b").ok()
	if a := get(t, wb); a.err != nil {
		t.Fatal(a.err)
	} else {
		a.lease.Release(nil)
	}
	l.fail("config.json: no such file")
	for _, w := range []chan acquired{w1, w2} {
		a := get(t, w)
		var e *Error
		if !errors.As(a.err, &e) || e.Code != CodeUnavailable || !strings.Contains(e.Msg, "config.json: no such file") || e.RetryAfter <= 0 {
			t.Fatalf("err %v; want unavailable with the reason", a.err)
		}
	}
	st := h.state("a")
	if st.State != StateFailed || !strings.Contains(st.Reason, "no such file") {
		t.Fatalf("status %+v", st)
	}
	// During the backoff: refused at once, no new load.
	if a := get(t, h.acquire("a")); a.err == nil {
		t.Fatal("want the failure during backoff")
	}
	h.noLoad()
	h.advance(11 * time.Second)
	w := h.acquire("a")
	h.nextLoad("a").ok()
	if a := get(t, w); a.err != nil {
		t.Fatal(a.err)
	}
}

func TestUnknownModel(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{{Name: "a", Path: "/m/a", Aliases: []string{"alpha"}}}})
	_, err := h.m.Acquire(context.Background(), "nope", nil, nil)
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeNotFound {
		t.Fatalf("err %v; want not found", err)
	}
	for _, n := range []string{"a", "alpha", "/m/a"} {
		if got, ok := h.m.Resolve(n); !ok || got != "a" {
			t.Fatalf("Resolve(%q) = %q, %v", n, got, ok)
		}
	}
}

func TestSwapWithRoomForOne(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a"), spec("b")}, MaxLoaded: 1, MinResidency: 5 * time.Second})
	w := h.acquire("a")
	la := h.nextLoad("a")
	la.ok()
	get(t, w).lease.Release(nil)
	// b waits: a is idle but younger than the minimum residency.
	wb := h.acquire("b")
	h.noLoad()
	if st := h.state("a"); st.State != StateReady {
		t.Fatalf("a is %s", st.State)
	}
	// Meanwhile a keeps serving.
	get(t, h.acquire("a")).lease.Release(nil)
	h.advance(6 * time.Second)
	if ev := <-h.evicts; ev != "a:room" {
		t.Fatalf("eviction %q", ev)
	}
	<-la.inst.stopped
	lb := h.nextLoad("b")
	if st := h.state("a"); st.State != StateUnloaded {
		t.Fatalf("a is %s while b loads", st.State)
	}
	lb.ok()
	get(t, wb).lease.Release(nil)
	// And back: b is young, so a waits for the residency, then reloads.
	wa := h.acquire("a")
	h.advance(6 * time.Second)
	<-lb.inst.stopped
	h.nextLoad("a").ok()
	get(t, wa).lease.Release(nil)
	if n := h.loader.count("a"); n != 2 {
		t.Fatalf("a loaded %d times; want 2", n)
	}
}

func TestBusyModelDrainsOnlyPastAgeCap(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a"), spec("b")}, MaxLoaded: 1, AgeCap: 30 * time.Second})
	w := h.acquire("a")
	la := h.nextLoad("a")
	la.ok()
	held := get(t, w).lease
	wb := h.acquire("b")
	h.advance(10 * time.Second)
	h.noLoad()
	// a is busy and b is under the age cap: a keeps taking requests.
	a2 := get(t, h.acquire("a"))
	if a2.err != nil {
		t.Fatal(a2.err)
	}
	a2.lease.Release(nil)
	h.advance(21 * time.Second) // b has waited 31 s
	if ev := <-h.evicts; ev != "a:room" {
		t.Fatalf("eviction %q", ev)
	}
	if st := h.state("a"); st.State != StateDraining || st.InFlight != 1 {
		t.Fatalf("a: %+v; want draining with its request in flight", st)
	}
	// A new request for a now waits for a's turn again; nothing stops
	// while the old one is in flight.
	wa := h.acquire("a")
	h.noLoad()
	select {
	case <-la.inst.stopped:
		t.Fatal("a stopped with a request in flight")
	default:
	}
	held.Release(nil)
	<-la.inst.stopped
	lb := h.nextLoad("b")
	lb.ok()
	get(t, wb).lease.Release(nil)
	// a's waiter is next in line: once b is past min residency (0) and idle.
	h.advance(time.Second)
	<-lb.inst.stopped
	h.nextLoad("a").ok()
	if a := get(t, wa); a.err != nil {
		t.Fatal(a.err)
	}
}

func TestTTLAndKeepAlive(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a")}})
	w := h.acquire("a")
	l := h.nextLoad("a")
	l.ok()
	get(t, w).lease.Release(nil)
	st := h.state("a")
	if want := h.clock.Now().Add(5 * time.Minute); !st.ExpiresAt.Equal(want) {
		t.Fatalf("expires %v; want %v", st.ExpiresAt, want)
	}
	h.advance(4 * time.Minute)
	if st := h.state("a"); st.State != StateReady {
		t.Fatalf("a is %s before its ttl", st.State)
	}
	// A request in flight holds it past the ttl.
	held := get(t, h.acquire("a")).lease
	h.advance(10 * time.Minute)
	if st := h.state("a"); st.State != StateReady || !st.ExpiresAt.IsZero() {
		t.Fatalf("a: %+v; want ready with no expiry while busy", st)
	}
	forever := Never
	held.Release(&forever) // keep_alive -1: the ttl no longer applies
	h.advance(time.Hour)
	if st := h.state("a"); st.State != StateReady {
		t.Fatalf("a is %s after keep_alive -1", st.State)
	}
	ka := 30 * time.Second
	get(t, h.acquire("a")).lease.Release(&ka)
	h.advance(29 * time.Second)
	if st := h.state("a"); st.State != StateReady {
		t.Fatalf("a is %s before its keep_alive", st.State)
	}
	h.advance(2 * time.Second)
	if ev := <-h.evicts; ev != "a:ttl" {
		t.Fatalf("eviction %q", ev)
	}
	<-l.inst.stopped
	// keep_alive 0: unloaded as soon as the request ends.
	w = h.acquire("a")
	l = h.nextLoad("a")
	l.ok()
	zero := time.Duration(0)
	get(t, w).lease.Release(&zero)
	if ev := <-h.evicts; ev != "a:keep_alive" {
		t.Fatalf("eviction %q", ev)
	}
	<-l.inst.stopped
}

func TestTooLargeIsRefusedAtOnce(t *testing.T) {
	big := spec("big")
	big.Estimate = 3 << 30
	h := newHarness(t, Config{Models: []Spec{big}, MemoryBudget: 2 << 30})
	a := get(t, h.acquire("big"))
	var e *Error
	if !errors.As(a.err, &e) || e.Code != CodeTooLarge || e.Msg != `model "big" needs 3.0 GiB, 2.0 GiB available (--memory-budget)` {
		t.Fatalf("err %v", a.err)
	}
	h.noLoad()
}

func TestMemoryBudgetUsesMeasuredBytes(t *testing.T) {
	a, b := spec("a"), spec("b")
	a.Estimate, b.Estimate = 600, 300
	h := newHarness(t, Config{Models: []Spec{a, b}, MemoryBudget: 1000})
	w := h.acquire("a")
	la := h.nextLoad("a")
	la.ok()
	held := get(t, w).lease
	// Estimated 600 + 300 fit; but the worker measures 800.
	la.inst.mem.Store(800)
	h.advance(time.Second)
	if st := h.state("a"); st.Measured != 800 || st.Bytes() != 800 {
		t.Fatalf("a: %+v", st)
	}
	wb := h.acquire("b")
	h.noLoad() // 800 + 300 > 1000 and a is busy
	held.Release(nil)
	<-la.inst.stopped
	h.nextLoad("b").ok()
	get(t, wb).lease.Release(nil)
	// a's next estimate is what was measured.
	if st := h.state("a"); st.Estimated != 800 || st.Measured != 0 {
		t.Fatalf("a after unload: %+v", st)
	}
}

func TestBoundedWaiting(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a")}, MaxWaiting: 2})
	h.acquire("a")
	h.acquire("a")
	h.nextLoad("a")
	a := get(t, h.acquire("a"))
	var e *Error
	if !errors.As(a.err, &e) || e.Code != CodeBusy || e.RetryAfter <= 0 {
		t.Fatalf("err %v; want busy", a.err)
	}
}

func TestLoadTimeout(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a")}, LoadTimeout: 50 * time.Millisecond})
	w := h.acquire("a")
	h.nextLoad("a") // never answered: the timeout ends it
	a := get(t, w)
	var e *Error
	if !errors.As(a.err, &e) || e.Code != CodeUnavailable || !strings.Contains(e.Msg, "load timeout") {
		t.Fatalf("err %v; want a load timeout", a.err)
	}
}

func TestWaiterThatGivesUpLeavesTheLine(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a")}})
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan error, 1)
	go func() { _, err := h.m.Acquire(ctx, "a", nil, nil); out <- err }()
	l := h.nextLoad("a")
	cancel()
	if err := <-out; !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
	l.ok()
	if st := h.state("a"); st.InFlight != 0 || st.Queued != 0 {
		t.Fatalf("a: %+v; nothing should hold it", st)
	}
}

func TestPreloadAndUnload(t *testing.T) {
	a := spec("a")
	a.Preload, a.TTL = true, Never
	h := newHarness(t, Config{Models: []Spec{a}})
	l := h.nextLoad("a")
	l.ok()
	h.waitState("a", StateReady)
	h.advance(24 * time.Hour)
	if st := h.state("a"); st.State != StateReady || !st.ExpiresAt.IsZero() {
		t.Fatalf("a: %+v", st)
	}
	if err := h.m.Unload(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	if st := h.state("a"); st.State != StateUnloaded {
		t.Fatalf("a is %s after unload", st.State)
	}
	if ev := <-h.evicts; ev != "a:api" {
		t.Fatalf("eviction %q", ev)
	}
	go func() { _ = h.m.Load(context.Background(), "a") }()
	h.nextLoad("a").ok()
}

func TestDrainRefusesNewRequests(t *testing.T) {
	h := newHarness(t, Config{Models: []Spec{spec("a"), spec("b")}})
	w := h.acquire("a")
	h.nextLoad("a").ok()
	held := get(t, w).lease
	wb := h.acquire("b")
	h.nextLoad("b")
	done := h.m.Drain()
	if a := get(t, wb); a.err == nil {
		t.Fatal("a waiting request survived the drain")
	}
	if a := get(t, h.acquire("a")); a.err == nil {
		t.Fatal("a new request was admitted while draining")
	}
	<-done // the fake instance's scheduler drains at once
	held.Release(nil)
}
