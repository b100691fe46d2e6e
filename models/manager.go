// Package models owns the served models: each one's lifecycle (unloaded →
// loading → ready → draining → unloaded, or failed with the reason), the
// requests waiting for one to load, and the choice of which to unload to make
// room. One goroutine (Manager.Run) owns all of that state; request handlers
// talk to it through Acquire and Lease.Release. What a loaded model is (its
// worker pool and scheduler) is opaque here: a Loader builds an Instance.
package models

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Model states.
const (
	StateUnloaded = "unloaded"
	StateLoading  = "loading"
	StateReady    = "ready"
	StateDraining = "draining"
	StateFailed   = "failed"
)

// States lists every state (metrics pre-initialise one series per state).
var States = []string{StateUnloaded, StateLoading, StateReady, StateDraining, StateFailed}

// Eviction reasons (krserve_model_evictions_total{reason}).
const (
	EvictTTL       = "ttl"        // idle past its ttl or the last request's keep_alive
	EvictKeepAlive = "keep_alive" // a request asked for keep_alive 0
	EvictRoom      = "room"       // unloaded to make room for another model
	EvictAPI       = "api"        // POST /api/models/{name}/unload
)

// EvictReasons lists the eviction reasons.
var EvictReasons = []string{EvictTTL, EvictKeepAlive, EvictRoom, EvictAPI}

// Load results (krserve_model_loads_total{result}).
var LoadResults = []string{"ok", "failed", "timeout"}

// Never is a TTL or keep_alive that keeps a model loaded until it is evicted
// for room or unloaded by hand.
const Never = time.Duration(-1)

// Spec is one served model as configured.
type Spec struct {
	Name      string
	Path      string
	Aliases   []string
	Workers   int
	BatchSize int
	GroupSize int // processes per worker (a group of ranks); 0 or 1: one
	// TTL is how long the model stays loaded once idle: Never (negative),
	// 0 (unload as soon as the last request ends) or a duration. A request's
	// keep_alive replaces it for that idle period.
	TTL      time.Duration
	Pin      bool  // never chosen to make room (ttl and unload still apply)
	Preload  bool  // loaded at start (and reloaded after a failure)
	Estimate int64 // bytes before the first load has been measured
}

// Instance is a loaded model: its workers and scheduler, running.
type Instance interface {
	// MemoryBytes is what its workers measure now (0: not known yet).
	MemoryBytes() int64
	// Drain refuses new requests and is closed once none is in flight.
	Drain() <-chan struct{}
	// Abort fails whatever is still queued or running.
	Abort(msg string)
	// Stop stops the workers and returns once every process is reaped.
	Stop()
}

// Loader starts a model and returns once it can serve, or the reason it
// cannot. When ctx ends first it stops what it started and returns ctx's
// error.
type Loader func(ctx context.Context, spec Spec) (Instance, error)

// Hooks receive state changes (metrics). Any may be nil. They run on the
// owner goroutine and must not block or call back into the Manager.
type Hooks struct {
	State  func(model, state string)
	Load   func(model, result string, seconds float64)
	Evict  func(model, reason string)
	Memory func(model string, estimated, measured int64)
}

// Config holds the Manager's settings.
type Config struct {
	Models       []Spec
	Load         Loader
	MemoryBudget int64         // bytes all loaded models may take (0: no limit)
	MaxLoaded    int           // models loaded at once (0: no limit)
	MaxWaiting   int           // requests that may wait for one model to load (beyond: ErrBusy)
	LoadTimeout  time.Duration // a load that takes longer fails
	MinResidency time.Duration // an idle model is not unloaded for room sooner after loading
	AgeCap       time.Duration // a waiting load older than this may unload busy models (they drain first)
	Backoff      time.Duration // after a failed load, requests are refused this long; doubles per failure
	BackoffMax   time.Duration
	Now          func() time.Time
	Tick         <-chan time.Time // expiry and re-planning; nil: every 250 ms
	Hooks        Hooks
	Log          *slog.Logger
}

// Error codes of *Error.
const (
	CodeNotFound    = "model_not_found"
	CodeBusy        = "model_busy"        // too many requests waiting for the load (429)
	CodeUnavailable = "model_unavailable" // the load failed (503, Retry-After)
	CodeTooLarge    = "model_too_large"   // cannot fit even alone
	CodeDraining    = "draining"          // the server is shutting down
	CodeTimeout     = "model_load_timeout"
)

