package scheduler

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"testing/synctest"
	"time"
	"unicode/utf8"

	"github.com/krserve/krserve/ipc"
)

// --- batching window -------------------------------------------------------

func TestFastPathDispatchesAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		w := h.addWorker(1)

		seed := int64(-7)
		r := NewRequest(42, []int32{5, 6, 7}, Params{
			MaxTokens: 16, Temperature: 0.5, TopP: 0.9, TopK: 40, MinP: 0.05, Seed: &seed,
			RepetitionPenalty: 1.1, PresencePenalty: 0.2, FrequencyPenalty: 0.3,
			LogitBias: map[int32]float64{9: -2}, Stop: []string{"\n\n"},
		})
		h.mustSubmit(r)

		sends := w.Sends()
		if len(sends) != 1 {
			t.Fatalf("%d sends, want 1 (fast path)", len(sends))
		}
		if !sends[0].at.Equal(h.start) {
			t.Errorf("dispatched after %v, want at once", sends[0].at.Sub(h.start))
		}
		if len(sends[0].msgs) != 1 {
			t.Fatalf("send has %d frames, want 1", len(sends[0].msgs))
		}
		g := sends[0].msgs[0]
		if g.T != ipc.TGen || g.ID != 42 || !slices.Equal(g.Prompt, []int32{5, 6, 7}) || g.MaxTokens != 16 ||
			g.Temperature != 0.5 || g.TopP != 0.9 || g.TopK != 40 || g.MinP != 0.05 ||
			!g.HasSeed || g.Seed != -7 || g.RepetitionPenalty != 1.1 || g.PresencePenalty != 0.2 ||
			g.FrequencyPenalty != 0.3 || g.LogitBias[9] != -2 || len(g.LogitBias) != 1 ||
			!slices.Equal(g.Stop, []string{"\n\n"}) || g.Resume != nil || g.Sent != 0 {
			t.Errorf("gen frame %+v does not carry the request", g)
		}
		if sum, n := metricValue(t, h.m.BatchWindowWait); n != 1 || sum != 0 {
			t.Errorf("window wait: %d samples summing %vs, want one of 0", n, sum)
		}

		// Without a seed, has_seed stays off.
		h.done(1, r, "stop")
		h.advance(5 * time.Millisecond)
		r2 := h.req(2, 8)
		h.mustSubmit(r2)
		sends = w.Sends()
		if len(sends) != 2 || sends[1].at.Sub(h.start) != 5*time.Millisecond {
			t.Fatalf("second request: sends %+v, want one more at 5ms", sends)
		}
		if g := sends[1].msgs[0]; g.HasSeed || g.Seed != 0 {
			t.Errorf("unseeded request sent with seed %d/%v", g.Seed, g.HasSeed)
		}
	})
}

// Arrivals for a busy worker with free slots are gathered for the window and
// sent in one Send when it closes.
func TestWindowGathersArrivals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, nil)
		w := h.addWorker(1)
		h.submit() // fast path; the worker is now busy with 7 free slots

		h.advance(time.Millisecond)
		r1 := h.submit() // opens the window at 1ms
		h.advance(500 * time.Microsecond)
		r2 := h.submit()
		h.advance(500 * time.Microsecond)
		r3 := h.submit()
		h.advance(999 * time.Microsecond) // 2.999ms
		if n := len(w.Sends()); n != 1 {
			t.Fatalf("%d sends before the window closed, want 1", n)
		}
		h.advance(time.Microsecond) // 3ms: the window closes
		sends := w.Sends()
		if len(sends) != 2 {
			t.Fatalf("%d sends, want 2", len(sends))
		}
		if got := sends[1].at.Sub(h.start); got != 3*time.Millisecond {
			t.Errorf("batch sent at %v, want 3ms (window opened at 1ms + 2ms)", got)
		}
		var ids []uint64
		for _, m := range sends[1].msgs {
			ids = append(ids, m.ID)
		}
		if want := []uint64{r1.ID, r2.ID, r3.ID}; !slices.Equal(ids, want) {
			t.Errorf("batch holds %v, want %v in arrival order", ids, want)
		}
		if sum, n := metricValue(t, h.m.BatchWindowWait); n != 2 || sum != 0.002 {
			t.Errorf("window wait: %d samples summing %vs, want 0 and 0.002", n, sum)
		}
		if sum, n := metricValue(t, h.m.BatchDispatched); n != 2 || sum != 4 {
			t.Errorf("dispatched: %d batches of %v requests, want 2 of 4", n, sum)
		}
		if st := h.s.State(); st.Dispatches != 2 || st.Running != 4 || st.QueueRequests != 0 {
			t.Errorf("state %+v", st)
		}
	})
}

// The window closes early once the waiting requests fill the free slots.
func TestWindowClosesWhenSlotsFilled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		w := h.addWorker(1)
		h.submit()
		h.advance(time.Millisecond)
		r1 := h.submit() // window opens at 1ms; 3 free slots
		h.advance(500 * time.Microsecond)
		r2 := h.submit()
		if n := len(w.Sends()); n != 1 {
			t.Fatalf("%d sends with 2 of 3 free slots claimed, want 1", n)
		}
		h.advance(500 * time.Microsecond)
		r3 := h.submit() // 2ms: 3 waiting for 3 free slots
		sends := w.Sends()
		if len(sends) != 2 {
			t.Fatalf("%d sends, want 2", len(sends))
		}
		if got := sends[1].at.Sub(h.start); got != 2*time.Millisecond {
			t.Errorf("batch sent at %v, want 2ms (when the slots filled, before the window's end at 3ms)", got)
		}
		if got := w.genIDs()[1:]; !slices.Equal(got, []uint64{r1.ID, r2.ID, r3.ID}) {
			t.Errorf("batch holds %v", got)
		}

		// Full: a fourth arrival waits however long it takes.
		r4 := h.submit()
		h.advance(time.Second)
		if n := len(w.Sends()); n != 2 {
			t.Fatalf("%d sends with no free slot, want 2", n)
		}
		if st := h.s.State(); st.QueueRequests != 1 || st.Running != 4 {
			t.Errorf("state %+v, want 1 queued and 4 running", st)
		}
		// A slot frees: one waiting request for one free slot goes at once.
		h.done(1, r1, "stop")
		if got := w.genIDs(); len(got) != 5 || got[4] != r4.ID {
			t.Fatalf("gens %v, want r4 dispatched when r1 finished", got)
		}
		if got := w.Sends()[2].at.Sub(h.start); got != time.Second+2*time.Millisecond {
			t.Errorf("r4 sent at %v, want at once", got)
		}
	})
}

