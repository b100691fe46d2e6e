package supervisor

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/scheduler"
)

func newTestPool(t *testing.T, cfg Config, r Router) *Pool {
	t.Helper()
	return NewPool(cfg, r, newMetrics(), testLog())
}

func procOf(t *testing.T, e routerEvent) *Process {
	t.Helper()
	proc, ok := e.B.(*Process)
	if !ok {
		t.Fatalf("backend %T is not a *Process", e.B)
	}
	return proc
}

// A worker that always dies before hello is retried with backoff, then its
// slot is marked failed with the reason; the router never sees it.
func TestPoolCrashOnStartGivesUp(t *testing.T) {
	pl := newPlan(t, "crash-on-start")
	cfg := testConfig(pl)
	cfg.Restart = RestartPolicy{BackoffBase: time.Millisecond, BackoffMax: 2 * time.Millisecond, HalfLife: time.Hour, Threshold: 2.5, FailedRetry: time.Hour}
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	runPool(t, p)
	eventually(t, "slot failed", func() bool { return slot0(p).State == StateFailed })
	st := slot0(p)
	if st.Starts != 3 || pl.count(0) != 3 {
		t.Errorf("starts %d (commands %d), want 3 before giving up at score > 2.5", st.Starts, pl.count(0))
	}
	for _, want := range []string{"exited with status 1", "FileNotFoundError", "/models/missing/config.json"} {
		if !strings.Contains(st.Failure, want) {
			t.Errorf("failure %q lacks %q", st.Failure, want)
		}
	}
	// Each start's reason stands alone; it does not quote the previous one.
	if n := strings.Count(st.Failure, "before hello"); n != 1 {
		t.Errorf("failure mentions %d starts: %q", n, st.Failure)
	}
	if st.PID != 0 || st.Healthy {
		t.Errorf("a failed slot shows pid %d, healthy %v", st.PID, st.Healthy)
	}
	if st.Score != 0 {
		t.Errorf("score %v after giving up, want it reset to 0", st.Score)
	}
	select {
	case <-p.Ready():
		t.Error("pool ready without any hello")
	default:
	}
	if evs := r.wait(t, "nothing", func([]routerEvent) bool { return true }); len(evs) != 0 {
		t.Errorf("router saw %s", summarize(evs))
	}
}

// A fatal error frame (id 0) before hello is the reason reported.
func TestPoolFatalErrorBeforeHello(t *testing.T) {
	pl := newPlan(t, "fatal-error")
	cfg := testConfig(pl)
	cfg.Restart.BackoffBase, cfg.Restart.BackoffMax = time.Hour, time.Hour
	p := newTestPool(t, cfg, newFakeRouter())
	runPool(t, p)
	eventually(t, "backoff", func() bool { return slot0(p).State == StateBackoff })
	f := slot0(p).Failure
	if !strings.Contains(f, "model failed to load: out of memory") || !strings.Contains(f, "exited with status 1") {
		t.Errorf("failure %q", f)
	}
}

func TestPoolRefusesBadProtocolVersion(t *testing.T) {
	pl := newPlan(t, "bad-version", "ok")
	cfg := testConfig(pl)
	r := newFakeRouter()
	// A backoff of an hour keeps the refusal visible in Status.
	cfg.Restart.BackoffBase, cfg.Restart.BackoffMax = time.Hour, time.Hour
	p := newTestPool(t, cfg, r)
	stop := runPool(t, p)
	eventually(t, "backoff after the refused hello", func() bool { return slot0(p).State == StateBackoff })
	st := slot0(p)
	for _, want := range []string{"version 1", fmt.Sprintf("version %d", ipc.Version)} {
		if !strings.Contains(st.Failure, want) {
			t.Errorf("failure %q does not name %s", st.Failure, want)
		}
	}
	if strings.Contains(st.Failure, "out of memory killer") {
		t.Errorf("failure %q blames the OOM killer for the supervisor's own kill", st.Failure)
	}
	stop()
	if n := count(r.wait(t, "-", func([]routerEvent) bool { return true }), "add"); n != 0 {
		t.Fatalf("a worker of the wrong version was added to the router")
	}

	// With a quick backoff the next (good) start is taken.
	pl2 := newPlan(t, "bad-version", "ok")
	r2 := newFakeRouter()
	p2 := newTestPool(t, testConfig(pl2), r2)
	runPool(t, p2)
	r2.waitCount(t, "add", 1)
	<-p2.Ready()
	if h := p2.Hello(); h == nil || h.Model != "fake-model" {
		t.Fatalf("hello %+v", h)
	}
	if pl2.count(0) != 2 {
		t.Fatalf("%d starts, want 2", pl2.count(0))
	}
}

