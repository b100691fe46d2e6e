package scheduler

import (
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/krserve/krserve/ipc"
)

// lastGen is the last gen frame worker w was sent.
func lastGen(t *testing.T, w *fakeWorker) ipc.Message {
	t.Helper()
	gens := w.gens()
	if len(gens) == 0 {
		t.Fatalf("worker %d got no gen", w.id)
	}
	return gens[len(gens)-1]
}

// A crash makes every request in flight a suspect: each is retried (nothing
// streamed) or resumed (tokens streamed) alone on a worker, which takes
// nothing else until the suspect has produced ProbationTokens tokens past its
// crash point; then it rejoins batching.
func TestCrashSuspectsRunAloneThenRejoin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil) // ProbationTokens 2
		fresh := h.req(4, 16)      // streams nothing: retried
		h.mustSubmit(fresh)
		h.advance(time.Millisecond)
		streamed := h.req(3, 16) // streams three tokens: resumed
		streamed.Params.Temperature = 0.7
		h.mustSubmit(streamed)
		h.advance(time.Millisecond)
		gone := h.req(2, 16) // cancelled: never retried
		h.mustSubmit(gone)
		h.addWorker(1)
		h.advance(2 * time.Millisecond) // the batching window
		if got := h.workers[1].genIDs(); !slices.Equal(got, []uint64{fresh.ID, streamed.ID, gone.ID}) {
			t.Fatalf("worker 1 got %v", got)
		}
		h.tok(1, streamed, "Hello", 101)
		h.tok(1, streamed, " wör", 102, 103) // 5 bytes
		h.s.Cancel(gone, ReasonCancelled, "")
		if got := textOf(events(streamed)); got != "Hello wör" {
			t.Fatalf("text %q", got)
		}

		h.crash(1)
		if v := counter(t, h.m.RequestsRetried); v != 1 {
			t.Errorf("retried = %v", v)
		}
		if v := counter(t, h.m.RequestsResumed); v != 1 {
			t.Errorf("resumed = %v", v)
		}
		if v := counter(t, h.m.RequestsSuspected); v != 2 {
			t.Errorf("suspected = %v", v)
		}
		if st := h.s.State(); st.QueueRequests != 2 || st.Suspects != 2 || st.Running != 0 {
			t.Errorf("state after crash %+v", st)
		}
		later := h.submit() // an ordinary request, admitted after the crash

		w2 := h.addWorker(2)
		if got := w2.genIDs(); !slices.Equal(got, []uint64{fresh.ID}) {
			t.Fatalf("worker 2 got %v, want the oldest suspect alone", got)
		}
		if g := w2.gens()[0]; g.Resume != nil || g.Sent != 0 || g.MaxTokens != 16 || !slices.Equal(g.Prompt, fresh.Prompt) {
			t.Errorf("retry frame: resume %v sent %d max_tokens %d", g.Resume, g.Sent, g.MaxTokens)
		}
		if st := h.s.State(); st.OnProbation != 1 || st.Suspects != 1 || st.QueueRequests != 2 {
			t.Errorf("state during probation %+v", st)
		}
		h.advance(time.Second)
		h.tok(2, fresh, "a", 1)
		if n := len(w2.gens()); n != 1 {
			t.Fatalf("worker 2 took %d gens during probation", n)
		}
		h.tok(2, fresh, "b", 2) // two tokens past its crash point (0): cleared
		if st := h.s.State(); st.OnProbation != 0 {
			t.Errorf("still on probation: %+v", st)
		}
		// The next suspect waits for an empty worker; the only one is
		// reserved for it, so the ordinary request waits too.
		if n := len(w2.gens()); n != 1 {
			t.Fatalf("worker 2 took %v while reserved for a waiting suspect", w2.genIDs())
		}
		h.done(2, fresh, "stop")
		g := lastGen(t, w2)
		if g.ID != streamed.ID || !slices.Equal(g.Resume, []int32{101, 102, 103}) || g.Sent != len("Hello wör") ||
			g.MaxTokens != 13 || !slices.Equal(g.Prompt, streamed.Prompt) || g.Temperature != 0.7 {
			t.Fatalf("resume frame %+v", g)
		}
		if n := len(w2.gens()); n != 2 {
			t.Fatalf("worker 2 gens %v, want the suspect alone", w2.genIDs())
		}
		h.tok(2, streamed, "!", 104)
		h.tok(2, streamed, "?", 105) // 5 >= 3 + 2: cleared
		h.advance(2 * time.Millisecond)
		if g := lastGen(t, w2); g.ID != later.ID {
			t.Fatalf("worker 2's last gen is %d, want the waiting request %d", g.ID, later.ID)
		}
		h.done(2, streamed, "stop")
		h.done(2, later, "stop")
		evs := events(streamed)
		if textOf(evs) != "!?" || evs[len(evs)-1].Err != nil || evs[len(evs)-1].CompletionTokens != 5 {
			t.Errorf("streamed events %+v", evs)
		}
		for _, r := range []*Request{fresh, later} {
			if evs := events(r); len(evs) == 0 || evs[len(evs)-1].Err != nil {
				t.Errorf("request %d: %+v", r.ID, evs)
			}
		}
		if v := counter(t, h.m.Probations); v != 2 {
			t.Errorf("probations = %v", v)
		}
		if v := counter(t, h.m.RequestsOnProbation); v != 0 {
			t.Errorf("on-probation gauge = %v", v)
		}
		for id, w := range h.workers {
			if id != 1 && slices.Contains(w.genIDs(), gone.ID) {
				t.Errorf("cancelled request re-sent to worker %d", id)
			}
		}
	})
}

