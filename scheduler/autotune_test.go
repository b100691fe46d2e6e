package scheduler

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// tuneSim is a simulated worker plus the scheduler's evaluation loop. The
// worker decodes B sequences per step, and a step takes base + k·B plus a
// jitter in [0, jitter) drawn from a seeded source. A step gives every
// sequence one token, so each step emits B gaps of its duration. A step
// that is still running at an evaluation completes in a later period, and
// it keeps the B it started with, as a real step straddling a change would.
// Each eval advances a fake clock by one period (200 ms) and calls Evaluate.
type tuneSim struct {
	t       *testing.T
	c       *Controller
	cfg     TuneConfig
	base, k time.Duration
	jitter  time.Duration
	rng     *rand.Rand
	period  time.Duration
	waiting bool

	now       time.Time
	busyUntil time.Time     // end of the last completed step
	pending   time.Duration // duration of the step in progress (0: none)
	pendingB  int

	evals int
	adjs  []Adjustment
	adjAt []int // eval index of each adjustment
}

func newTuneSim(t *testing.T, cfg TuneConfig, base, k time.Duration) *tuneSim {
	start := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	return &tuneSim{
		t: t, c: NewController(cfg), cfg: cfg.normalized(),
		base: base, k: k, jitter: 2 * time.Millisecond,
		rng:    rand.New(rand.NewPCG(1, 2)),
		period: 200 * time.Millisecond, waiting: true,
		now: start, busyUntil: start,
	}
}

// stepTime is the model's step time at b without jitter.
func (s *tuneSim) stepTime(b int) time.Duration { return s.base + time.Duration(b)*s.k }

// eval decodes one period at the current B, then evaluates.
func (s *tuneSim) eval() *Adjustment {
	s.t.Helper()
	end := s.now.Add(s.period)
	for {
		if s.pending == 0 {
			s.pendingB = s.c.B()
			s.pending = s.stepTime(s.pendingB) + time.Duration(s.rng.Int64N(int64(s.jitter)))
		}
		if s.busyUntil.Add(s.pending).After(end) {
			break
		}
		s.busyUntil = s.busyUntil.Add(s.pending)
		for range s.pendingB {
			s.c.Observe(s.pending)
		}
		s.pending = 0
	}
	s.now = end
	old := s.c.B()
	b, adj := s.c.Evaluate(s.now, s.waiting)
	if b != s.c.B() {
		s.t.Fatalf("eval %d: Evaluate returned B=%d, B() says %d", s.evals, b, s.c.B())
	}
	if b < s.cfg.Min || b > s.cfg.Max {
		s.t.Fatalf("eval %d: B=%d outside [%d,%d]", s.evals, b, s.cfg.Min, s.cfg.Max)
	}
	if adj == nil {
		if b != old {
			s.t.Fatalf("eval %d: B changed %d→%d with no adjustment", s.evals, old, b)
		}
	} else {
		if adj.Old != old || adj.New != b || !adj.Time.Equal(s.now) {
			s.t.Fatalf("eval %d: adjustment %+v, want Old=%d New=%d Time=%v", s.evals, *adj, old, b, s.now)
		}
		d := adj.New - adj.Old
		switch adj.Reason {
		case TuneUp:
			if d != 1 || !s.waiting {
				s.t.Fatalf("eval %d: bad up %+v (waiting=%v)", s.evals, *adj, s.waiting)
			}
		case TuneDown:
			if d != -1 {
				s.t.Fatalf("eval %d: bad down %+v", s.evals, *adj)
			}
		case TuneEmergencyDown:
			if d != -2 && !(d == -1 && adj.New == s.cfg.Min) {
				s.t.Fatalf("eval %d: bad emergency_down %+v", s.evals, *adj)
			}
		default:
			s.t.Fatalf("eval %d: unknown reason %q", s.evals, adj.Reason)
		}
		s.adjs = append(s.adjs, *adj)
		s.adjAt = append(s.adjAt, s.evals)
	}
	s.evals++
	return adj
}

func (s *tuneSim) run(n int) {
	s.t.Helper()
	for range n {
		s.eval()
	}
}

// directionChanges counts the reversals of direction in adjs.
func directionChanges(adjs []Adjustment) int {
	n, prev := 0, 0
	for _, a := range adjs {
		d := 1
		if a.New < a.Old {
			d = -1
		}
		if prev != 0 && d != prev {
			n++
		}
		prev = d
	}
	return n
}