func TestPoolSlowStartKilledAtStartTimeout(t *testing.T) {
	pl := newPlan(t, "slow-start")
	cfg := testConfig(pl)
	cfg.StartTimeout = 300 * time.Millisecond
	cfg.Restart.BackoffBase, cfg.Restart.BackoffMax = time.Hour, time.Hour
	p := newTestPool(t, cfg, newFakeRouter())
	start := time.Now()
	runPool(t, p)
	eventually(t, "backoff after the start timeout", func() bool { return slot0(p).State == StateBackoff })
	if el := time.Since(start); el < cfg.StartTimeout {
		t.Errorf("gave up after %s, before the start timeout", el)
	}
	st := slot0(p)
	if !strings.Contains(st.Failure, "no hello within 300ms") || !strings.Contains(st.Failure, "killed by SIGKILL") {
		t.Errorf("failure %q", st.Failure)
	}
	if strings.Contains(st.Failure, "out of memory killer") {
		t.Errorf("failure %q blames the OOM killer for the supervisor's own kill", st.Failure)
	}
	// The worker may not even have logged its pid on a loaded machine.
	if pid := stderrPID([]string{st.Failure}, "pid"); pid != 0 {
		assertGone(t, pid)
	}
	if n := countChildren(t); n != 0 {
		t.Fatalf("%d child processes left after the start timeout", n)
	}
}

// crashScenario runs one worker that is replaced after misbehaving, with the
// fake router, and returns the remove event and the slot's status once the
// replacement is registered.
func crashScenario(t *testing.T, cfg Config, pl *plan, provoke func(r *fakeRouter, first *Process)) (routerEvent, SlotStatus, *Process) {
	t.Helper()
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	runPool(t, p)
	evs := r.waitCount(t, "add", 1)
	first := procOf(t, nth(evs, "add", 1))
	if provoke != nil {
		provoke(r, first)
	}
	evs = r.waitCount(t, "add", 2)
	rm := nth(evs, "remove", 1)
	if count(evs, "remove") != 1 || rm.ID != 0 {
		t.Fatalf("router saw %s", summarize(evs))
	}
	if indexOf(evs, "remove") > lastIndexOf(evs, "add") {
		t.Fatalf("replacement added before the dead worker was removed: %s", summarize(evs))
	}
	second := procOf(t, nth(evs, "add", 2))
	if second.PID == first.PID {
		t.Fatal("the replacement has the dead worker's pid")
	}
	assertGone(t, first.PID)
	st := slot0(p)
	if st.State != StateReady || st.Restarts != 1 || st.Starts != 2 || st.LastExit == nil {
		t.Fatalf("status %+v", st)
	}
	return rm, st, first
}

func TestPoolCrashMidStreamClassified(t *testing.T) {
	for _, c := range []struct {
		spec, sig, stderr string
	}{
		{"crash-mid-stream,k=2", "SIGSEGV", "Fatal Python error: Segmentation fault"},
		{"crash-mid-stream,k=2,sig=ABRT", "SIGABRT", "Fatal Python error: Aborted"},
		{"crash-mid-stream,k=2,sig=KILL", "SIGKILL", ""},
	} {
		t.Run(c.sig, func(t *testing.T) {
			pl := newPlan(t, c.spec, "ok")
			rm, st, _ := crashScenario(t, testConfig(pl), pl, func(r *fakeRouter, _ *Process) {
				r.dispatch(t, 0, &ipc.Message{T: ipc.TGen, ID: 7, Prompt: []int32{10}, MaxTokens: 100})
			})
			le := st.LastExit
			if le.Signal != c.sig || le.Code != -1 || le.Reason != "crash" || le.Cause != "" {
				t.Errorf("last exit %+v", le)
			}
			if c.stderr != "" && !hasLine(le.Stderr, c.stderr) {
				t.Errorf("last exit stderr %q lacks %q", le.Stderr, c.stderr)
			}
			if !strings.Contains(rm.Cause, "killed by "+c.sig) {
				t.Errorf("router told %q", rm.Cause)
			}
			if (c.sig == "SIGKILL") != strings.Contains(rm.Cause, "out of memory killer") {
				t.Errorf("cause %q: only an unexplained SIGKILL is blamed on the OOM killer", rm.Cause)
			}
		})
	}
}