// The fast path is decided when the request arrives, not when Run gets to
// look: a second arrival before Run wakes must not turn the first request's
// immediate dispatch into a 2 ms window wait. (Run is started late here to
// stand for a dispatcher goroutine that was not scheduled in between.)
func TestFastPathSurvivesLateWakeup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarnessNoRun(t, 4, nil)
		w := h.addWorker(1)
		r1 := h.submit() // queue empty, worker idle: fast path
		r2 := h.submit()
		h.run()
		sends := w.Sends()
		if len(sends) == 0 || !sends[0].at.Equal(h.start) || sends[0].msgs[0].ID != r1.ID {
			t.Fatalf("r1 not dispatched at once: sends %+v", sends)
		}
		h.advance(2 * time.Millisecond)
		if got := w.genIDs(); !slices.Equal(got, []uint64{r1.ID, r2.ID}) {
			t.Fatalf("gens %v", got)
		}

		// The flag does not outlive its request: with the worker busy, the
		// next arrival waits for the window again.
		h.advance(time.Millisecond)
		h.submit()
		if n := len(w.gens()); n != 2 {
			t.Fatalf("arrival for a busy worker dispatched at once (%d gens)", n)
		}
		h.advance(2 * time.Millisecond)
		if n := len(w.gens()); n != 3 {
			t.Fatalf("%d gens after the window", n)
		}
	})
}

// A zero window dispatches every arrival at once.
func TestZeroWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) { c.Window = 0 })
		w := h.addWorker(1)
		for range 3 {
			h.submit()
		}
		if n := len(w.Sends()); n != 3 {
			t.Fatalf("%d sends at t=0, want 3", n)
		}
		if h.elapsed() != 0 {
			t.Errorf("time moved to %v", h.elapsed())
		}
	})
}

// --- B limit and placement -------------------------------------------------

func TestBatchLimitRespected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const b = 2
		h := newHarness(t, b, nil)
		w := h.addWorker(1)
		finished := map[uint64]bool{}
		check := func(when string) {
			t.Helper()
			inflight := 0
			for _, id := range w.genIDs() {
				if !finished[id] {
					inflight++
				}
			}
			if inflight > b {
				t.Fatalf("%s: %d requests in flight on the worker, B is %d", when, inflight, b)
			}
			if st := h.s.State(); st.InFlight["1"] != inflight || st.Running != inflight {
				t.Fatalf("%s: state says %d in flight, worker has %d", when, st.InFlight["1"], inflight)
			}
		}
		var reqs []*Request
		for i := range 7 {
			reqs = append(reqs, h.submit())
			check(fmt.Sprintf("after submit %d", i))
		}
		h.advance(10 * time.Millisecond)
		check("after 10ms")
		if got := w.genIDs(); !slices.Equal(got, []uint64{1, 2}) {
			t.Fatalf("dispatched %v, want the first two", got)
		}
		for i, r := range reqs {
			h.tok(1, r, "x", 7)
			h.done(1, r, "length")
			finished[r.ID] = true
			check(fmt.Sprintf("after finishing %d", i))
			h.advance(3 * time.Millisecond)
			check(fmt.Sprintf("3ms after finishing %d", i))
		}
		if got := w.genIDs(); len(got) != 7 {
			t.Fatalf("dispatched %v, want all 7", got)
		}
		for _, r := range reqs {
			evs := events(r)
			if len(evs) != 2 || evs[0].Text != "x" || !evs[1].Done || evs[1].FinishReason != "length" || evs[1].Err != nil ||
				evs[1].CompletionTokens != 1 || evs[1].PromptTokens != 4 {
				t.Errorf("request %d: events %+v", r.ID, evs)
			}
		}
	})
}

func TestMostFreeSlotsWins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		h.addWorker(1)
		ra := h.submit()
		rb := h.submit()
		h.advance(2 * time.Millisecond)
		if got := [][]int{h.ownerOf(ra), h.ownerOf(rb)}; !slices.Equal(got[0], []int{1}) || !slices.Equal(got[1], []int{1}) {
			t.Fatalf("owners %v, want worker 1 for both", got)
		}
		h.addWorker(2) // 2 free on worker 1, 4 on worker 2
		rc := h.submit()
		if got := h.ownerOf(rc); !slices.Equal(got, []int{2}) {
			t.Errorf("rc went to %v, want the idle worker 2", got)
		}
		rd := h.submit() // 2 free on 1, 3 on 2
		h.advance(2 * time.Millisecond)
		if got := h.ownerOf(rd); !slices.Equal(got, []int{2}) {
			t.Errorf("rd went to %v, want worker 2 (3 free vs 2)", got)
		}
		// Worker 2 finishes both: it has 4 free, worker 1 has 2. Three
		// arrivals: the first takes the fast path to idle worker 2, the next
		// two are gathered; one goes to worker 2 (3 free vs 2), the last is
		// a tie (2 and 2).
		h.done(2, rc, "stop")
		h.done(2, rd, "stop")
		var batch []*Request
		for range 3 {
			batch = append(batch, h.submit())
		}
		h.advance(2 * time.Millisecond)
		on := map[int]int{}
		for _, r := range batch {
			o := h.ownerOf(r)
			if len(o) != 1 {
				t.Fatalf("request %d owned by %v", r.ID, o)
			}
			on[o[0]]++
		}
		if on[2] < 2 || on[1]+on[2] != 3 {
			t.Errorf("batch of 3 split %v, want at least 2 on the emptier worker 2", on)
		}
		if st := h.s.State(); st.InFlight["1"]+st.InFlight["2"] != 5 || st.InFlight["1"] > 4 || st.InFlight["2"] > 4 {
			t.Errorf("state %+v", st)
		}
	})
}