// Error is why a model cannot serve a request.
type Error struct {
	Code       string
	Msg        string
	RetryAfter time.Duration // 0: retrying will not help
}

func (e *Error) Error() string { return e.Msg }

// Status is a snapshot of one model, for /api/ps, /v1/models and /ready.
type Status struct {
	Name        string    `json:"name"`
	Path        string    `json:"path"`
	Aliases     []string  `json:"aliases,omitempty"`
	State       string    `json:"state"`
	Reason      string    `json:"reason,omitempty"` // why it failed
	Workers     int       `json:"workers"`
	Pinned      bool      `json:"pinned"`
	Estimated   int64     `json:"estimated_bytes"`
	Measured    int64     `json:"measured_bytes"`
	InFlight    int       `json:"in_flight"` // requests holding the model
	Queued      int       `json:"queued"`    // requests waiting for it to load
	LoadSeconds float64   `json:"load_seconds,omitempty"`
	LoadedAt    time.Time `json:"loaded_at,omitzero"`
	ExpiresAt   time.Time `json:"expires_at,omitzero"` // zero: no expiry
	RetryAt     time.Time `json:"retry_at,omitzero"`   // failed: loads refused until then
	TTL         string    `json:"ttl"`
}

// Bytes is what the model counts for against the budget.
func (s Status) Bytes() int64 {
	if s.Measured > 0 {
		return s.Measured
	}
	return s.Estimated
}

type result struct {
	lease *Lease
	err   error
}

type waiter struct {
	reply chan result // buffered 1; gets exactly one result
	since time.Time
}

type model struct {
	spec      Spec
	state     string
	reason    string
	inst      Instance
	refs      int // leases out
	waiters   []*waiter
	want      bool      // load wanted without a waiter (preload, POST load)
	wantSince time.Time // first-come order of pending loads
	loadStart time.Time
	loadedAt  time.Time
	lastUsed  time.Time
	expiresAt time.Time // zero: none
	loadSecs  float64
	estimate  int64
	measured  int64
	failures  int
	retryAt   time.Time
	cancel    context.CancelFunc // of the load in progress
	stopped   []chan struct{}    // closed when it is next unloaded
}

func (m *model) bytes() int64 {
	if m.measured > 0 {
		return m.measured
	}
	return m.estimate
}

type event struct {
	name string
	inst Instance
	err  error
	secs float64
	stop bool // a stop finished
}

// Manager owns the served models. Build it with New, run it with Run.
type Manager struct {
	cfg    Config
	names  map[string]string // name, alias or path → name
	order  []string
	models map[string]*model
	cmds   chan func()
	events chan event
	done   chan struct{} // closed when Run returns
	wg     sync.WaitGroup
	// owner-only
	draining bool
}

// New checks the specs and builds a Manager.
func New(cfg Config) (*Manager, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxWaiting <= 0 {
		cfg.MaxWaiting = 256
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 2 * time.Second
	}
	if cfg.BackoffMax < cfg.Backoff {
		cfg.BackoffMax = max(cfg.Backoff, time.Minute)
	}
	if len(cfg.Models) == 0 {
		return nil, errors.New("no model configured")
	}
	m := &Manager{cfg: cfg, names: map[string]string{}, models: map[string]*model{},
		cmds: make(chan func()), events: make(chan event, 2*len(cfg.Models)+1), done: make(chan struct{})}
	for _, s := range cfg.Models {
		if s.Name == "" {
			return nil, errors.New("a model has no name")
		}
		if _, dup := m.models[s.Name]; dup {
			return nil, fmt.Errorf("model %q is configured twice", s.Name)
		}
		m.models[s.Name] = &model{spec: s, state: StateUnloaded, estimate: s.Estimate}
		m.order = append(m.order, s.Name)
		m.names[s.Name] = s.Name
	}
	for _, s := range cfg.Models {
		for _, a := range s.Aliases {
			if other, dup := m.names[a]; dup && other != s.Name {
				return nil, fmt.Errorf("alias %q of model %q is already the name or an alias of model %q", a, s.Name, other)
			}
			m.names[a] = s.Name
		}
	}
	for _, s := range cfg.Models { // a path is accepted too, unless it is someone's name
		if _, taken := m.names[s.Path]; !taken && s.Path != "" {
			m.names[s.Path] = s.Name
		}
	}
	return m, nil
}

