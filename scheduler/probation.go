package scheduler

import (
	"fmt"
	"slices"
	"time"
)

// Crash containment: suspicion, probation, verdict.
//
// A worker that dies takes every request it was running down with it, and
// the supervisor cannot tell which one (if any) killed it: a request that
// crashes kernels looks, from outside, like a worker killed by the OOM
// killer or an operator. So a crash makes every request in flight on that
// worker a suspect. A suspect goes back to the head of the queue and is
// retried or resumed on probation: alone on a worker, which takes nothing
// else until the suspect has produced ProbationTokens tokens past the point
// where it crashed (or finished). A suspect that survives is cleared and
// rejoins batching on the same worker. A worker that dies while running a
// suspect alone leaves no doubt about who did it: after PoisonAfter such
// deaths the request is declared poison and fails with worker_crash, and
// nothing else is charged. Crashes outside probation never fail a request by
// themselves; MaxCrashes bounds the crashes any request may live through, so
// a pool that keeps dying cannot retry one for ever.
//
// Suspects need an empty worker, and a busy pool has none: while suspects
// wait, reserveLocked keeps as many workers as there are waiting suspects
// (the least loaded first) from taking new requests, so they empty. Other
// requests keep flowing to the remaining workers.

// open reports whether the slot takes ordinary requests.
func (sl *slot) open() bool { return !sl.draining && sl.probation == nil && !sl.reserved }

// reserveLocked reserves one worker for each suspect waiting in the queue:
// the least loaded ones, so the worker that empties soonest is held back (a
// worker that is empty already serves at once). Ties keep the current
// reservation, then the lowest id. A reserved worker takes no new request,
// so it only empties; reservations nobody waits for are released.
func (s *Scheduler) reserveLocked() {
	want := 0
	for _, r := range s.queue {
		if r.suspect {
			want++
		}
	}
	cands := make([]*slot, 0, len(s.slots))
	for _, sl := range s.slots {
		if sl.draining || sl.probation != nil {
			sl.reserved = false
			continue
		}
		cands = append(cands, sl)
	}
	slices.SortFunc(cands, func(a, b *slot) int {
		if d := len(a.inflight) - len(b.inflight); d != 0 {
			return d
		}
		if a.reserved != b.reserved {
			if a.reserved {
				return -1
			}
			return 1
		}
		return a.id - b.id
	})
	for i, sl := range cands {
		sl.reserved = i < want
	}
}

// probationSlotLocked returns an empty reserved worker (nothing in flight,
// nothing assigned in this round) for a suspect, or -1.
func (s *Scheduler) probationSlotLocked(ids []int, batches map[int][]*Request) int {
	for _, id := range ids {
		sl := s.slots[id]
		if sl.reserved && sl.probation == nil && len(sl.inflight) == 0 && len(batches[id]) == 0 {
			return id
		}
	}
	return -1
}

func (s *Scheduler) startProbationLocked(sl *slot, r *Request) {
	sl.reserved = false
	sl.probation = r
	s.m.Probations.Inc()
	s.m.RequestsOnProbation.Inc()
}

// endProbationLocked clears the slot's suspect: it produced enough tokens
// alone, or finished. The slot takes requests again.
func (s *Scheduler) endProbationLocked(sl *slot) {
	sl.probation.suspect = false
	sl.probation = nil
	s.m.RequestsOnProbation.Dec()
	s.poke()
}

// crashLocked charges r, in flight on a worker that died, and reports whether
// it goes back to the queue (as a suspect); otherwise it has been failed.
// alone: r was on probation there, the only request the worker ran.
func (s *Scheduler) crashLocked(r *Request, alone bool, cause string) bool {
	r.crashes++
	if alone {
		r.aloneCrashes++
		if r.aloneCrashes >= s.cfg.PoisonAfter {
			s.poisoned++
			s.lastPoison = fmt.Sprintf("request %d: worker died while running it alone (%d time(s)): %s", r.ID, r.aloneCrashes, cause)
			s.m.RequestsPoisoned.Inc()
			s.m.RequestsLost.Inc()
			s.cfg.Log.Warn("request declared poison: it crashed the worker it ran alone on; failing it, nothing else is charged",
				"request", r.ID, "crashes_alone", r.aloneCrashes, "crashes", r.crashes, "cause", cause)
			s.failLocked(r, &Error{Reason: ReasonWorkerCrash, Msg: fmt.Sprintf(
				"this request crashed the worker it ran alone on (%d time(s); last: %s); not retried", r.aloneCrashes, cause)})
			return false
		}
	}
	if r.crashes >= s.cfg.MaxCrashes {
		s.m.RequestsLost.Inc()
		s.failLocked(r, &Error{Reason: ReasonWorkerCrash, Msg: fmt.Sprintf(
			"request was in flight during %d worker crashes (last: %s); not retried again (--max-crashes)", r.crashes, cause)})
		return false
	}
	if !r.suspect {
		r.suspect = true
		s.m.RequestsSuspected.Inc()
	}
	r.crashAt = len(r.generated)
	if len(r.generated) > 0 {
		// Also when every token was streamed and only done was lost: the
		// resume asks for no new token, and the new worker flushes the text
		// the dead one held back (a partial character, a stop-string prefix).
		r.lastToken = time.Time{} // the crash's pause is no inter-token gap
		s.m.RequestsResumed.Inc()
	} else {
		s.m.RequestsRetried.Inc()
	}
	return true
}