func TestRoundRobinOnTies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		for id := 1; id <= 3; id++ {
			h.addWorker(id)
		}
		// One at a time on idle workers: every choice is a tie.
		var order []int
		for range 6 {
			r := h.submit()
			o := h.ownerOf(r)
			if len(o) != 1 {
				t.Fatalf("request %d owned by %v", r.ID, o)
			}
			order = append(order, o[0])
			h.done(o[0], r, "stop")
		}
		for i := 3; i < len(order); i++ {
			if order[i] != order[i-3] {
				t.Fatalf("placement %v does not rotate over the 3 workers", order)
			}
		}
		if o := slices.Sorted(slices.Values(order[:3])); !slices.Equal(o, []int{1, 2, 3}) {
			t.Fatalf("placement %v does not use every worker", order)
		}

		// One request each (idle workers take the fast path), then six in one
		// window: two per worker, one Send per worker.
		for range 3 {
			h.submit()
		}
		for id := 1; id <= 3; id++ {
			if n := len(h.workers[id].gens()); n != 2+1 {
				t.Fatalf("worker %d has %d gens after the spread, want 3", id, n)
			}
		}
		before := map[int]int{}
		for id := 1; id <= 3; id++ {
			before[id] = len(h.workers[id].Sends())
		}
		for range 6 {
			h.submit()
		}
		h.advance(2 * time.Millisecond)
		for id := 1; id <= 3; id++ {
			sends := h.workers[id].Sends()
			if len(sends) != before[id]+1 {
				t.Fatalf("worker %d: %d new sends, want one batch", id, len(sends)-before[id])
			}
			if n := len(sends[len(sends)-1].msgs); n != 2 {
				t.Errorf("worker %d got a batch of %d, want 2", id, n)
			}
		}
	})
}

func TestDrainingWorkerGetsNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		h.addWorker(2)
		r1 := h.submit()
		o := h.ownerOf(r1)[0]
		other := 3 - o
		h.s.SetDraining(other)
		for range 3 {
			h.submit()
		}
		h.advance(time.Second)
		if n := len(h.workers[other].gens()); n != 0 {
			t.Fatalf("draining worker %d got %d requests", other, n)
		}
		if n := len(h.workers[o].gens()); n != 2 {
			t.Fatalf("worker %d got %d requests, want 2 (B)", o, n)
		}
		// The draining worker's own requests still finish normally.
		if inflight, served, _ := h.s.WorkerLoad(o); inflight != 2 || served != 0 {
			t.Errorf("WorkerLoad = %d, %d", inflight, served)
		}
		h.done(o, r1, "stop")
		if inflight, served, last := h.s.WorkerLoad(o); inflight != 2 || served != 1 || !last.Equal(h.start.Add(time.Second)) {
			t.Errorf("WorkerLoad = %d, %d, %v", inflight, served, last.Sub(h.start))
		}
	})
}

// --- admission and back-pressure --------------------------------------------

func TestQueueFullRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) { c.MaxQueue = 2 })
		// No worker: everything waits.
		r1, r2 := h.submit(), h.submit()
		r3 := h.req(4, 16)
		e := wantRefused(t, h.s.Submit(r3), ReasonOverloaded)
		if e.RetryAfter != time.Second {
			t.Errorf("Retry-After %v without a measured service time, want 1s", e.RetryAfter)
		}
		if v := counter(t, h.m.AdmissionRejections.WithLabelValues("queue_full")); v != 1 {
			t.Errorf("queue_full rejections = %v", v)
		}
		if st := h.s.State(); st.QueueRequests != 2 || st.QueueTokens != 8 {
			t.Errorf("state %+v", st)
		}
		if evs := events(r3); len(evs) != 0 {
			t.Errorf("refused request got events %+v", evs)
		}
		h.s.Cancel(r1, ReasonCancelled, "gone")
		h.mustSubmit(r3)
		w := h.addWorker(1)
		h.advance(2 * time.Millisecond)
		if got := w.genIDs(); !slices.Equal(got, []uint64{r2.ID, r3.ID}) {
			t.Errorf("dispatched %v", got)
		}
	})
}

func TestQueueTokensRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) { c.MaxQueueTokens = 10 })
		r1 := h.req(6, 16)
		h.mustSubmit(r1)
		e := wantRefused(t, h.s.Submit(h.req(5, 16)), ReasonOverloaded)
		if e.RetryAfter != time.Second {
			t.Errorf("Retry-After %v, want 1s", e.RetryAfter)
		}
		r3 := h.req(4, 16) // exactly 10
		h.mustSubmit(r3)
		if v := counter(t, h.m.AdmissionRejections.WithLabelValues("queue_tokens")); v != 1 {
			t.Errorf("queue_tokens rejections = %v", v)
		}
		if st := h.s.State(); st.QueueTokens != 10 || st.QueueRequests != 2 {
			t.Errorf("state %+v", st)
		}
		// An empty queue admits one prompt larger than the limit (otherwise
		// it could never run); the next one is refused.
		h.s.Cancel(r1, ReasonCancelled, "")
		h.s.Cancel(r3, ReasonCancelled, "")
		if st := h.s.State(); st.QueueTokens != 0 || st.QueueRequests != 0 {
			t.Errorf("state after cancels %+v", st)
		}
		h.mustSubmit(h.req(50, 16))
		wantRefused(t, h.s.Submit(h.req(1, 16)), ReasonOverloaded)
		// Dispatch releases the tokens.
		h.addWorker(1)
		if st := h.s.State(); st.QueueTokens != 0 || st.Running != 1 {
			t.Errorf("state after dispatch %+v", st)
		}
		h.mustSubmit(h.req(10, 16))
	})
}