func (s *tuneSim) logAdjustments() {
	for i, a := range s.adjs {
		s.t.Logf("eval %4d: %d→%d %-14s p99=%v ema=%v", s.adjAt[i], a.Old, a.New, a.Reason, a.P99, a.EMA)
	}
}

// Step time 20 ms + 13 ms·B against 100 ms ± 5 ms:
//
//	B:  4   5   6   7   8
//	ms: 72  85  98  111 124   (+ up to 2 ms of jitter)
//
// B=6 is the largest B that meets the target. It is also the only B inside
// the band [95,105] ms, so the answer doesn't depend on the side it is
// approached from. (With 20+12·B and ±20 ms, B=5 at 80 ms sits on the band
// edge and B=7 at 104 ms is inside the band. That is ambiguous.)
func convergeConfig() TuneConfig {
	cfg := DefaultTuneConfig()
	cfg.Enabled = true
	cfg.Tolerance = 5 * time.Millisecond
	return cfg
}

const convergeBase, convergeK = 20 * time.Millisecond, 13 * time.Millisecond

func TestTuneConvergesToLargestBMeetingTarget(t *testing.T) {
	for _, initial := range []int{2, 8} {
		cfg := convergeConfig()
		cfg.Initial = initial
		s := newTuneSim(t, cfg, convergeBase, convergeK)

		want := 0
		for b := cfg.Min; b <= cfg.Max; b++ {
			if s.stepTime(b)+s.jitter <= cfg.Target {
				want = b
			}
		}
		if want != 6 {
			t.Fatalf("model: largest B meeting target = %d, want 6", want)
		}

		// Four steps of Interval evaluations plus one settling evaluation each.
		s.run(5 * (cfg.Interval + 1))
		if b := s.c.B(); b != want {
			s.logAdjustments()
			t.Fatalf("from B=%d: B=%d after %d evals, want %d", initial, b, s.evals, want)
		}
		for _, a := range s.adjs { // monotone: no overshoot
			if (a.New > a.Old) != (initial < want) {
				s.logAdjustments()
				t.Fatalf("from B=%d: overshoot %+v", initial, a)
			}
		}
		t.Logf("from B=%d: converged to B=%d with %d adjustments, last at eval %d",
			initial, want, len(s.adjs), s.adjAt[len(s.adjAt)-1])

		// (2) Holds steady: no adjustments for 50 more intervals.
		n := len(s.adjs)
		s.run(50 * cfg.Interval)
		if len(s.adjs) != n || s.c.B() != want {
			s.logAdjustments()
			t.Fatalf("from B=%d: %d adjustments under steady load after convergence", initial, len(s.adjs)-n)
		}
		st := s.c.State()
		if st.EMAMs < 95 || st.EMAMs > 105 || st.Samples != cfg.Window {
			t.Fatalf("state after convergence: %+v", st)
		}
	}
}

// (5) Over 200 evaluations at steady load, there is at most one direction
// change. Two loads are checked. The first is a B that converges inside the
// band. The second is a hard load where B=2 is below the band and B=3 is
// above it (85 and 120 ms, band [90,110]). Without hysteresis, that load
// flips every interval.
func TestTuneNoOscillation(t *testing.T) {
	t.Run("band", func(t *testing.T) {
		s := newTuneSim(t, convergeConfig(), convergeBase, convergeK)
		s.run(200)
		if dc := directionChanges(s.adjs); dc > 1 {
			s.logAdjustments()
			t.Fatalf("%d direction changes in 200 evals", dc)
		}
	})
	t.Run("between", func(t *testing.T) {
		cfg := DefaultTuneConfig()
		cfg.Enabled, cfg.Initial, cfg.Tolerance = true, 2, 10*time.Millisecond
		s := newTuneSim(t, cfg, 15*time.Millisecond, 35*time.Millisecond)
		s.run(200)
		s.logAdjustments()
		if dc := directionChanges(s.adjs); dc > 1 {
			t.Fatalf("%d direction changes in 200 evals", dc)
		}
		if b := s.c.B(); b != 2 {
			t.Fatalf("B=%d, want 2 (the B that meets the target)", b)
		}
		if st := s.c.State(); st.Ceiling != 3 {
			t.Fatalf("ceiling=%d, want 3", st.Ceiling)
		}

		// Longer run: the ceiling expires and B=3 is probed again, but each
		// failed probe doubles the hold. After the first 200 evaluations the
		// probes come at holds of 300 and 600 evaluations.
		s.run(1800)
		s.logAdjustments()
		var ups []int
		for i, a := range s.adjs {
			if a.Reason == TuneUp {
				ups = append(ups, s.adjAt[i])
			}
		}
		if len(ups) < 3 {
			t.Fatalf("ups at %v: want the ceiling to expire and re-probe", ups)
		}
		for i := 2; i < len(ups); i++ {
			if gap, prev := ups[i]-ups[i-1], ups[i-1]-ups[i-2]; gap < 2*prev-2*cfg.Interval {
				t.Fatalf("ups at %v: probe spacing does not back off", ups)
			}
		}
		if len(s.adjs) > 10 {
			t.Fatalf("%d adjustments in %d evals", len(s.adjs), s.evals)
		}
	})
}