// A worker that dies while running a suspect alone convicts it: the suspect
// fails with worker_crash naming the cause; the innocent suspect of the same
// first crash completes, and the pool keeps serving new requests meanwhile.
func TestPoisonFailsAloneInnocentsSurvive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, func(c *Config) { c.PoisonAfter = 1 })
		h.addWorker(1)
		h.addWorker(2)
		var rs []*Request
		for range 4 {
			rs = append(rs, h.submit())
			h.advance(time.Millisecond)
		}
		on1 := h.workers[1].genIDs()
		if len(on1) != 2 {
			t.Fatalf("worker 1 got %v, want two of four", on1)
		}
		byID := map[uint64]*Request{}
		for _, r := range rs {
			byID[r.ID] = r
		}
		poison, innocent := byID[on1[0]], byID[on1[1]]

		h.crash(1)
		w3 := h.addWorker(3)
		if got := w3.genIDs(); !slices.Equal(got, []uint64{poison.ID}) {
			t.Fatalf("worker 3 got %v, want the oldest suspect %d alone", got, poison.ID)
		}
		// Worker 2 is reserved for the other suspect: a new request waits.
		newcomer := h.submit()
		if slices.Contains(h.workers[2].genIDs(), newcomer.ID) {
			t.Fatal("reserved worker 2 took a new request")
		}
		h.s.RemoveWorker(3, "killed by SIGSEGV; last stderr: Fatal Python error: Segmentation fault")
		synctest.Wait()
		e := wantFailed(t, poison, events(poison), ReasonWorkerCrash)
		if !strings.Contains(e.Msg, "alone") || !strings.Contains(e.Msg, "SIGSEGV") || !strings.Contains(e.Msg, "Segmentation fault") {
			t.Errorf("poison message %q", e.Msg)
		}
		if v := counter(t, h.m.RequestsPoisoned); v != 1 {
			t.Errorf("poisoned = %v", v)
		}
		if st := h.s.State(); st.Poisoned != 1 || !strings.Contains(st.LastPoison, "SIGSEGV") {
			t.Errorf("state %+v", st)
		}
		w4 := h.addWorker(4)
		h.advance(2 * time.Millisecond)
		if got := w4.genIDs(); !slices.Equal(got, []uint64{innocent.ID}) {
			t.Fatalf("worker 4 got %v, want the innocent suspect alone", got)
		}
		// No suspect waits any more: worker 2 is open again.
		if !slices.Contains(h.workers[2].genIDs(), newcomer.ID) {
			t.Fatalf("worker 2 got %v, want the newcomer once nothing is reserved", h.workers[2].genIDs())
		}
		h.tok(4, innocent, "x", 1)
		h.tok(4, innocent, "y", 2)
		h.done(4, innocent, "stop")
		for _, r := range rs {
			if r == poison || r == innocent {
				continue
			}
			h.done(2, r, "stop")
		}
		h.done(2, newcomer, "stop")
		for _, r := range append(rs, newcomer) {
			if r == poison {
				continue
			}
			if evs := events(r); len(evs) == 0 || !evs[len(evs)-1].Done || evs[len(evs)-1].Err != nil {
				t.Errorf("request %d: %+v", r.ID, evs)
			}
		}
		if v := counter(t, h.m.RequestFailure.WithLabelValues(ReasonWorkerCrash)); v != 1 {
			t.Errorf("worker_crash failures = %v, want only the poison", v)
		}
	})
}