// Once a service time is measured, a request whose estimated wait exceeds its
// deadline is refused, and Retry-After follows the estimate.
func TestDeadlineRefusalAndRetryAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, func(c *Config) { c.MaxQueue = 2 })
		h.addWorker(1)
		r1 := h.submit()
		// Busy, nothing measured yet: a tight deadline is still admitted.
		early := h.req(4, 16)
		early.Deadline = time.Now().Add(time.Nanosecond)
		h.mustSubmit(early)
		h.s.Cancel(early, ReasonCancelled, "")

		h.advance(3 * time.Second)
		h.done(1, r1, "stop") // service time 3s
		h.submit()            // runs; the worker (B=1) is full

		tight := h.req(4, 16)
		tight.Deadline = time.Now().Add(2 * time.Second)
		e := wantRefused(t, h.s.Submit(tight), ReasonOverloaded)
		if e.RetryAfter != 3*time.Second {
			t.Errorf("Retry-After %v, want 3s (one request ahead × 3s)", e.RetryAfter)
		}
		if v := counter(t, h.m.AdmissionRejections.WithLabelValues("deadline")); v != 1 {
			t.Errorf("deadline rejections = %v", v)
		}
		ok := h.req(4, 16)
		ok.Deadline = time.Now().Add(3 * time.Second) // estimate 3s: not after the deadline
		h.mustSubmit(ok)
		second := h.req(4, 16)
		second.Deadline = time.Now().Add(5 * time.Second) // now 2 ahead: 6s
		e = wantRefused(t, h.s.Submit(second), ReasonOverloaded)
		if e.RetryAfter != 6*time.Second {
			t.Errorf("Retry-After %v, want 6s", e.RetryAfter)
		}
		h.submit() // no deadline: admitted; the queue (2) is now full
		e = wantRefused(t, h.s.Submit(h.req(4, 16)), ReasonOverloaded)
		if e.RetryAfter != 9*time.Second {
			t.Errorf("queue_full Retry-After %v, want 9s", e.RetryAfter)
		}
		if v := counter(t, h.m.AdmissionRejections.WithLabelValues("deadline")); v != 2 {
			t.Errorf("deadline rejections = %v", v)
		}
	})
}

// --- cancellation ------------------------------------------------------------

func TestCancelQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		w := h.addWorker(1)
		r1 := h.submit()
		r2 := h.req(5, 16)
		h.mustSubmit(r2)
		h.s.Cancel(r2, ReasonTimeout, "too slow")
		e := wantFailed(t, r2, events(r2), ReasonTimeout)
		if e.Msg != "too slow" {
			t.Errorf("message %q", e.Msg)
		}
		if st := h.s.State(); st.QueueRequests != 0 || st.QueueTokens != 0 || st.Running != 1 {
			t.Errorf("state %+v", st)
		}
		h.s.Cancel(r2, ReasonCancelled, "again") // idempotent
		if evs := events(r2); len(evs) != 0 {
			t.Errorf("second cancel produced %+v", evs)
		}
		h.done(1, r1, "stop")
		h.advance(time.Second)
		if got := w.genIDs(); !slices.Equal(got, []uint64{r1.ID}) {
			t.Errorf("worker got %v; the cancelled request must never be dispatched", got)
		}
		if got := w.cancelIDs(); len(got) != 0 {
			t.Errorf("cancel frames %v for a request the worker never had", got)
		}
		if v := counter(t, h.m.RequestFailure.WithLabelValues(ReasonTimeout)); v != 1 {
			t.Errorf("timeout failures = %v", v)
		}
		if v := counter(t, h.m.NumRequestsWaiting); v != 0 {
			t.Errorf("waiting gauge = %v", v)
		}
	})
}

func TestCancelRunningAbsorbsLateFrames(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		w := h.addWorker(1)
		r1 := h.submit()
		r2 := h.submit() // queued behind r1 (B=1)
		h.tok(1, r1, "a", 10)
		h.s.Cancel(r1, ReasonCancelled, "client went away")
		synctest.Wait()
		if got := w.cancelIDs(); !slices.Equal(got, []uint64{r1.ID}) {
			t.Fatalf("cancel frames %v, want one for r1", got)
		}
		evs := events(r1)
		if len(evs) != 2 || evs[0].Text != "a" {
			t.Fatalf("events %+v", evs)
		}
		wantFailed(t, r1, evs, ReasonCancelled)
		if evs[1].CompletionTokens != 1 {
			t.Errorf("CompletionTokens %d", evs[1].CompletionTokens)
		}

		// The worker had more in the pipe: absorbed, not errors, not events.
		h.tok(1, r1, "b", 11)
		h.tok(1, r1, "", 12)
		if evs := events(r1); len(evs) != 0 {
			t.Fatalf("frames after cancel delivered: %+v", evs)
		}
		// The slot stays taken until the worker's done.
		if st := h.s.State(); st.Running != 1 || st.QueueRequests != 1 {
			t.Fatalf("state %+v before done", st)
		}
		h.s.Cancel(r1, ReasonCancelled, "twice")
		if got := w.cancelIDs(); len(got) != 1 {
			t.Errorf("cancel frames %v after a second Cancel", got)
		}
		h.deliver(1, &ipc.Message{T: ipc.TDone, ID: r1.ID, Reason: "cancelled", Text: "tail"})
		if evs := events(r1); len(evs) != 0 {
			t.Fatalf("done after cancel delivered: %+v", evs)
		}
		if got := w.genIDs(); !slices.Equal(got, []uint64{r1.ID, r2.ID}) {
			t.Fatalf("gens %v, want r2 dispatched once r1's slot freed", got)
		}
		// After done, a frame for r1 is foreign.
		if err := h.s.Deliver(1, &ipc.Message{T: ipc.TTok, ID: r1.ID, IDs: []int32{1}}); !errors.Is(err, ipc.ErrProtocol) {
			t.Errorf("tok after done: %v, want ErrProtocol", err)
		}
		if v := counter(t, h.m.RequestFailure.WithLabelValues(ReasonCancelled)); v != 1 {
			t.Errorf("cancelled failures = %v", v)
		}
		if v := counter(t, h.m.RequestSuccess.WithLabelValues("stop")) + counter(t, h.m.RequestFailure.WithLabelValues(ReasonInternal)); v != 0 {
			t.Errorf("the cancelled request was also counted as %v other outcomes", v)
		}

		// An error frame after cancel is absorbed too.
		h.s.Cancel(r2, ReasonTimeout, "")
		h.deliver(1, &ipc.Message{T: ipc.TError, ID: r2.ID, Code: "internal", Msg: "boom"})
		evs = events(r2)
		wantFailed(t, r2, evs, ReasonTimeout)
		if st := h.s.State(); st.Running != 0 {
			t.Errorf("state %+v", st)
		}
	})
}