// After a step down sets a ceiling, a clear improvement lifts it at once.
func TestTuneCeilingLiftsWhenLatencyImproves(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Enabled, cfg.Initial, cfg.Tolerance = true, 2, 10*time.Millisecond
	s := newTuneSim(t, cfg, 15*time.Millisecond, 35*time.Millisecond)
	s.run(100)
	if s.c.B() != 2 || s.c.State().Ceiling != 3 {
		s.logAdjustments()
		t.Fatalf("B=%d ceiling=%d, want 2 and 3", s.c.B(), s.c.State().Ceiling)
	}
	// The load gets lighter: 15 + 20·B = 55, 75, 95, 115 ms at B=2..5.
	// The window P99 is a tail statistic: it shows the improvement once
	// nearly all of the 512 samples taken at the heavier load have left the
	// window (about 70 evaluations here). Getting worse shows at once.
	s.k = 20 * time.Millisecond
	start := s.evals
	for s.c.B() != 4 && s.evals-start < 200 {
		s.eval()
	}
	s.logAdjustments()
	if b := s.c.B(); b != 4 {
		t.Fatalf("B=%d %d evals after the load got lighter, want 4", b, s.evals-start)
	}
	// Without the improvement rule, the ceiling would hold B at 2 for 300
	// evaluations after the step down.
	if s.adjs[1].Reason != TuneDown || s.adjs[2].Reason != TuneUp || s.adjAt[2]-s.adjAt[1] >= tuneCeilingHold*cfg.Interval {
		t.Fatalf("the step back up to the ceiling waited for the hold to expire")
	}
	t.Logf("reached B=4 %d evals after the load got lighter", s.evals-start)
}