// Resolve maps a requested model (name, alias or path) to its name.
func (m *Manager) Resolve(requested string) (string, bool) {
	n, ok := m.names[requested]
	return n, ok
}

// Names lists the configured models in configuration order.
func (m *Manager) Names() []string { return slices.Clone(m.order) }

// Spec returns a model's configuration.
func (m *Manager) Spec(name string) (Spec, bool) {
	mod, ok := m.models[name] // spec is never written after New
	if !ok {
		return Spec{}, false
	}
	return mod.spec, true
}

// do runs f on the owner goroutine and waits for it; false if Run has ended.
func (m *Manager) do(f func()) bool {
	done := make(chan struct{})
	select {
	case m.cmds <- func() { f(); close(done) }:
		<-done
		return true
	case <-m.done:
		return false
	}
}

func stopped() error {
	return &Error{Code: CodeDraining, Msg: "server is shutting down", RetryAfter: time.Second}
}

// Lease holds a loaded model for one request: while any lease is out the
// model is not unloaded. Release it exactly once (later calls do nothing).
type Lease struct {
	m    *Manager
	name string
	inst Instance
	once sync.Once
}

// Instance is the loaded model.
func (l *Lease) Instance() Instance { return l.inst }

// Name is the model's name.
func (l *Lease) Name() string { return l.name }

// Release ends the request's hold. keepAlive (nil: the model's ttl) is how
// long the model stays loaded once idle: Never when negative, unloaded at
// once when 0 (Ollama's keep_alive).
func (l *Lease) Release(keepAlive *time.Duration) {
	l.once.Do(func() {
		m := l.m
		m.do(func() { m.release(l.name, keepAlive) })
	})
}

// Acquire returns a lease on the model once it is loaded, loading it if
// needed. While it waits, onTick runs on every tick (SSE keep-alives). When
// ctx ends first, it gives up its place and returns ctx's error.
func (m *Manager) Acquire(ctx context.Context, requested string, tick <-chan time.Time, onTick func()) (*Lease, error) {
	name, ok := m.Resolve(requested)
	if !ok {
		return nil, &Error{Code: CodeNotFound, Msg: fmt.Sprintf("model %q is not served here; GET /v1/models lists the models", requested)}
	}
	w := &waiter{reply: make(chan result, 1)}
	if !m.do(func() { m.enqueue(name, w) }) {
		return nil, stopped()
	}
	for {
		select {
		case r := <-w.reply:
			return r.lease, r.err
		case <-tick:
			onTick()
		case <-ctx.Done():
			m.do(func() { m.forget(name, w) })
			select { // the result may have been sent before forget ran
			case r := <-w.reply:
				if r.lease != nil {
					r.lease.Release(nil)
				}
			default:
			}
			return nil, ctx.Err()
		}
	}
}

// Load loads a model (POST /api/models/{name}/load) and returns once it is
// ready, or why not. Its idle time counts from then, with its ttl.
func (m *Manager) Load(ctx context.Context, name string) error {
	l, err := m.Acquire(ctx, name, nil, nil)
	if err != nil {
		return err
	}
	l.Release(nil)
	return nil
}