// A done with reason cancelled that the scheduler did not ask for is a failure.
func TestWorkerInitiatedCancelFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		h.addWorker(1)
		r := h.submit()
		h.done(1, r, "cancelled")
		wantFailed(t, r, events(r), ReasonInternal)
	})
}

func TestErrorFrames(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		r1, r2 := h.submit(), h.submit()
		h.deliver(1, &ipc.Message{T: ipc.TError, ID: r1.ID, Code: "invalid", Msg: "bad top_p"})
		e := wantFailed(t, r1, events(r1), ReasonInvalid)
		if e.Msg != "bad top_p" {
			t.Errorf("message %q", e.Msg)
		}
		h.tok(1, r2, "hi", 3)
		h.deliver(1, &ipc.Message{T: ipc.TError, ID: r2.ID, Code: "internal", Msg: "oom"})
		evs := events(r2)
		wantFailed(t, r2, evs, ReasonInternal)
		if evs[0].Text != "hi" || evs[1].CompletionTokens != 1 {
			t.Errorf("events %+v", evs)
		}
		if st := h.s.State(); st.Running != 0 {
			t.Errorf("state %+v", st)
		}
	})
}

// A worker's context_length_exceeded refusal keeps its code, so the front
// door can answer as OpenAI does.
func TestContextLengthErrorKeepsCode(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		r := h.submit()
		h.deliver(1, &ipc.Message{T: ipc.TError, ID: r.ID, Code: CodeContextLength, Msg: "too long"})
		if e := wantFailed(t, r, events(r), ReasonInvalid); e.Code != CodeContextLength || e.Msg != "too long" {
			t.Errorf("error %+v", e)
		}
	})
}

// A request whose prompt the worker tokenizes: the gen carries the text or
// the messages (again on a resume), the queue counts an estimate of its
// tokens, and the prompt's length comes from the worker's done, less the
// tokens resumed.
func TestInputRequest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, func(c *Config) { c.MaxCrashes = 3 })
		chat := Input{Messages: []ipc.ChatMessage{{Role: "user", Content: "What is the capital of France?"}}}
		h.nextID++
		r := NewInputRequest(h.nextID, chat, Params{MaxTokens: 8})
		h.mustSubmit(r)
		// (4 + 30 + 16) bytes at four a token, rounded up.
		if st := h.s.State(); st.QueueTokens != 13 {
			t.Errorf("queued tokens %d, want the estimate 13", st.QueueTokens)
		}
		w1 := h.addWorker(1)
		g := w1.gens()
		if len(g) != 1 || g[0].Prompt != nil || !reflect.DeepEqual(g[0].Messages, chat.Messages) || g[0].Text != "" {
			t.Fatalf("gen frames %+v", g)
		}
		if st := h.s.State(); st.QueueTokens != 0 {
			t.Errorf("queued tokens after dispatch %d", st.QueueTokens)
		}
		h.tok(1, r, "Pa", 7)
		h.tok(1, r, "ris", 8)
		h.crash(1)
		w2 := h.addWorker(2)
		g = w2.gens()
		if len(g) != 1 || !reflect.DeepEqual(g[0].Messages, chat.Messages) || !slices.Equal(g[0].Resume, []int32{7, 8}) || g[0].Sent != 5 || g[0].MaxTokens != 6 {
			t.Fatalf("resumed gen %+v", g)
		}
		h.tok(2, r, ".", 9)
		// The second worker prefilled 11 prompt tokens and the 2 resumed ones.
		h.deliver(2, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "stop", PToks: 13, CToks: 2})
		evs := events(r)
		last := evs[len(evs)-1]
		if textOf(evs) != "Paris." || last.Err != nil || last.PromptTokens != 11 || last.CompletionTokens != 4 {
			t.Errorf("events %+v", evs)
		}
		if v, n := metricValue(t, h.m.RequestPromptTokens); v != 11 || n != 1 {
			t.Errorf("prompt tokens histogram: sum %v of %d", v, n)
		}

		// A completion's text, with the tokenizer's special tokens.
		h.nextID++
		r2 := NewInputRequest(h.nextID, Input{Text: "Once upon", Special: true}, Params{MaxTokens: 2})
		h.mustSubmit(r2)
		g = w2.gens()
		if len(g) != 2 || g[1].Text != "Once upon" || !g[1].Special || g[1].Messages != nil || g[1].Prompt != nil {
			t.Fatalf("gen frames %+v", g)
		}
	})
}

// --- protocol ------------------------------------------------------------------

func TestForeignFramesAreProtocolErrors(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		h.addWorker(1)
		h.addWorker(2)
		r1 := h.submit()
		r2 := h.submit()
		o1, o2 := h.ownerOf(r1)[0], h.ownerOf(r2)[0]
		if o1 == o2 {
			t.Fatalf("both requests on worker %d", o1)
		}
		cases := []struct {
			name string
			wid  int
			m    ipc.Message
		}{
			{"other worker's request", o1, ipc.Message{T: ipc.TTok, ID: r2.ID, IDs: []int32{1}, Text: "x"}},
			{"other worker's done", o1, ipc.Message{T: ipc.TDone, ID: r2.ID, Reason: "stop"}},
			{"unknown id", o1, ipc.Message{T: ipc.TTok, ID: 999, IDs: []int32{1}}},
			{"id 0", o1, ipc.Message{T: ipc.TDone, Reason: "stop"}},
			{"unregistered worker", 7, ipc.Message{T: ipc.TTok, ID: r1.ID}},
			{"wrong frame type", o1, ipc.Message{T: ipc.TPong, ID: r1.ID, Seq: 1}},
		}
		for _, c := range cases {
			err := h.s.Deliver(c.wid, &c.m)
			if !errors.Is(err, ipc.ErrProtocol) {
				t.Errorf("%s: Deliver = %v, want ErrProtocol", c.name, err)
			}
		}
		synctest.Wait()
		if evs := append(events(r1), events(r2)...); len(evs) != 0 {
			t.Errorf("rejected frames produced events %+v", evs)
		}
		// Both requests still complete normally.
		h.tok(o2, r2, "ok", 5)
		h.done(o2, r2, "stop")
		if evs := events(r2); len(evs) != 2 || evs[0].Text != "ok" || evs[1].Err != nil || evs[1].FinishReason != "stop" {
			t.Errorf("r2 events %+v", evs)
		}
		// A removed worker is unregistered.
		h.crash(o1)
		if err := h.s.Deliver(o1, &ipc.Message{T: ipc.TTok, ID: r1.ID, IDs: []int32{1}}); !errors.Is(err, ipc.ErrProtocol) {
			t.Errorf("frame from a removed worker: %v, want ErrProtocol", err)
		}
	})
}