// (3) Backs off when the step time grows. An ordinary increase takes a few
// intervals. A spike past 2× target, seen by two evaluations in a row,
// triggers an emergency step.
func TestTuneBacksOff(t *testing.T) {
	t.Run("k doubles", func(t *testing.T) {
		cfg := convergeConfig()
		s := newTuneSim(t, cfg, convergeBase, convergeK)
		s.run(100)
		if s.c.B() != 6 {
			t.Fatalf("B=%d before the change, want 6", s.c.B())
		}
		// 20 + 26·B: 176, 150, 124, 98 ms at B=6..3. All are under 2× target.
		s.k = 2 * convergeK
		n, start := len(s.adjs), s.evals
		limit := 4 * (cfg.Interval + 1)
		for s.c.B() != 3 && s.evals-start < limit {
			s.eval()
		}
		if s.c.B() != 3 {
			s.logAdjustments()
			t.Fatalf("B=%d %d evals after k doubled, want 3", s.c.B(), s.evals-start)
		}
		t.Logf("backed off 6→3 in %d evals (%.1f intervals)", s.evals-start, float64(s.evals-start)/float64(cfg.Interval))
		for _, a := range s.adjs[n:] {
			if a.Reason != TuneDown {
				t.Fatalf("unexpected %+v", a)
			}
		}
		n = len(s.adjs)
		s.run(300)
		if len(s.adjs) != n {
			s.logAdjustments()
			t.Fatalf("not steady after backing off")
		}
	})
	t.Run("spike", func(t *testing.T) {
		cfg := convergeConfig()
		s := newTuneSim(t, cfg, convergeBase, convergeK)
		s.run(100)
		// 20 + 40·B = 260 ms at B=6, more than 2× target.
		s.k = 40 * time.Millisecond
		n, start := len(s.adjs), s.evals
		// At most three evaluations: a 260 ms step that is under way at the
		// jump may only complete in the period after the next one, and the
		// emergency rule wants two evaluations in a row over 2× target.
		for len(s.adjs) == n && s.evals-start < 3 {
			s.eval()
		}
		if len(s.adjs) == n {
			t.Fatalf("no adjustment within 3 evals of the spike")
		}
		// The first step is down: the emergency step, or an ordinary one if
		// the interval ended first (then the emergency step follows).
		if a := s.adjs[n]; (a.Reason != TuneEmergencyDown && a.Reason != TuneDown) || a.Old != 6 || a.New >= 6 {
			t.Fatalf("first adjustment after spike: %+v, want a step down from 6", a)
		}
		// Down to B=2 (100 ms) without stepping back up, and with at most
		// one emergency step: none on samples straddling a change.
		s.run(100)
		s.logAdjustments()
		if s.c.B() != 2 {
			t.Fatalf("B=%d, want 2", s.c.B())
		}
		for _, a := range s.adjs[n:] {
			if a.Reason == TuneUp {
				t.Fatalf("stepped up after the spike: %+v", a)
			}
		}
		if st := s.c.State(); st.Totals[TuneEmergencyDown] > 1 {
			t.Fatalf("emergency steps: %d, want at most 1", st.Totals[TuneEmergencyDown])
		}
	})
}

// (4) B never leaves [Min,Max], whatever the load. It reaches both bounds.
// Each eval checks the bound (tuneSim.eval).
func TestTuneBounds(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Enabled = true
	s := newTuneSim(t, cfg, time.Millisecond, time.Millisecond)
	s.run(200)
	if s.c.B() != cfg.Max {
		t.Fatalf("fast worker: B=%d, want Max=%d", s.c.B(), cfg.Max)
	}
	s.base = 500 * time.Millisecond
	s.run(200)
	if s.c.B() != cfg.Min {
		t.Fatalf("slow worker: B=%d, want Min=%d", s.c.B(), cfg.Min)
	}
	// Random loads, from idle to far beyond the emergency threshold.
	r := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		s.base = time.Duration(r.Int64N(int64(300 * time.Millisecond)))
		s.k = time.Duration(r.Int64N(int64(40 * time.Millisecond)))
		s.waiting = r.IntN(4) != 0
		s.run(1 + r.IntN(60))
	}
	st := s.c.State()
	t.Logf("random loads: %d evals, adjustments %v", s.evals, st.Totals)
	if st.Totals[TuneEmergencyDown] == 0 || st.Totals[TuneUp] == 0 || st.Totals[TuneDown] == 0 {
		t.Fatalf("random loads did not exercise every rule: %v", st.Totals)
	}
}

// (6) Without waiting requests, B never steps up. It still steps down.
func TestTuneNoStepUpWithoutWaiting(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Enabled, cfg.Initial = true, 4
	s := newTuneSim(t, cfg, time.Millisecond, time.Millisecond)
	s.waiting = false
	s.run(500)
	if s.c.B() != 4 || len(s.adjs) != 0 {
		t.Fatalf("B=%d adjustments=%v, want B=4 and none", s.c.B(), s.adjs)
	}
	// 150 ms + B·1 ms: above target+tolerance, below the emergency threshold.
	s.base = 150 * time.Millisecond
	s.run(100)
	if s.c.B() != cfg.Min {
		t.Fatalf("B=%d, want a step down to %d without waiting requests", s.c.B(), cfg.Min)
	}
	for _, a := range s.adjs {
		if a.Reason == TuneUp {
			t.Fatalf("stepped up without waiting requests: %+v", a)
		}
	}
}

