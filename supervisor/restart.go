package supervisor

import (
	"math"
	"math/rand/v2"
	"time"
)

// RestartPolicy is restart behaviour as data (after thejerf/suture): every
// failure adds 1 to a score that decays with a half-life; the backoff doubles
// with the score; above Threshold the slot is given up for FailedRetry, after
// which it is tried again from a clean score.
type RestartPolicy struct {
	BackoffBase time.Duration // first delay
	BackoffMax  time.Duration
	Jitter      float64       // ±fraction of the delay
	HalfLife    time.Duration // failure score half-life
	Threshold   float64       // give up above this score
	FailedRetry time.Duration // how long a given-up slot waits before trying again
}

// DefaultRestartPolicy: 250 ms doubling to 30 s, ±20 %, score half-life 60 s,
// give up after 5 quick failures, try again after 60 s.
func DefaultRestartPolicy() RestartPolicy {
	return RestartPolicy{
		BackoffBase: 250 * time.Millisecond,
		BackoffMax:  30 * time.Second,
		Jitter:      0.2,
		HalfLife:    60 * time.Second,
		Threshold:   5,
		FailedRetry: 60 * time.Second,
	}
}

// restartState tracks one slot's failures.
type restartState struct {
	p     RestartPolicy
	score float64
	last  time.Time
	rnd   func() float64 // in [0,1)
}

func newRestartState(p RestartPolicy, rnd func() float64) *restartState {
	if rnd == nil {
		rnd = rand.Float64
	}
	return &restartState{p: p, rnd: rnd}
}

func (s *restartState) decayed(now time.Time) float64 {
	if s.last.IsZero() || s.p.HalfLife <= 0 {
		return s.score
	}
	dt := now.Sub(s.last)
	if dt <= 0 {
		return s.score
	}
	return s.score * math.Exp2(-dt.Seconds()/s.p.HalfLife.Seconds())
}

// failure records a failure at now and returns how long to wait before the
// next start, and whether the slot should be given up (wait is FailedRetry).
func (s *restartState) failure(now time.Time) (wait time.Duration, giveUp bool) {
	s.score = s.decayed(now) + 1
	s.last = now
	if s.score > s.p.Threshold {
		s.score = 0
		s.last = time.Time{}
		return s.p.FailedRetry, true
	}
	d := float64(s.p.BackoffBase) * math.Exp2(math.Max(0, s.score-1))
	d = math.Min(d, float64(s.p.BackoffMax))
	d *= 1 + s.p.Jitter*(2*s.rnd()-1)
	return time.Duration(d), false
}

// Score is the current failure score (for /stats).
func (s *restartState) Score(now time.Time) float64 { return s.decayed(now) }