// The pause of a crash (detection, requeue, prefill on another worker) is not
// an inter-token gap: it must not reach the latency histogram or the
// auto-tuner, which would cut B because a worker died.
func TestResumeGapIsNotInterTokenLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		r := h.submit()
		h.tok(1, r, "a", 1) // first token
		h.advance(10 * time.Millisecond)
		h.tok(1, r, "b", 2) // a 10ms gap
		h.advance(time.Second)
		h.crash(1)
		h.advance(4 * time.Second)
		h.addWorker(2)
		h.advance(50 * time.Millisecond)
		h.tok(2, r, "c", 3) // first token of the resumed run: prefill
		h.advance(10 * time.Millisecond)
		h.tok(2, r, "d", 4, 5) // two tokens, 5ms each
		sum, n := metricValue(t, h.m.InterTokenLatency)
		if n != 3 || sum < 0.0199 || sum > 0.0201 {
			t.Errorf("inter-token latency: %d samples summing %.4fs, want 3 summing 0.02s", n, sum)
		}
		if st := h.s.tune.State(); st.Samples != 3 {
			t.Errorf("auto-tuner got %d samples, want 3", st.Samples)
		}
		h.done(2, r, "stop")
		if evs := events(r); textOf(evs) != "abcd" || evs[len(evs)-1].CompletionTokens != 5 {
			t.Errorf("events %+v", evs)
		}
	})
}

// A Send that fails leaves the requests with their worker; RemoveWorker
// (which the supervisor calls when the process goes) requeues them.
func TestSendFailureRequeuedOnRemove(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		w := h.addWorker(1)
		w.setFail(errors.New("stopped"))
		r := h.submit()
		if st := h.s.State(); st.Running != 1 || st.Dispatches != 0 {
			t.Errorf("state %+v", st)
		}
		h.crash(1)
		w2 := h.addWorker(2)
		if got := w2.genIDs(); !slices.Equal(got, []uint64{r.ID}) {
			t.Fatalf("worker 2 got %v", got)
		}
		h.done(2, r, "stop")
		if evs := events(r); len(evs) != 1 || evs[0].Err != nil {
			t.Errorf("events %+v", evs)
		}
	})
}

// --- resume: text continuity -------------------------------------------------

// A fake model: the output is always simTokens; each token's bytes are
// simPieces[id]. Some tokens end inside a UTF-8 character, which a streaming
// detokenizer holds back until the character completes.
var (
	simTokens = []int32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	simPieces = map[int32]string{
		1: "Hel", 2: "lo ", 3: "caf", 4: "\xc3", 5: "\xa9 ", 6: "na", 7: "\xc3\xaf", 8: "ve", 9: " \xe2\x82", 10: "\xac!",
	}
	simText = "Hello café naïve €!"
)

// simWorker emulates a worker serving one gen frame as docs/protocol.md says:
// it replays resume, treats the first sent bytes as already emitted and
// continues.
type simWorker struct {
	ids     []int32
	emitted int
	budget  int
}

func startSim(t *testing.T, g ipc.Message) *simWorker {
	if g.MaxTokens < 1 {
		t.Fatalf("gen with max_tokens %d", g.MaxTokens)
	}
	if !slices.Equal(g.Resume, simTokens[:len(g.Resume)]) {
		t.Fatalf("resume %v is not a prefix of the output", g.Resume)
	}
	return &simWorker{ids: slices.Clone(g.Resume), emitted: g.Sent, budget: g.MaxTokens}
}

func (s *simWorker) detok() string {
	var b []byte
	for _, id := range s.ids {
		b = append(b, simPieces[id]...)
	}
	return string(b)
}

// step generates n tokens and returns the tok frame's ids and text.
func (s *simWorker) step(t *testing.T, n int) ([]int32, string) {
	var ids []int32
	for range n {
		if s.budget == 0 {
			t.Fatal("worker asked to go past max_tokens")
		}
		s.budget--
		id := simTokens[len(s.ids)]
		s.ids = append(s.ids, id)
		ids = append(ids, id)
	}
	full := s.detok()
	cut := len(full)
	for cut > 0 && !utf8.ValidString(full[:cut]) {
		cut--
	}
	if cut < s.emitted {
		return ids, ""
	}
	text := full[s.emitted:cut]
	s.emitted = cut
	return ids, text
}