func TestPoolWedgeDetectedByHeartbeat(t *testing.T) {
	pl := newPlan(t, "hang", "ok")
	cfg := testConfig(pl)
	cfg.HeartbeatInterval, cfg.HeartbeatTimeout = 20*time.Millisecond, 200*time.Millisecond
	rm, st, _ := crashScenario(t, cfg, pl, nil)
	le := st.LastExit
	if le.Reason != "wedged" || le.Signal != "SIGKILL" || !strings.Contains(le.Cause, "no heartbeat for") {
		t.Errorf("last exit %+v", le)
	}
	if !strings.Contains(rm.Cause, "worker wedged: no heartbeat") {
		t.Errorf("router told %q", rm.Cause)
	}
}

func TestPoolWedgeDetectedByProgressWatchdog(t *testing.T) {
	pl := newPlan(t, "stall", "ok")
	cfg := testConfig(pl)
	cfg.ProgressTimeout = 300 * time.Millisecond
	_, st, _ := crashScenario(t, cfg, pl, func(r *fakeRouter, _ *Process) {
		r.dispatch(t, 0, &ipc.Message{T: ipc.TGen, ID: 7, Prompt: []int32{10}, MaxTokens: 100})
	})
	le := st.LastExit
	if le.Reason != "wedged" || le.Signal != "SIGKILL" || !strings.Contains(le.Cause, "1 requests in flight and no token for") {
		t.Errorf("last exit %+v", le)
	}
}

func TestPoolGarbageReplacesWorker(t *testing.T) {
	for _, spec := range []string{"garbage-oversize", "garbage-body", "garbage-tok", "garbage-tok,on=gen"} {
		t.Run(spec, func(t *testing.T) {
			pl := newPlan(t, spec, "ok")
			_, st, _ := crashScenario(t, testConfig(pl), pl, func(r *fakeRouter, _ *Process) {
				if strings.HasSuffix(spec, "on=gen") {
					r.dispatch(t, 0, &ipc.Message{T: ipc.TGen, ID: 7, Prompt: []int32{10}, MaxTokens: 100})
				}
			})
			le := st.LastExit
			if le.Reason != "protocol" || le.Signal != "SIGKILL" || !strings.Contains(le.Cause, "protocol error") {
				t.Errorf("last exit %+v", le)
			}
			if strings.Contains(spec, "tok") && !strings.Contains(le.Cause, "does not own") {
				t.Errorf("cause %q", le.Cause)
			}
		})
	}
}

// Stopping the pool stops a worker that ignores shutdown and SIGTERM, and
// leaves no process behind.
func TestPoolStopLeavesNoChild(t *testing.T) {
	pl := newPlan(t, "ignore-shutdown")
	cfg := testConfig(pl)
	cfg.StopGrace = 100 * time.Millisecond
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	stop := runPool(t, p)
	proc := procOf(t, nth(r.waitCount(t, "add", 1), "add", 1))
	stop()
	e := proc.Exit()
	if e == nil || e.Signal != syscall.SIGKILL || !e.Intended {
		t.Fatalf("exit %+v", e)
	}
	st := slot0(p)
	if st.State != StateStopped || st.LastExit == nil || st.LastExit.Reason != "stop" || st.PID != 0 {
		t.Fatalf("status %+v", st)
	}
	if evs := r.waitCount(t, "remove", 1); nth(evs, "remove", 1).ID != 0 {
		t.Fatalf("router saw %s", summarize(evs))
	}
	assertGone(t, proc.PID)
	if n := countChildren(t); n != 0 {
		t.Fatalf("%d child processes left", n)
	}
}