// (7) Disabled: B never changes, whatever the samples.
func TestTuneDisabled(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Initial = 5
	c := NewController(cfg)
	r := rand.New(rand.NewPCG(5, 6))
	now := time.Unix(0, 0)
	for i := range 2000 {
		for range 1 + r.IntN(50) {
			if i%2 == 0 {
				c.Observe(time.Duration(r.Int64N(int64(time.Second)))) // far above 2× target
			} else {
				c.Observe(time.Duration(r.Int64N(int64(time.Millisecond)))) // far below
			}
		}
		now = now.Add(200 * time.Millisecond)
		b, adj := c.Evaluate(now, i%3 != 0)
		if b != 5 || adj != nil || c.B() != 5 {
			t.Fatalf("eval %d: B=%d adj=%v, want 5 and nil", i, b, adj)
		}
	}
	st := c.State()
	if st.Enabled || st.B != 5 || len(st.Adjustments) != 0 || st.P99Ms == 0 {
		t.Fatalf("state: %+v", st)
	}
}

func TestTuneConfigNormalized(t *testing.T) {
	c := NewController(TuneConfig{Enabled: true})
	d := DefaultTuneConfig()
	d.Enabled, d.Initial = true, d.Min
	if c.cfg != d {
		t.Fatalf("zero config: %+v, want %+v", c.cfg, d)
	}
	for _, tc := range []struct{ min, max, initial, wantB, wantMax int }{
		{2, 8, 100, 8, 8},
		{2, 8, -1, 2, 8},
		{3, 1, 2, 3, 3}, // Max < Min: Max = Min
	} {
		c := NewController(TuneConfig{Min: tc.min, Max: tc.max, Initial: tc.initial})
		if c.B() != tc.wantB || c.cfg.Max != tc.wantMax {
			t.Errorf("%+v: B=%d Max=%d", tc, c.B(), c.cfg.Max)
		}
	}
	if c := NewController(TuneConfig{Alpha: 1.5, Window: 3}); c.cfg.Alpha != 0.3 || c.cfg.Window != tuneMinSamples {
		t.Errorf("alpha/window: %+v", c.cfg)
	}
}

func TestTuneP99AndEMA(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Enabled, cfg.Window = true, 200
	c := NewController(cfg)
	now := time.Unix(0, 0)
	if _, adj := c.Evaluate(now, true); adj != nil || c.State().EMAMs != 0 {
		t.Fatal("evaluation with no samples did something")
	}
	// 1..300 ms; the window keeps the last 200 (101..300); the P99 by
	// nearest rank is the 198th of them, 298 ms. That is above 2× target at
	// B=4: one such evaluation may be a burst, the second in a row takes
	// the emergency step.
	for i := 1; i <= 300; i++ {
		c.Observe(time.Duration(i) * time.Millisecond)
	}
	c.Observe(-time.Second) // ignored
	if _, adj := c.Evaluate(now, true); adj != nil {
		t.Fatalf("emergency step on a single evaluation: %+v", adj)
	}
	for i := 1; i <= 300; i++ {
		c.Observe(time.Duration(i) * time.Millisecond)
	}
	b, adj := c.Evaluate(now, true)
	if adj == nil || adj.P99 != 298*time.Millisecond || adj.EMA != adj.P99 || b != 2 {
		t.Fatalf("b=%d adj=%+v", b, adj)
	}
	if st := c.State(); st.Samples != 0 {
		t.Fatalf("window not cleared on change: %d samples", st.Samples)
	}
	// The next evaluation settles: its samples are dropped.
	for range 20 {
		c.Observe(500 * time.Millisecond)
	}
	if _, adj := c.Evaluate(now, true); adj != nil || c.State().Samples != 0 {
		t.Fatalf("settling evaluation: adj=%v samples=%d", adj, c.State().Samples)
	}
	// Fresh EMA: seeded by the first P99, then α·p99 + (1−α)·ema.
	for range 20 {
		c.Observe(50 * time.Millisecond)
	}
	c.Evaluate(now, false)
	for range 20 {
		c.Observe(150 * time.Millisecond)
	}
	c.Evaluate(now, false)
	st := c.State()
	if st.P99Ms != 150 || math.Abs(st.EMAMs-80) > 1e-6 {
		t.Fatalf("p99=%v ema=%v, want 150 and 80", st.P99Ms, st.EMAMs)
	}
	// No new samples: not counted, nothing changes.
	c.Evaluate(now, false)
	if st2 := c.State(); st2.EMAMs != st.EMAMs {
		t.Fatalf("evaluation without new samples moved the EMA: %v", st2.EMAMs)
	}
}