// Unload stops a model (POST /api/models/{name}/unload): it takes no new
// requests, finishes the ones it has, then stops. Unload returns once it has
// stopped or ctx ends. Requests that come later load it again.
func (m *Manager) Unload(ctx context.Context, requested string) error {
	name, ok := m.Resolve(requested)
	if !ok {
		return &Error{Code: CodeNotFound, Msg: fmt.Sprintf("model %q is not served here", requested)}
	}
	var wait chan struct{}
	if !m.do(func() {
		mod := m.models[name]
		switch mod.state {
		case StateReady:
			m.evict(mod, EvictAPI)
		case StateLoading:
			mod.cancel() // the load ends as failed; waiters get the reason
			mod.want = false
		case StateDraining:
		default:
			mod.want = false
			return
		}
		wait = make(chan struct{})
		mod.stopped = append(mod.stopped, wait)
	}) {
		return stopped()
	}
	if wait == nil {
		return nil
	}
	select {
	case <-wait:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Status returns a snapshot of every model in configuration order.
func (m *Manager) Status() []Status {
	var out []Status
	if !m.do(func() { out = m.statusLocked() }) {
		return nil
	}
	return out
}

// StatusOf returns one model's snapshot.
func (m *Manager) StatusOf(name string) (Status, bool) {
	for _, s := range m.Status() {
		if s.Name == name {
			return s, true
		}
	}
	return Status{}, false
}

// Instance returns a model's instance if it is loaded (nil otherwise), for
// /stats; it holds nothing.
func (m *Manager) Instance(name string) Instance {
	var inst Instance
	m.do(func() {
		if mod, ok := m.models[name]; ok && (mod.state == StateReady || mod.state == StateDraining) {
			inst = mod.inst
		}
	})
	return inst
}

// Drain refuses new requests and waiting loads from now on (the server is
// shutting down) and returns a channel closed once no request holds a model.
func (m *Manager) Drain() <-chan struct{} {
	out := make(chan struct{})
	var chans []<-chan struct{}
	if !m.do(func() {
		m.draining = true
		for _, name := range m.order {
			mod := m.models[name]
			m.failWaiters(mod, stopped())
			mod.want = false
			if mod.inst != nil && (mod.state == StateReady || mod.state == StateDraining) {
				chans = append(chans, mod.inst.Drain())
			}
		}
	}) {
		close(out)
		return out
	}
	go func() {
		for _, c := range chans {
			<-c
		}
		close(out)
	}()
	return out
}

// Abort fails whatever every loaded model still has queued or running.
func (m *Manager) Abort(msg string) {
	m.do(func() {
		for _, name := range m.order {
			if mod := m.models[name]; mod.inst != nil {
				mod.inst.Abort(msg)
			}
		}
	})
}

// Run owns the models until ctx ends, then stops every loaded one and
// returns once all are stopped.
func (m *Manager) Run(ctx context.Context) error {
	defer close(m.done)
	tick := m.cfg.Tick
	if tick == nil {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		tick = t.C
	}
	now := m.cfg.Now()
	for _, name := range m.order {
		mod := m.models[name]
		m.setState(mod, StateUnloaded)
		m.reportMemory(mod)
		if mod.spec.Preload {
			mod.want, mod.wantSince = true, now
		}
	}
	m.schedule()
	for {
		select {
		case f := <-m.cmds:
			f()
		case ev := <-m.events:
			m.onEvent(ev)
		case <-tick:
			m.onTick()
		case <-ctx.Done():
			m.shutdown()
			return nil
		}
		m.schedule()
	}
}

// shutdown stops loads in progress and every loaded model, in parallel.
func (m *Manager) shutdown() {
	for _, name := range m.order {
		mod := m.models[name]
		m.failWaiters(mod, stopped())
		if mod.cancel != nil {
			mod.cancel()
		}
	}
	m.wg.Wait() // loads and stops in progress have sent their event
	for len(m.events) > 0 {
		ev := <-m.events
		if !ev.stop && ev.err == nil {
			m.models[ev.name].inst, m.models[ev.name].state = ev.inst, StateReady
		}
	}
	var wg sync.WaitGroup
	for _, name := range m.order {
		mod := m.models[name]
		if mod.inst != nil && (mod.state == StateReady || mod.state == StateDraining) {
			wg.Add(1)
			go func(inst Instance) { defer wg.Done(); inst.Stop() }(mod.inst)
		}
	}
	wg.Wait()
	for _, name := range m.order {
		mod := m.models[name]
		mod.inst = nil
		m.setState(mod, StateUnloaded)
		m.closeStopped(mod)
	}
}

func (m *Manager) setState(mod *model, state string) {
	mod.state = state
	if m.cfg.Hooks.State != nil {
		m.cfg.Hooks.State(mod.spec.Name, state)
	}
}

func (m *Manager) reportMemory(mod *model) {
	if m.cfg.Hooks.Memory != nil {
		m.cfg.Hooks.Memory(mod.spec.Name, mod.estimate, mod.measured)
	}
}

func (m *Manager) room() Room {
	return Room{Budget: m.cfg.MemoryBudget, MaxLoaded: m.cfg.MaxLoaded, MinResidency: m.cfg.MinResidency}
}

// enqueue hands out a lease at once when the model is ready; otherwise the
// waiter waits for a load (or is refused).
func (m *Manager) enqueue(name string, w *waiter) {
	mod := m.models[name]
	now := m.cfg.Now()
	w.since = now
	if m.draining {
		w.reply <- result{err: stopped()}
		return
	}
	if mod.state == StateReady {
		w.reply <- result{lease: m.lend(mod)}
		return
	}
	if mod.state == StateFailed && now.Before(mod.retryAt) {
		w.reply <- result{err: m.failure(mod, now)}
		return
	}
	if need := mod.bytes(); m.cfg.MemoryBudget > 0 && need > m.cfg.MemoryBudget {
		w.reply <- result{err: m.tooLarge(mod)}
		return
	}
	if len(mod.waiters) >= m.cfg.MaxWaiting {
		w.reply <- result{err: &Error{Code: CodeBusy, RetryAfter: time.Second,
			Msg: fmt.Sprintf("%d requests are already waiting for model %q to load; retry later", len(mod.waiters), name)}}
		return
	}
	if len(mod.waiters) == 0 && !mod.want {
		mod.wantSince = now
	}
	mod.waiters = append(mod.waiters, w)
}

func (m *Manager) forget(name string, w *waiter) {
	mod := m.models[name]
	if i := slices.Index(mod.waiters, w); i >= 0 {
		mod.waiters = slices.Delete(mod.waiters, i, i+1)
	}
}

func (m *Manager) lend(mod *model) *Lease {
	mod.refs++
	mod.expiresAt = time.Time{}
	return &Lease{m: m, name: mod.spec.Name, inst: mod.inst}
}

func (m *Manager) release(name string, keepAlive *time.Duration) {
	mod := m.models[name]
	mod.refs--
	now := m.cfg.Now()
	mod.lastUsed = now
	if mod.state == StateDraining {
		m.stopWhenIdle(mod)
		return
	}
	if mod.refs > 0 || mod.state != StateReady {
		return
	}
	ttl := mod.spec.TTL
	if keepAlive != nil {
		ttl = *keepAlive
	}
	switch {
	case ttl == 0:
		m.evict(mod, EvictKeepAlive)
	case ttl > 0:
		mod.expiresAt = now.Add(ttl)
	default:
		mod.expiresAt = time.Time{}
	}
}

func (m *Manager) failure(mod *model, now time.Time) *Error {
	return &Error{Code: CodeUnavailable, RetryAfter: max(time.Second, mod.retryAt.Sub(now)),
		Msg: fmt.Sprintf("model %q failed to load: %s", mod.spec.Name, mod.reason)}
}

func (m *Manager) tooLarge(mod *model) *Error {
	return &Error{Code: CodeTooLarge, Msg: fmt.Sprintf("model %q needs %s, %s available (--memory-budget)",
		mod.spec.Name, FormatBytes(mod.bytes()), FormatBytes(m.cfg.MemoryBudget))}
}

func (m *Manager) failWaiters(mod *model, err error) {
	for _, w := range mod.waiters {
		w.reply <- result{err: err}
	}
	mod.waiters = nil
}

// evict takes a ready model out of service: no new leases; it stops once
// the requests holding it have finished.
func (m *Manager) evict(mod *model, reason string) {
	if mod.state != StateReady {
		return
	}
	m.cfg.Log.Info("unloading model", "model", mod.spec.Name, "reason", reason, "in_flight", mod.refs)
	if m.cfg.Hooks.Evict != nil {
		m.cfg.Hooks.Evict(mod.spec.Name, reason)
	}
	m.setState(mod, StateDraining)
	mod.expiresAt = time.Time{}
	m.stopWhenIdle(mod)
}

func (m *Manager) stopWhenIdle(mod *model) {
	if mod.state != StateDraining || mod.refs > 0 || mod.inst == nil {
		return
	}
	inst, name := mod.inst, mod.spec.Name
	mod.inst = nil // stopping: stopWhenIdle runs once
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		inst.Stop()
		m.events <- event{name: name, stop: true}
	}()
}

func (m *Manager) onEvent(ev event) {
	mod := m.models[ev.name]
	now := m.cfg.Now()
	if ev.stop {
		m.cfg.Log.Info("model unloaded", "model", mod.spec.Name)
		m.setState(mod, StateUnloaded)
		m.closeStopped(mod)
		if mod.measured > 0 { // what the workers measured is the next load's estimate
			mod.estimate, mod.measured = mod.measured, 0
			m.reportMemory(mod)
		}
		switch { // it rejoins the line in the order its requests came
		case len(mod.waiters) > 0:
			mod.wantSince = mod.waiters[0].since
		case mod.want:
			mod.wantSince = now
		}
		return
	}
	mod.cancel = nil
	if ev.err != nil {
		result := "failed"
		var e *Error
		if errors.As(ev.err, &e) && e.Code == CodeTimeout {
			result = "timeout"
		}
		if m.cfg.Hooks.Load != nil {
			m.cfg.Hooks.Load(mod.spec.Name, result, ev.secs)
		}
		mod.failures++
		backoff := time.Duration(math.Min(float64(m.cfg.Backoff)*math.Exp2(float64(mod.failures-1)), float64(m.cfg.BackoffMax)))
		mod.retryAt = now.Add(backoff)
		mod.reason = ev.err.Error()
		m.setState(mod, StateFailed)
		m.cfg.Log.Error("model failed to load", "model", mod.spec.Name, "err", ev.err, "retry_in", backoff)
		m.failWaiters(mod, m.failure(mod, now))
		m.closeStopped(mod)
		return
	}
	if m.cfg.Hooks.Load != nil {
		m.cfg.Hooks.Load(mod.spec.Name, "ok", ev.secs)
	}
	mod.inst, mod.failures, mod.reason, mod.retryAt = ev.inst, 0, "", time.Time{}
	mod.loadedAt, mod.lastUsed, mod.loadSecs, mod.want = now, now, ev.secs, false
	m.setState(mod, StateReady)
	m.cfg.Log.Info("model loaded", "model", mod.spec.Name, "seconds", ev.secs)
	for _, w := range mod.waiters {
		w.reply <- result{lease: m.lend(mod)}
	}
	mod.waiters = nil
	if mod.refs == 0 { // loaded without a request (preload, POST load)
		mod.refs = 1
		m.release(mod.spec.Name, nil)
	}
}

func (m *Manager) closeStopped(mod *model) {
	for _, c := range mod.stopped {
		close(c)
	}
	mod.stopped = nil
}

func (m *Manager) onTick() {
	now := m.cfg.Now()
	for _, name := range m.order {
		mod := m.models[name]
		if mod.state == StateReady {
			if b := mod.inst.MemoryBytes(); b > 0 && b != mod.measured {
				mod.measured = b
				m.reportMemory(mod)
			}
			if mod.refs == 0 && !mod.expiresAt.IsZero() && !now.Before(mod.expiresAt) {
				m.evict(mod, EvictTTL)
			}
		}
		// A failed preloaded model is tried again once its backoff passes.
		if mod.state == StateFailed && mod.spec.Preload && !m.draining && !now.Before(mod.retryAt) && !mod.want {
			mod.want, mod.wantSince = true, now
		}
	}
}

func (m *Manager) residents() []Resident {
	var res []Resident
	for _, name := range m.order {
		mod := m.models[name]
		switch mod.state {
		case StateLoading, StateReady, StateDraining:
			res = append(res, Resident{Name: name, Bytes: mod.bytes(), State: mod.state, Idle: mod.refs == 0,
				Pinned: mod.spec.Pin, LoadedAt: mod.loadedAt, LastUsed: mod.lastUsed})
		}
	}
	return res
}

// schedule starts the loads that are wanted, first come first served: the
// oldest waiting load goes first, unloading idle models (and, past the age
// cap, busy ones) to make room; later loads wait behind it.
func (m *Manager) schedule() {
	if m.draining {
		return
	}
	now := m.cfg.Now()
	var pending []*model
	for _, name := range m.order {
		mod := m.models[name]
		wanted := len(mod.waiters) > 0 || mod.want
		if !wanted {
			continue
		}
		if mod.state == StateUnloaded || (mod.state == StateFailed && !now.Before(mod.retryAt)) {
			pending = append(pending, mod)
		}
	}
	sort.SliceStable(pending, func(i, j int) bool { return pending[i].wantSince.Before(pending[j].wantSince) })
	for _, mod := range pending {
		need := mod.bytes()
		if m.cfg.MemoryBudget > 0 && need > m.cfg.MemoryBudget {
			m.cfg.Log.Error("model cannot fit in the memory budget", "model", mod.spec.Name, "needs", need, "budget", m.cfg.MemoryBudget)
			m.failWaiters(mod, m.tooLarge(mod))
			mod.want = false
			continue
		}
		res := m.residents()
		force := m.cfg.AgeCap > 0 && now.Sub(mod.wantSince) >= m.cfg.AgeCap
		victims, ok := ChooseVictims(res, need, m.room(), now, force)
		if !ok {
			return // first come: later loads wait behind this one
		}
		for _, v := range victims {
			m.evict(m.models[v], EvictRoom)
		}
		if len(victims) > 0 || !FitsNow(m.residents(), need, m.room()) {
			return // starts once the victims have stopped
		}
		m.startLoad(mod)
	}
}

func (m *Manager) startLoad(mod *model) {
	now := m.cfg.Now()
	mod.loadStart = now
	m.setState(mod, StateLoading)
	ctx, cancel := context.WithCancel(context.Background())
	if m.cfg.LoadTimeout > 0 {
		ctx, cancel = context.WithTimeout(context.Background(), m.cfg.LoadTimeout)
	}
	mod.cancel = cancel
	spec, load, timeout := mod.spec, m.cfg.Load, m.cfg.LoadTimeout
	m.cfg.Log.Info("loading model", "model", spec.Name, "path", spec.Path, "estimated_bytes", mod.bytes(), "waiting", len(mod.waiters))
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer cancel()
		t0 := time.Now()
		inst, err := load(ctx, spec)
		if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = &Error{Code: CodeTimeout, Msg: fmt.Sprintf("not loaded within the load timeout (%s): %v", timeout, err)}
		} else if err != nil && errors.Is(ctx.Err(), context.Canceled) {
			err = fmt.Errorf("load cancelled: %w", err)
		}
		m.events <- event{name: spec.Name, inst: inst, err: err, secs: time.Since(t0).Seconds()}
	}()
}