// A worker being recycled that takes longer to exit than the heartbeat
// timeout (it ignores shutdown and SIGTERM here) is still a recycle, not a
// wedge: the staged stop ends it, and the slot is not charged a failure.
func TestPoolRecycleSlowShutdownIsNotAWedge(t *testing.T) {
	pl := newPlan(t, "ignore-shutdown", "ok")
	cfg := testConfig(pl)
	cfg.RecycleRequests = 1
	// The staged stop (2×StopGrace) outlasts the heartbeat timeout.
	cfg.HeartbeatInterval, cfg.HeartbeatTimeout = 10*time.Millisecond, 300*time.Millisecond
	cfg.StopGrace = 500 * time.Millisecond
	cfg.Restart.BackoffBase, cfg.Restart.BackoffMax = time.Hour, time.Hour // a failure would stall the test
	r := newFakeRouter()
	r.setExtraServed(1)
	p := newTestPool(t, cfg, r)
	runPool(t, p)
	evs := r.waitCount(t, "add", 2)
	if i, j := indexOf(evs, "draining"), indexOf(evs, "remove"); i < 0 || j < i {
		t.Fatalf("recycle did not drain first: %s", summarize(evs))
	}
	st := slot0(p)
	if st.LastExit == nil || st.LastExit.Reason != "recycle" || st.LastExit.Signal != "SIGKILL" || st.LastExit.Cause != "" {
		t.Fatalf("last exit %+v, want a recycle ended by the staged stop's SIGKILL", st.LastExit)
	}
	if st.Score != 0 {
		t.Fatalf("a recycle was charged as a failure: score %v", st.Score)
	}
}

func lastIndexOf(evs []routerEvent, kind string) int {
	for i := len(evs) - 1; i >= 0; i-- {
		if evs[i].Kind == kind {
			return i
		}
	}
	return -1
}

func TestPoolRecycleOnRSS(t *testing.T) {
	pl := newPlan(t, "ok,rss=3000000", "ok,rss=1000")
	cfg := testConfig(pl)
	cfg.RecycleRSS = 2 << 20
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	runPool(t, p)
	evs := r.waitCount(t, "add", 2)
	if i, j := indexOf(evs, "draining"), indexOf(evs, "remove"); i < 0 || j < i {
		t.Fatalf("recycle did not drain first: %s", summarize(evs))
	}
	st := slot0(p)
	if le := st.LastExit; le == nil || le.Reason != "recycle" || le.Code != 0 || le.Signal != "" {
		t.Fatalf("last exit %+v, want a clean recycle", st.LastExit)
	}
	if st.Score != 0 || st.Restarts != 1 {
		t.Fatalf("status %+v", st)
	}
}

func indexOf(evs []routerEvent, kind string) int {
	for i, e := range evs {
		if e.Kind == kind {
			return i
		}
	}
	return -1
}

// CanServe is true while a slot starts or serves, false once every slot has
// failed for good: the front door then refuses at once instead of queueing.
func TestPoolCanServe(t *testing.T) {
	pl := newPlan(t, "crash-on-start")
	cfg := testConfig(pl)
	cfg.Workers = 1
	cfg.Restart.Threshold = 1.5 // the second failed start gives the slot up
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	if !p.CanServe() {
		t.Fatal("a pool that is starting cannot serve")
	}
	runPool(t, p)
	eventually(t, "slot failed", func() bool { return slot0(p).State == StateFailed })
	if p.CanServe() {
		t.Fatal("CanServe with the only slot failed")
	}
}

// ---- with the real scheduler ----

type schedPool struct {
	pool  *Pool
	sched *scheduler.Scheduler
	ids   atomic.Uint64
}

func newSchedPool(t *testing.T, cfg Config) *schedPool {
	t.Helper()
	m := newMetrics()
	sp := &schedPool{sched: newScheduler(t, m)}
	sp.pool = NewPool(cfg, sp.sched, m, testLog())
	runPool(t, sp.pool)
	return sp
}