func TestTuneStateJSON(t *testing.T) {
	cfg := convergeConfig()
	s := newTuneSim(t, cfg, time.Millisecond, time.Millisecond)
	s.run(100) // up to Max
	s.base = 500 * time.Millisecond
	s.run(100)
	st := s.c.State()
	raw, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	js := string(raw)
	for _, key := range []string{`"enabled":true`, `"b":2`, `"min":2`, `"max":8`, `"target_ms":100`,
		`"tolerance_ms":5`, `"ema_ms":`, `"p99_ms":`, `"samples":`, `"adjustments":[{"time":"2025-`,
		`"reason":"up"`, `"reason":"emergency_down"`, `"adjustments_total":{"down":`, `"ceiling":`} {
		if !strings.Contains(js, key) {
			t.Errorf("state JSON lacks %s: %s", key, js)
		}
	}
	var back struct {
		Adjustments []struct {
			Old, New int
			P99      float64 `json:"p99_ms"`
		} `json:"adjustments"`
		Totals map[string]int `json:"adjustments_total"`
	}
	if err := json.Unmarshal(raw, &back); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, v := range back.Totals {
		total += v
	}
	if total != len(s.adjs) || len(back.Adjustments) != min(len(s.adjs), tuneHistory) {
		t.Fatalf("totals %v, %d adjustments listed, %d made", back.Totals, len(back.Adjustments), len(s.adjs))
	}
	last := back.Adjustments[len(back.Adjustments)-1]
	if a := s.adjs[len(s.adjs)-1]; last.Old != a.Old || last.New != a.New || last.P99 != tuneMs(a.P99) {
		t.Fatalf("last adjustment %+v, want %+v", last, a)
	}

	// History keeps the last 20.
	c := NewController(TuneConfig{Enabled: true, Interval: 1})
	now := time.Unix(0, 0)
	for i := range 200 {
		gap := 10 * time.Millisecond // up (waiting) ...
		if i%4 >= 2 {
			gap = 130 * time.Millisecond // ... or down; every other eval settles
		}
		for range 10 {
			c.Observe(gap)
		}
		now = now.Add(time.Second)
		c.Evaluate(now, true)
	}
	st = c.State()
	if len(st.Adjustments) != tuneHistory || st.Totals[TuneUp]+st.Totals[TuneDown] <= tuneHistory {
		t.Fatalf("history %d, totals %v", len(st.Adjustments), st.Totals)
	}
	if !st.Adjustments[tuneHistory-1].Time.Equal(now) && !st.Adjustments[tuneHistory-1].Time.Equal(now.Add(-time.Second)) {
		t.Fatalf("history does not end with the latest adjustment: %+v", st.Adjustments[tuneHistory-1])
	}
}

// Observe from many goroutines while another evaluates (run with -race).
func TestTuneConcurrent(t *testing.T) {
	cfg := DefaultTuneConfig()
	cfg.Enabled, cfg.Interval = true, 1
	c := NewController(cfg)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20000 {
				c.Observe(time.Duration(g*i%250) * time.Millisecond)
				_ = c.B()
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		now := time.Unix(0, 0)
		for {
			select {
			case <-stop:
				return
			default:
			}
			now = now.Add(time.Millisecond)
			b, _ := c.Evaluate(now, true)
			if b < cfg.Min || b > cfg.Max {
				t.Errorf("B=%d out of bounds", b)
				return
			}
			_ = c.State()
		}
	}()
	wg.Wait()
	close(stop)
	<-done
}

func BenchmarkObserve(b *testing.B) {
	c := NewController(DefaultTuneConfig())
	gap := 37 * time.Millisecond
	for b.Loop() {
		c.Observe(gap)
	}
}

func BenchmarkObserveParallel(b *testing.B) {
	c := NewController(DefaultTuneConfig())
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c.Observe(37 * time.Millisecond)
		}
	})
}

func BenchmarkEvaluate(b *testing.B) {
	cfg := DefaultTuneConfig()
	cfg.Enabled = true
	c := NewController(cfg)
	now := time.Unix(0, 0)
	i := 0
	for b.Loop() {
		for range 16 {
			i++
			c.Observe(time.Duration(90+i%20) * time.Millisecond)
		}
		c.Evaluate(now, false)
	}
}