// While a suspect waits for its reserved worker to empty, the other workers
// keep taking new requests; the reservation goes to the least loaded worker.
func TestReservationLeavesOthersOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		w1, w2, w3 := h.addWorker(1), h.addWorker(2), h.addWorker(3)
		var rs []*Request
		for range 5 { // 2 on worker 1, 2 on worker 2, 1 on worker 3 (round robin)
			rs = append(rs, h.submit())
			h.advance(time.Millisecond)
		}
		if n1, n2, n3 := len(w1.gens()), len(w2.gens()), len(w3.gens()); n1 != 2 || n2 != 2 || n3 != 1 {
			t.Fatalf("spread %d/%d/%d", n1, n2, n3)
		}
		h.crash(1) // two suspects; no empty worker
		// Worker 3 (one in flight) and worker 2 (two) are reserved.
		n := h.submit()
		if slices.Contains(w2.genIDs(), n.ID) || slices.Contains(w3.genIDs(), n.ID) {
			t.Fatal("a reserved worker took a new request")
		}
		w4 := h.addWorker(4)
		h.advance(2 * time.Millisecond)
		susp := w4.genIDs()
		if len(susp) != 1 {
			t.Fatalf("worker 4 got %v, want one suspect alone", susp)
		}
		// One suspect left: one reservation (worker 3, the least loaded);
		// worker 2 is open again and takes the newcomer.
		if !slices.Contains(w2.genIDs(), n.ID) {
			t.Fatalf("worker 2 got %v, want the newcomer", w2.genIDs())
		}
		only := &Request{ID: w3.genIDs()[0]}
		h.done(3, only, "stop")
		h.advance(2 * time.Millisecond)
		if g := lastGen(t, w3); g.ID == only.ID || !slices.Contains(w1.genIDs(), g.ID) {
			t.Fatalf("worker 3's last gen %d, want the second suspect", g.ID)
		}
	})
}

// Suspects are dispatched in admission order, one per probation.
func TestSuspectsKeepAdmissionOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, nil)
		var want []uint64
		for range 6 {
			want = append(want, h.submit().ID) // all at t=0: the id breaks ties
		}
		h.addWorker(1)
		h.advance(2 * time.Millisecond)
		if got := h.workers[1].genIDs(); !slices.Equal(got, want) {
			t.Fatalf("first dispatch %v, want %v", got, want)
		}
		h.crash(1)
		w2 := h.addWorker(2)
		for i, id := range want {
			g := lastGen(t, w2)
			if g.ID != id || len(w2.gens()) != i+1 {
				t.Fatalf("probation %d: worker 2 got %v, want %v in order, one at a time", i, w2.genIDs(), want[:i+1])
			}
			r := &Request{ID: id}
			h.deliver(2, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{1, 2}, Text: "ab"})
			h.deliver(2, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "stop", PToks: 4})
		}
	})
}

// Crashes outside probation never fail a request, but MaxCrashes bounds how
// many any request lives through.
func TestMaxCrashesBoundsRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, func(c *Config) { c.MaxCrashes = 3; c.PoisonAfter = 100 })
		r := h.submit()
		for i := 1; i <= 3; i++ {
			h.addWorker(i)
			if got := h.workers[i].genIDs(); !slices.Equal(got, []uint64{r.ID}) {
				t.Fatalf("crash %d: worker %d got %v", i, i, got)
			}
			h.crash(i)
		}
		e := wantFailed(t, r, events(r), ReasonWorkerCrash)
		if !strings.Contains(e.Msg, "3 worker crashes") || !strings.Contains(e.Msg, "--max-crashes") {
			t.Errorf("message %q", e.Msg)
		}
		if st := h.s.State(); st.QueueRequests != 0 || st.Poisoned != 0 {
			t.Errorf("state %+v", st)
		}
		if v := counter(t, h.m.RequestsLost); v != 1 {
			t.Errorf("lost = %v", v)
		}
	})
}