func (sp *schedPool) submit(t *testing.T, first int32, maxTokens int) *scheduler.Request {
	t.Helper()
	r := scheduler.NewRequest(sp.ids.Add(1), []int32{first, 1, 2}, scheduler.Params{MaxTokens: maxTokens})
	if err := sp.sched.Submit(r); err != nil {
		t.Fatal(err)
	}
	return r
}

// A request whose worker dies mid-stream is resumed on the restarted worker;
// the client sees every token's text exactly once.
func TestSchedulerResumesAfterCrashWithoutRepeats(t *testing.T) {
	pl := newPlan(t, "crash-mid-stream,k=3", "ok")
	sp := newSchedPool(t, testConfig(pl))
	r := sp.submit(t, 1000, 10)
	text, last := collect(t, r)
	if last.Err != nil || last.FinishReason != "length" {
		t.Fatalf("final event %+v", last)
	}
	if want := fakeText(0, 10); text != want {
		t.Fatalf("client text %q, want %q", text, want)
	}
	if last.CompletionTokens != 10 {
		t.Errorf("completion tokens %d, want 10 across both workers", last.CompletionTokens)
	}
	st := slot0(sp.pool)
	if st.Restarts != 1 || st.LastExit == nil || st.LastExit.Signal != "SIGSEGV" || st.LastExit.Reason != "crash" ||
		!hasLine(st.LastExit.Stderr, "Fatal Python error: Segmentation fault") {
		t.Fatalf("status %+v, last exit %+v", st, st.LastExit)
	}
	// The pool keeps serving.
	text, last = collect(t, sp.submit(t, 7, 4))
	if last.Err != nil || text != fakeText(0, 4) {
		t.Fatalf("after the crash: %q %+v", text, last)
	}
}

// A chat request, which the worker tokenizes, resumes after a crash with its
// messages again: the fake checks that the resumed ids continue its own
// numbering, which starts from the prompt's first token, so a resume works
// only if the new worker tokenized the same prompt.
func TestSchedulerResumesInputRequest(t *testing.T) {
	pl := newPlan(t, "crash-mid-stream,k=3", "ok")
	sp := newSchedPool(t, testConfig(pl))
	msgs := []ipc.ChatMessage{{Role: "user", Content: "hi"}}
	r := scheduler.NewInputRequest(sp.ids.Add(1), scheduler.Input{Messages: msgs}, scheduler.Params{MaxTokens: 10})
	if err := sp.sched.Submit(r); err != nil {
		t.Fatal(err)
	}
	text, last := collect(t, r)
	if last.Err != nil || last.FinishReason != "length" || text != fakeText(0, 10) {
		t.Fatalf("text %q, final event %+v", text, last)
	}
	if want := len("user:hi\n"); last.PromptTokens != want || last.CompletionTokens != 10 {
		t.Errorf("usage %d prompt + %d completion tokens, want %d + 10", last.PromptTokens, last.CompletionTokens, want)
	}
	if st := slot0(sp.pool); st.Restarts != 1 {
		t.Errorf("restarts %d, want 1", st.Restarts)
	}
}

// A request that crashes its worker, then twice the worker it runs alone on
// (probation, --poison-after 2), is declared poison: it fails with
// worker_crash naming the signal, after exactly the text it had streamed;
// the slot recovers.
func TestSchedulerFailsPoisonAfterCrashAlone(t *testing.T) {
	pl := newPlan(t, "crash-mid-stream,k=3", "crash-mid-stream,k=1", "crash-mid-stream,k=1", "ok")
	sp := newSchedPool(t, testConfig(pl))
	r := sp.submit(t, 1000, 10)
	text, last := collect(t, r)
	var se *scheduler.Error
	if !errors.As(last.Err, &se) || se.Reason != scheduler.ReasonWorkerCrash {
		t.Fatalf("final event %+v, want a worker_crash error", last)
	}
	if !strings.Contains(se.Msg, "alone") || !strings.Contains(se.Msg, "SIGSEGV") {
		t.Errorf("error message %q", se.Msg)
	}
	// Worker 1 streamed tokens 0..2 (holding back token 2's text), workers 2
	// and 3 one token each (with the previous one's text, holding back their own).
	if want := fakeText(0, 4); text != want {
		t.Fatalf("client text %q, want %q", text, want)
	}
	text, last = collect(t, sp.submit(t, 5, 3))
	if last.Err != nil || text != fakeText(0, 3) {
		t.Fatalf("after the poison: %q %+v", text, last)
	}
	if st := slot0(sp.pool); st.Restarts != 3 {
		t.Fatalf("restarts %d", st.Restarts)
	}
}