func TestResumedStreamHasNoDuplicates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) { c.MaxCrashes = 3 })
		r := h.req(5, len(simTokens))
		h.mustSubmit(r)
		// Worker 1: tokens 1–4 (the 4th is held back: half of "é").
		// Worker 2: tokens 5–7, one frame with two tokens.
		// Worker 3: tokens 8–10 and done.
		plan := []struct {
			worker int
			steps  []int
			finish bool
		}{{1, []int{1, 1, 1, 1}, false}, {2, []int{1, 2}, false}, {3, []int{1, 1, 1}, true}}
		for i, p := range plan {
			w := h.addWorker(p.worker)
			gens := w.gens()
			if len(gens) != 1 {
				t.Fatalf("worker %d got %d gens", p.worker, len(gens))
			}
			sim := startSim(t, gens[0])
			if i > 0 && len(gens[0].Resume) == 0 {
				t.Fatalf("worker %d: no resume", p.worker)
			}
			for _, n := range p.steps {
				ids, text := sim.step(t, n)
				h.tok(p.worker, r, text, ids...)
			}
			if p.finish {
				// The last worker found all but one of prompt + resume in its
				// prompt cache: the client is told the whole prompt was cached.
				h.deliver(p.worker, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "length", PToks: 5 + len(gens[0].Resume), CToks: 3,
					Cached: 4 + len(gens[0].Resume)})
			} else {
				h.crash(p.worker)
			}
		}
		evs := events(r)
		if got := textOf(evs); got != simText {
			t.Errorf("client text %q, want %q", got, simText)
		}
		tokens := 0
		for _, e := range evs {
			tokens += e.Tokens
		}
		last := evs[len(evs)-1]
		if tokens != len(simTokens) || !last.Done || last.Err != nil || last.FinishReason != "length" ||
			last.CompletionTokens != len(simTokens) || last.PromptTokens != 5 || last.CachedTokens != 5 {
			t.Errorf("tokens %d, last event %+v", tokens, last)
		}
		if q, hits := counter(t, h.m.PrefixCacheQueries), counter(t, h.m.PrefixCacheHits); q != 12 || hits != 11 {
			t.Errorf("prefix cache queries %v hits %v, want 12 and 11", q, hits)
		}
		if g := h.workers[3].gens()[0]; g.MaxTokens != 3 || g.Sent != len("Hello café naï") || len(g.Resume) != 7 {
			t.Errorf("third gen: max_tokens %d sent %d resume %v", g.MaxTokens, g.Sent, g.Resume)
		}
	})
}

// --- drain and abort -------------------------------------------------------------

func TestDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		w := h.addWorker(1)
		r1 := h.submit()
		r2 := h.submit() // queued
		ch := h.s.Drain()
		isClosed := func() bool {
			select {
			case <-ch:
				return true
			default:
				return false
			}
		}
		if isClosed() {
			t.Fatal("drained with work left")
		}
		if !h.s.Draining() || !h.s.State().Draining {
			t.Error("not draining")
		}
		e := wantRefused(t, h.s.Submit(h.req(1, 1)), ReasonDraining)
		if e.RetryAfter != time.Second {
			t.Errorf("Retry-After %v", e.RetryAfter)
		}
		if v := counter(t, h.m.AdmissionRejections.WithLabelValues("draining")); v != 1 {
			t.Errorf("draining rejections = %v", v)
		}
		h.done(1, r1, "stop")
		if got := w.genIDs(); !slices.Equal(got, []uint64{r1.ID, r2.ID}) {
			t.Fatalf("queued request not dispatched while draining: %v", got)
		}
		if isClosed() {
			t.Fatal("drained with r2 running")
		}
		h.tok(1, r2, "z", 9)
		h.done(1, r2, "length")
		if !isClosed() {
			t.Fatal("not drained after the last request finished")
		}
		if ch2 := h.s.Drain(); ch2 != ch {
			t.Error("second Drain returned another channel")
		}
		if evs := events(r2); textOf(evs) != "z" || evs[len(evs)-1].Err != nil {
			t.Errorf("r2 events %+v", evs)
		}
	})
}

func TestDrainIdleClosesAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		h.addWorker(1)
		r := h.submit()
		h.s.Cancel(r, ReasonCancelled, "") // still in the worker until its done
		select {
		case <-h.s.Drain():
		default:
			t.Fatal("Drain waits for a request that is already cancelled")
		}
	})
}

func TestAbort(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		w := h.addWorker(1)
		r1 := h.submit()
		r2 := h.submit()
		h.tok(1, r1, "x", 1)
		ch := h.s.Drain()
		noPanic(t, "Abort", func() { h.s.Abort("shutting down") })
		synctest.Wait()
		evs := events(r1)
		e := wantFailed(t, r1, evs, ReasonDraining)
		if e.Msg != "shutting down" || evs[0].Text != "x" {
			t.Errorf("r1: %+v", evs)
		}
		wantFailed(t, r2, events(r2), ReasonDraining)
		if got := w.cancelIDs(); !slices.Equal(got, []uint64{r1.ID}) {
			t.Errorf("cancel frames %v", got)
		}
		select {
		case <-ch:
		default:
			t.Error("Drain channel open after Abort")
		}
		if st := h.s.State(); st.QueueRequests != 0 || st.QueueTokens != 0 {
			t.Errorf("state %+v", st)
		}
		h.tok(1, r1, "y", 2)
		h.done(1, r1, "cancelled")
		if evs := events(r1); len(evs) != 0 {
			t.Errorf("frames after Abort delivered: %+v", evs)
		}
		wantRefused(t, h.s.Submit(h.req(1, 1)), ReasonDraining)
		if got := w.genIDs(); len(got) != 1 {
			t.Errorf("gens %v: r2 was dispatched after Abort", got)
		}
	})
}

// Abort is the shutdown path's last resort; it must not depend on an earlier
// Drain, and Drain after it must not hang.
func TestAbortWithoutDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		r1, r2 := h.submit(), h.submit()
		r3 := h.submit()
		noPanic(t, "Abort", func() { h.s.Abort("bye") })
		for _, r := range []*Request{r1, r2, r3} {
			wantFailed(t, r, events(r), ReasonDraining)
		}
		noPanic(t, "done after Abort", func() { h.done(1, r1, "cancelled") })
		var ch <-chan struct{}
		noPanic(t, "Drain after Abort", func() { ch = h.s.Drain() })
		select {
		case <-ch:
		default:
			t.Fatal("Drain after Abort does not report drained")
		}
	})
}

func TestAbortIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		noPanic(t, "Abort", func() { h.s.Abort("bye") })
		select {
		case <-h.s.Drain():
		default:
			t.Fatal("Drain after Abort does not report drained")
		}
	})
}

// --- state -------------------------------------------------------------------------