// A worker that died after streaming a request's last token but before its
// done still held back some text (a partial character, a stop-string
// prefix). The request is resumed with no token left to generate, so the new
// worker flushes that text over the delivered ids and ends it.
func TestCrashAfterLastTokenFlushesHeldBackText(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, nil)
		h.addWorker(1)
		r := h.req(4, 3)
		h.mustSubmit(r)
		h.tok(1, r, "a", 1)
		h.tok(1, r, "bc", 2, 3)
		h.crash(1)
		w2 := h.addWorker(2)
		g := lastGen(t, w2)
		if g.ID != r.ID || g.MaxTokens != 0 || !slices.Equal(g.Resume, []int32{1, 2, 3}) || g.Sent != 3 {
			t.Fatalf("gen %+v, want a resume of all 3 tokens with max_tokens 0", g)
		}
		h.deliver(2, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "length", PToks: 7, Text: "é"})
		evs := events(r)
		if textOf(evs) != "abcé" {
			t.Fatalf("text %q", textOf(evs))
		}
		if last := evs[len(evs)-1]; !last.Done || last.Err != nil || last.FinishReason != "length" || last.CompletionTokens != 3 {
			t.Errorf("final event %+v, want Done length with 3 tokens", last)
		}
		if st := h.s.State(); st.QueueRequests != 0 || st.Running != 0 || st.OnProbation != 0 {
			t.Errorf("state %+v", st)
		}
	})
}

// The reservation policy on its own: one reserved worker per waiting
// suspect, least loaded first, sticky, released when nobody waits.
func TestReserveLocked(t *testing.T) {
	h := newHarnessNoRun(t, 8, nil)
	s := h.s
	mk := func(id, load int) *slot {
		sl := &slot{id: id, inflight: map[uint64]*Request{}}
		for i := range load {
			sl.inflight[uint64(100*id+i)] = &Request{}
		}
		s.slots[id] = sl
		return sl
	}
	a, b, c := mk(1, 3), mk(2, 1), mk(3, 2)
	suspects := func(n int) {
		s.queue = nil
		for range n {
			s.queue = append(s.queue, &Request{suspect: true})
		}
		s.queue = append(s.queue, &Request{}) // ordinary requests do not count
	}
	reserved := func() []int {
		var ids []int
		for _, sl := range []*slot{a, b, c} {
			if sl.reserved {
				ids = append(ids, sl.id)
			}
		}
		return ids
	}
	for _, step := range []struct {
		suspects int
		mutate   func()
		want     []int
	}{
		{1, nil, []int{2}},    // least loaded
		{2, nil, []int{2, 3}}, // next least loaded
		{2, func() { mk(3, 0); c = s.slots[3] }, []int{2, 3}}, // unchanged
		{1, nil, []int{3}}, // keeps the emptier one
		{1, func() { a.inflight = map[uint64]*Request{} }, []int{3}}, // sticky
		{3, func() { b.draining = true }, []int{1, 3}},               // draining workers are not reserved
		{0, nil, nil},
	} {
		if step.mutate != nil {
			step.mutate()
		}
		suspects(step.suspects)
		s.reserveLocked()
		if got := reserved(); !slices.Equal(got, step.want) {
			t.Fatalf("%d suspects: reserved %v, want %v", step.suspects, got, step.want)
		}
	}
}

// With PoisonAfter 2 (the default) one death alone is not yet a verdict: the
// suspect runs alone again, and a second death convicts it.
func TestPoisonAfterTwoDeathsAlone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 4, nil)
		r := h.submit()
		for i := 1; i <= 3; i++ {
			w := h.addWorker(i)
			if got := w.genIDs(); !slices.Equal(got, []uint64{r.ID}) {
				t.Fatalf("worker %d got %v", i, got)
			}
			h.crash(i)
			if i < 3 {
				if evs := events(r); len(evs) != 0 {
					t.Fatalf("after crash %d: %+v", i, evs)
				}
			}
		}
		e := wantFailed(t, r, events(r), ReasonWorkerCrash)
		if !strings.Contains(e.Msg, "alone on (2 time(s)") {
			t.Errorf("message %q", e.Msg)
		}
	})
}