// A request whose worker crashes, and whose next worker crashes too once it
// has cleared probation (batched again, not alone), is not charged: it
// completes on the third worker with the full text.
func TestSchedulerCrashesOutsideProbationDoNotFail(t *testing.T) {
	pl := newPlan(t, "crash-mid-stream,k=3", "crash-mid-stream,k=3", "ok")
	sp := newSchedPool(t, testConfig(pl))
	text, last := collect(t, sp.submit(t, 1000, 10))
	if last.Err != nil || last.FinishReason != "length" || text != fakeText(0, 10) {
		t.Fatalf("text %q, final event %+v", text, last)
	}
}

// A worker that dies after streaming a request's last token but before its
// done frame still held back the last token's text. The request is resumed
// with max_tokens 0 and the new worker flushes that text: the client gets the
// whole answer.
func TestSchedulerCrashAfterLastToken(t *testing.T) {
	pl := newPlan(t, "crash-mid-stream,k=3", "ok")
	sp := newSchedPool(t, testConfig(pl))
	text, last := collect(t, sp.submit(t, 1000, 3))
	if last.Err != nil || last.FinishReason != "length" || text != fakeText(0, 3) {
		t.Fatalf("%q %+v", text, last)
	}
}

// The progress watchdog replaces a worker that answers pings but makes no
// progress; its request is retried on the replacement and completes.
func TestSchedulerStalledRequestSurvives(t *testing.T) {
	pl := newPlan(t, "stall", "ok")
	cfg := testConfig(pl)
	// Long enough that the replacement, starting on a loaded machine, is not
	// taken for stalled too (a second kill would fail the request).
	cfg.ProgressTimeout = time.Second
	sp := newSchedPool(t, cfg)
	text, last := collect(t, sp.submit(t, 50, 6))
	if last.Err != nil || text != fakeText(0, 6) {
		t.Fatalf("%q %+v", text, last)
	}
	if st := slot0(sp.pool); st.LastExit == nil || st.LastExit.Reason != "wedged" {
		t.Fatalf("status %+v", st)
	}
}

// Recycling after RecycleRequests drains the worker and replaces it; no
// request is lost or damaged on the way, including requests submitted while
// workers drain and restart.
func TestSchedulerRecycleLosesNoRequest(t *testing.T) {
	pl := newPlan(t, "ok,tokdelay=1ms")
	pl.specs[1] = []string{"ok,tokdelay=1ms"}
	cfg := testConfig(pl)
	cfg.Workers = 2
	cfg.RecycleRequests = 3
	sp := newSchedPool(t, cfg)
	recycles := func() int {
		n := 0
		for _, st := range sp.pool.Status() {
			if st.LastExit != nil && st.LastExit.Reason == "recycle" {
				n++
			}
		}
		return n
	}
	const waves, per = 3, 10
	for w := range waves {
		reqs := make([]*scheduler.Request, per)
		for i := range reqs {
			reqs[i] = sp.submit(t, int32(1000*w+100*i), 5+i%4)
		}
		for i, r := range reqs {
			text, last := collect(t, r)
			if last.Err != nil || last.FinishReason != "length" || text != fakeText(0, 5+i%4) {
				t.Fatalf("wave %d request %d: %q %+v", w, i, text, last)
			}
		}
		if w == 0 {
			// A worker served at least 5 of the 10: its recycling follows.
			eventually(t, "a recycle", func() bool { return recycles() > 0 })
		}
	}
	eventually(t, "every request counted as served", func() bool {
		served := 0
		for _, st := range sp.pool.Status() {
			served += st.Served
		}
		return served == waves*per
	})
	for _, st := range sp.pool.Status() {
		if st.Score != 0 {
			t.Errorf("slot %d charged a failure for recycling: %+v", st.Slot, st)
		}
	}
	if pl.count(0)+pl.count(1) < 3 {
		t.Fatalf("starts %d+%d", pl.count(0), pl.count(1))
	}
}