func (m *Manager) statusLocked() []Status {
	out := make([]Status, 0, len(m.order))
	for _, name := range m.order {
		mod := m.models[name]
		st := Status{Name: name, Path: mod.spec.Path, Aliases: mod.spec.Aliases, State: mod.state, Reason: mod.reason,
			Workers: mod.spec.Workers, Pinned: mod.spec.Pin, Estimated: mod.estimate, Measured: mod.measured,
			InFlight: mod.refs, Queued: len(mod.waiters), LoadSeconds: mod.loadSecs, ExpiresAt: mod.expiresAt,
			TTL: FormatTTL(mod.spec.TTL)}
		if mod.state == StateReady || mod.state == StateDraining {
			st.LoadedAt = mod.loadedAt
		}
		if mod.state == StateFailed {
			st.RetryAt = mod.retryAt
		}
		out = append(out, st)
	}
	return out
}

// ParseTTL reads a ttl or keep_alive as Ollama writes them: "never" or a
// negative number or duration (keep loaded), 0 (unload when idle), a Go
// duration ("10m", "1h30m") or a number of seconds.
func ParseTTL(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	switch strings.ToLower(s) {
	case "never", "forever":
		return Never, nil
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		if f < 0 {
			return Never, nil
		}
		if f > math.MaxInt64/float64(time.Second) {
			return 0, fmt.Errorf("%q is too long", s)
		}
		return time.Duration(f * float64(time.Second)), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q: want never, a number of seconds or a duration such as 5m", s)
	}
	if d < 0 {
		return Never, nil
	}
	return d, nil
}

// FormatTTL writes a ttl as configured: "never", "0s" or a duration.
func FormatTTL(d time.Duration) string {
	if d < 0 {
		return "never"
	}
	return d.String()
}

// FormatBytes writes n in binary units ("1.5 GiB").
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
