package supervisor

import (
	"math"
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)

// fixed returns a rnd that always yields v.
func fixed(v float64) func() float64 { return func() float64 { return v } }

func near(a, b time.Duration) bool { return math.Abs(float64(a-b)) <= float64(time.Microsecond) }

func TestRestartBackoffDoublesAndCaps(t *testing.T) {
	p := RestartPolicy{BackoffBase: 100 * time.Millisecond, BackoffMax: time.Second, Jitter: 0.2, Threshold: 100}
	s := newRestartState(p, fixed(0.5)) // 0.5: no jitter
	want := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i, w := range want {
		d, giveUp := s.failure(t0) // all at once, no half-life: no decay
		if giveUp || !near(d, w*time.Millisecond) {
			t.Fatalf("failure %d: wait %v giveUp %v, want %v", i+1, d, giveUp, w*time.Millisecond)
		}
	}
	if got := s.Score(t0.Add(time.Hour)); got != float64(len(want)) {
		t.Fatalf("score %v without a half-life, want %d", got, len(want))
	}
}

func TestRestartJitterBounds(t *testing.T) {
	p := RestartPolicy{BackoffBase: time.Second, BackoffMax: time.Minute, Jitter: 0.25, Threshold: 100}
	for _, c := range []struct {
		r    float64
		want time.Duration
	}{
		{0, 750 * time.Millisecond}, // lowest: -25 %
		{0.5, time.Second},
		{0.75, 1125 * time.Millisecond},
		{math.Nextafter(1, 0), 1250 * time.Millisecond}, // just under +25 %
	} {
		d, _ := newRestartState(p, fixed(c.r)).failure(t0)
		if !near(d, c.want) {
			t.Errorf("rnd %v: wait %v, want %v", c.r, d, c.want)
		}
	}
	// With the real source, every wait stays within ±Jitter.
	s := newRestartState(RestartPolicy{BackoffBase: time.Second, BackoffMax: time.Second, Jitter: 0.25, Threshold: 1e9}, nil)
	for range 1000 {
		d, _ := s.failure(t0)
		if d < 750*time.Millisecond || d > 1250*time.Millisecond {
			t.Fatalf("wait %v outside ±25 %% of 1s", d)
		}
	}
}

// The cap applies before the jitter, so a wait may exceed BackoffMax by up to
// Jitter (documented here so that a change is deliberate).
func TestRestartJitterAppliesAfterCap(t *testing.T) {
	p := RestartPolicy{BackoffBase: time.Second, BackoffMax: 2 * time.Second, Jitter: 0.2, Threshold: 100}
	s := newRestartState(p, fixed(math.Nextafter(1, 0)))
	var d time.Duration
	for range 5 {
		d, _ = s.failure(t0)
	}
	if d <= p.BackoffMax || d > 2400*time.Millisecond {
		t.Fatalf("wait %v", d)
	}
}

func TestRestartScoreDecaysOverHalfLife(t *testing.T) {
	p := RestartPolicy{BackoffBase: 100 * time.Millisecond, BackoffMax: time.Hour, HalfLife: 10 * time.Second, Threshold: 100}
	s := newRestartState(p, fixed(0.5))
	s.failure(t0)
	s.failure(t0) // score 2
	for _, c := range []struct {
		after time.Duration
		score float64
	}{{0, 2}, {10 * time.Second, 1}, {20 * time.Second, 0.5}, {5 * time.Second, 2 / math.Sqrt2}, {-time.Second, 2}} {
		if got := s.Score(t0.Add(c.after)); math.Abs(got-c.score) > 1e-9 {
			t.Errorf("score after %v: %v, want %v", c.after, got, c.score)
		}
	}
	// A failure one half-life later: score 2/2+1 = 2, so the wait is 2×base.
	d, _ := s.failure(t0.Add(10 * time.Second))
	if !near(d, 200*time.Millisecond) {
		t.Fatalf("wait %v, want 200ms", d)
	}
	// A failure long after: back to the base delay.
	d, _ = s.failure(t0.Add(10 * time.Hour))
	if !near(d, 100*time.Millisecond) {
		t.Fatalf("wait %v, want 100ms after the score decayed", d)
	}
	// Fractional scores give intermediate waits: score 1.5 → base×√2.
	s = newRestartState(p, fixed(0.5))
	s.failure(t0)
	d, _ = s.failure(t0.Add(10 * time.Second))
	if want := time.Duration(float64(p.BackoffBase) * math.Sqrt2); !near(d, want) {
		t.Fatalf("wait %v, want %v", d, want)
	}
}

func TestRestartGivesUpAboveThreshold(t *testing.T) {
	p := RestartPolicy{BackoffBase: 10 * time.Millisecond, BackoffMax: time.Second, HalfLife: time.Minute, Threshold: 3, FailedRetry: 42 * time.Second}
	s := newRestartState(p, fixed(0.5))
	for i := range 3 {
		if d, giveUp := s.failure(t0); giveUp || d >= time.Second {
			t.Fatalf("failure %d: %v %v", i+1, d, giveUp)
		}
	}
	d, giveUp := s.failure(t0) // score 4 > 3
	if !giveUp || d != p.FailedRetry {
		t.Fatalf("4th quick failure: %v %v, want give up for %v", d, giveUp, p.FailedRetry)
	}
	if s.Score(t0) != 0 {
		t.Fatalf("score %v after giving up, want a clean slate", s.Score(t0))
	}
	// After FailedRetry the slot is tried again from scratch.
	if d, giveUp := s.failure(t0.Add(p.FailedRetry)); giveUp || !near(d, 10*time.Millisecond) {
		t.Fatalf("first failure after retry: %v %v", d, giveUp)
	}
}

// Failures spread out by several half-lives never add up to a give-up.
func TestRestartSlowFailuresNeverGiveUp(t *testing.T) {
	p := RestartPolicy{BackoffBase: 10 * time.Millisecond, BackoffMax: time.Second, HalfLife: time.Minute, Threshold: 3, FailedRetry: time.Hour}
	s := newRestartState(p, fixed(0.5))
	now := t0
	for i := range 1000 {
		if _, giveUp := s.failure(now); giveUp {
			t.Fatalf("gave up at failure %d, one every 2 half-lives", i+1)
		}
		now = now.Add(2 * time.Minute)
	}
	if sc := s.Score(now); sc > 4.0/3 {
		t.Fatalf("score %v, want the geometric limit 4/3 decayed", sc)
	}
}

// DefaultRestartPolicy's comment says "give up after 5 quick failures"; the
// threshold is "score above 5", so five failures in a row back off and the
// sixth gives up.
func TestDefaultRestartPolicy(t *testing.T) {
	p := DefaultRestartPolicy()
	s := newRestartState(p, fixed(0.5))
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second}
	for i, w := range want {
		d, giveUp := s.failure(t0)
		if giveUp || !near(d, w) {
			t.Fatalf("failure %d: %v %v, want %v", i+1, d, giveUp, w)
		}
	}
	if d, giveUp := s.failure(t0); !giveUp || d != time.Minute {
		t.Fatalf("6th quick failure: %v %v", d, giveUp)
	}
}