// Pongs set the prompt cache gauge, and the eviction counter adds what the
// worker's own counter grew by; a new process starts from its own count.
func TestPoolPromptCacheMetrics(t *testing.T) {
	pl := newPlan(t, "ok,cache=5000,evict=3,rss=3000000", "ok,cache=7000,evict=2,rss=1000")
	cfg := testConfig(pl)
	cfg.RecycleRSS = 2 << 20 // the first process is recycled at its first pong
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	stop := runPool(t, p)
	r.waitCount(t, "add", 2)
	eventually(t, "pongs of the second process", func() bool { return slot0(p).CacheEvictions >= 4 })
	stop() // no more pongs: the values below are final
	s := p.slots[0]
	s.mu.Lock()
	last := s.pong
	s.mu.Unlock()
	gauge := metricValue(t, p.m.PromptCacheBytes.WithLabelValues("0"))
	evicted := metricValue(t, p.m.PrefixCacheEvictions)
	if last.Cache != 7000 || gauge != 7000 {
		t.Errorf("cache bytes: last pong %d, gauge %v; want 7000", last.Cache, gauge)
	}
	// The first process's pongs added 3 each; the second's counter starts
	// again at its own first pong, without subtracting the first's.
	if rest := evicted - float64(last.Evicted); rest < 3 || int(rest)%3 != 0 {
		t.Errorf("evictions counter %v with the second process at %d: the first contributed %v", evicted, last.Evicted, rest)
	}
}

// The prompt cache budget each process's hello advertised reaches the
// router (a worker without a cache is not indexed for cache-aware routing)
// and the slot's status; a new process of the slot advertises its own.
func TestPoolPassesEachHellosCacheBudget(t *testing.T) {
	pl := newPlan(t, "ok,budget=8000,rss=3000000", "ok")
	cfg := testConfig(pl)
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	stop := runPool(t, p)
	adds := func(evs []routerEvent) (out []routerEvent) {
		for _, e := range evs {
			if e.Kind == "add" {
				out = append(out, e)
			}
		}
		return out
	}
	add := adds(r.waitCount(t, "add", 1))
	if !add[0].Info.PromptCache {
		t.Errorf("first process: AddWorker info %+v, want a prompt cache", add[0].Info)
	}
	if b := slot0(p).CacheBudget; b != 8000 {
		t.Errorf("status budget %d, want 8000", b)
	}
	if g := metricValue(t, p.m.PromptCacheBudget.WithLabelValues("0")); g != 8000 {
		t.Errorf("budget gauge %v, want 8000", g)
	}
	if h := p.Hello(); h == nil || h.CacheBytes != 8000 {
		t.Errorf("hello %+v", h)
	}
	stop()

	// A second process without a cache (budget 0): the first is recycled.
	pl = newPlan(t, "ok,budget=8000,rss=3000000", "ok")
	cfg = testConfig(pl)
	cfg.RecycleRSS = 2 << 20 // the first process is recycled at its first pong
	r = newFakeRouter()
	p = newTestPool(t, cfg, r)
	stop = runPool(t, p)
	defer stop()
	add = adds(r.waitCount(t, "add", 2))
	if !add[0].Info.PromptCache || add[1].Info.PromptCache {
		t.Errorf("AddWorker infos %+v, %+v: want the cache on, then off", add[0].Info, add[1].Info)
	}
	if b := slot0(p).CacheBudget; b != 0 {
		t.Errorf("status budget %d for a process without a cache", b)
	}
	if g := metricValue(t, p.m.PromptCacheBudget.WithLabelValues("0")); g != 0 {
		t.Errorf("budget gauge %v for a process without a cache", g)
	}
}

func metricValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := c.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}