func TestState(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		st := h.s.State()
		if st.QueueRequests != 0 || st.Running != 0 || st.Draining || st.WindowMS != 2 || st.Dispatches != 0 ||
			len(st.BatchSize) != 0 || len(st.InFlight) != 0 || st.AutoTune.B != 2 {
			t.Errorf("empty state %+v", st)
		}
		h.addWorker(1)
		h.addWorker(2)
		reqs := []*Request{h.submit(), h.submit(), h.submit()} // fast, fast, window
		h.advance(2 * time.Millisecond)
		reqs = append(reqs, h.submit()) // fills the last slot at once
		q1, q2 := h.req(3, 8), h.req(4, 8)
		h.mustSubmit(q1)
		h.mustSubmit(q2)
		st = h.s.State()
		want := State{QueueRequests: 2, QueueTokens: 7, Running: 4, WindowMS: 2, Dispatches: 4,
			BatchSize: map[string]int{"1": 2, "2": 2}, InFlight: map[string]int{"1": 2, "2": 2}}
		checkState(t, st, want)
		if v := counter(t, h.m.NumRequestsRunning); v != 4 {
			t.Errorf("running gauge %v", v)
		}
		if v := counter(t, h.m.NumRequestsWaiting); v != 2 {
			t.Errorf("waiting gauge %v", v)
		}

		// A cancelled request holds its slot until the worker's done.
		r := reqs[0]
		o := h.ownerOf(r)[0]
		h.s.Cancel(r, ReasonCancelled, "")
		checkState(t, h.s.State(), want)
		h.done(o, r, "cancelled")
		h.advance(2 * time.Millisecond)
		want.QueueRequests, want.QueueTokens, want.Dispatches = 1, 4, 5
		checkState(t, h.s.State(), want)

		h.crash(3 - o)
		st = h.s.State()
		if st.Running != 2 || st.QueueRequests != 3 || len(st.InFlight) != 1 || len(st.BatchSize) != 1 {
			t.Errorf("after crash %+v", st)
		}
		if v := counter(t, h.m.NumRequestsRunning); v != 2 {
			t.Errorf("running gauge %v", v)
		}
		if v := counter(t, h.m.NumRequestsWaiting); v != 3 {
			t.Errorf("waiting gauge %v", v)
		}
		h.s.Drain()
		if !h.s.State().Draining {
			t.Error("not draining")
		}
	})
}

func checkState(t *testing.T, got, want State) {
	t.Helper()
	got.AutoTune, want.AutoTune = TuneState{}, TuneState{}
	if got.QueueRequests != want.QueueRequests || got.QueueTokens != want.QueueTokens || got.Running != want.Running ||
		got.Draining != want.Draining || got.WindowMS != want.WindowMS || got.Dispatches != want.Dispatches ||
		fmt.Sprint(got.BatchSize) != fmt.Sprint(want.BatchSize) || fmt.Sprint(got.InFlight) != fmt.Sprint(want.InFlight) {
		t.Errorf("state\n got %+v\nwant %+v", got, want)
	}
}

// --- the auto-tuner's hook -----------------------------------------------------------

// Run evaluates the tuner every TuneEvery; a new B is exported and bounds the
// next dispatches. (The tuner's own policy is tested in autotune_test.go.)
func TestTunerChangesB(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) {
			c.Tune.Enabled = true
			c.Tune.Min, c.Tune.Max = 2, 8
			c.TuneEvery = 200 * time.Millisecond
		})
		w := h.addWorker(1)
		r1 := h.submit()
		h.tok(1, r1, "a", 1)
		h.advance(3 * time.Second)
		// Eight tokens in one frame, 375ms apart on average: P99 far above
		// twice the 100ms target.
		h.tok(1, r1, "bcdefghi", 2, 3, 4, 5, 6, 7, 8, 9)
		h.advance(200 * time.Millisecond)
		if v := counter(t, h.m.AutotuneAdjustments.WithLabelValues(TuneEmergencyDown)); v != 0 {
			t.Fatalf("emergency step after one evaluation over 2× target")
		}
		// The next evaluation with new samples still over 2× target.
		h.advance(3 * time.Second)
		h.tok(1, r1, "jklmnopq", 10, 11, 12, 13, 14, 15, 16, 17)
		h.advance(200 * time.Millisecond)
		if v := counter(t, h.m.AutotuneAdjustments.WithLabelValues(TuneEmergencyDown)); v != 1 {
			t.Fatalf("emergency_down adjustments = %v", v)
		}
		if v := counter(t, h.m.BatchTargetSize); v != 2 {
			t.Errorf("batch target gauge %v, want 2", v)
		}
		if v := counter(t, h.m.BatchSize.WithLabelValues("1")); v != 2 {
			t.Errorf("batch size gauge %v, want 2", v)
		}
		if st := h.s.State(); st.BatchSize["1"] != 2 || st.AutoTune.B != 2 {
			t.Errorf("state %+v", st)
		}
		h.submit() // 1 free slot of 2: at once
		h.submit() // none free
		h.advance(time.Second)
		if n := len(w.gens()); n != 2 {
			t.Errorf("%d requests in flight with B=2", n)
		}
	})
}

// --- request stream ---------------------------------------------------------------------

func TestRequestNextAndReady(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 1, nil)
		h.addWorker(1)
		r := h.submit()
		got := make(chan string, 1)
		go func() {
			var text []byte
			for {
				e, err := r.Next(context.Background())
				if err != nil {
					got <- "error: " + err.Error()
					return
				}
				text = append(text, e.Text...)
				if e.Done {
					got <- string(text)
					return
				}
			}
		}()
		h.tok(1, r, "he", 1)
		h.tok(1, r, "llo", 2)
		h.done(1, r, "stop")
		if s := <-got; s != "hello" {
			t.Errorf("Next read %q", s)
		}

		// Ready pairs with Poll; Next gives up when its context ends.
		r2 := h.submit()
		select {
		case <-r2.Ready():
			t.Fatal("Ready before any event")
		default:
		}
		h.tok(1, r2, "x", 5)
		select {
		case <-r2.Ready():
		default:
			t.Fatal("Ready not signalled after an event")
		}
		if e, ok := r2.Poll(); !ok || e.Text != "x" || e.Tokens != 1 {
			t.Errorf("Poll = %+v, %v", e, ok)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := r2.Next(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Next with a cancelled context: %v", err)
		}
	})
}
