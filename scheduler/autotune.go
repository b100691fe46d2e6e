package scheduler

// Batch-size auto-tuner: chooses B, the number of sequences each worker
// decodes at once.
//
// kr-serve-mlx's AdaptiveController compared whole-request P99 latency with
// its 100 ms target. B barely moves that latency, so the controller never
// adjusted. This one steers on a latency that B does move: the gap between
// consecutive tokens of a request. Every sequence decoded together adds to
// the time of each step.
//
// Settings and defaults follow kr-serve-mlx: MLX_AUTO_TUNE (off), batch 2–8,
// EMA α 0.3, interval 10, target MLX_GPU_SCHEDULER_P99_THRESHOLD_MS (100 ms)
// ± 20 ms. The starting B is MLX_GPU_SCHEDULER_BATCH_SIZE (4).

import (
	"encoding/json"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Adjustment reasons (Adjustment.Reason, and the keys of
// TuneState.Totals).
const (
	TuneUp            = "up"
	TuneDown          = "down"
	TuneEmergencyDown = "emergency_down"
)

const (
	// An evaluation needs at least this many samples in the window.
	tuneMinSamples = 8
	// After a step down from B, a step back up to B is blocked for this many
	// intervals' worth of evaluations (the "ceiling"), unless the latency
	// has clearly improved.
	tuneCeilingHold = 30
	// A failed probe doubles the hold, up to this many times the base.
	tuneCeilingMaxHold = 16
	// A step down within this many intervals of a step up to the same B is
	// a failed probe.
	tuneProbeWindow = 3
	// Number of adjustments TuneState keeps.
	tuneHistory = 20
)

// TuneConfig configures the batch-size auto-tuner. NewController gives a
// default value to any field that is zero, negative or out of range, and
// clamps Initial to [Min, Max]. A zero Tolerance takes the default too,
// because a zero dead band would move B at every interval on noise. Start
// from DefaultTuneConfig.
type TuneConfig struct {
	Enabled   bool          // MLX_AUTO_TUNE; when false, B stays at Initial
	Min, Max  int           // bounds on B
	Initial   int           // starting B (MLX_GPU_SCHEDULER_BATCH_SIZE), clamped to [Min,Max]
	Alpha     float64       // EMA weight of the newest P99, in (0,1]
	Interval  int           // evaluations between ordinary adjustments
	Target    time.Duration // P99 inter-token latency target
	Tolerance time.Duration // dead band around Target
	Window    int           // samples kept in the sliding window (default 512)
}

// DefaultTuneConfig returns kr-serve-mlx's defaults. Auto-tuning is off.
func DefaultTuneConfig() TuneConfig {
	return TuneConfig{
		Enabled:   false,
		Min:       2,
		Max:       8,
		Initial:   4,
		Alpha:     0.3,
		Interval:  10,
		Target:    100 * time.Millisecond,
		Tolerance: 20 * time.Millisecond,
		Window:    512,
	}
}

func (c TuneConfig) normalized() TuneConfig {
	d := DefaultTuneConfig()
	if c.Min <= 0 {
		c.Min = d.Min
	}
	if c.Max <= 0 {
		c.Max = d.Max
	}
	if c.Max < c.Min {
		c.Max = c.Min
	}
	c.Initial = min(max(c.Initial, c.Min), c.Max)
	if !(c.Alpha > 0 && c.Alpha <= 1) { // also catches NaN
		c.Alpha = d.Alpha
	}
	if c.Interval <= 0 {
		c.Interval = d.Interval
	}
	if c.Target <= 0 {
		c.Target = d.Target
	}
	if c.Tolerance <= 0 {
		c.Tolerance = d.Tolerance
	}
	if c.Window <= 0 {
		c.Window = d.Window
	}
	c.Window = max(c.Window, tuneMinSamples)
	return c
}

// Adjustment records one change of B.
type Adjustment struct {
	Time     time.Time
	Old, New int
	Reason   string        // TuneUp, TuneDown or TuneEmergencyDown
	P99, EMA time.Duration // raw window P99 and its EMA when the decision was made
}

// MarshalJSON writes latencies in milliseconds, like TuneState.
func (a Adjustment) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Time   time.Time `json:"time"`
		Old    int       `json:"old"`
		New    int       `json:"new"`
		Reason string    `json:"reason"`
		P99    float64   `json:"p99_ms"`
		EMA    float64   `json:"ema_ms"`
	}{a.Time, a.Old, a.New, a.Reason, tuneMs(a.P99), tuneMs(a.EMA)})
}

// TuneState is a snapshot of the controller for /debug-style endpoints.
type TuneState struct {
	Enabled     bool           `json:"enabled"`
	B           int            `json:"b"`
	Min         int            `json:"min"`
	Max         int            `json:"max"`
	TargetMs    float64        `json:"target_ms"`
	ToleranceMs float64        `json:"tolerance_ms"`
	EMAMs       float64        `json:"ema_ms"`
	P99Ms       float64        `json:"p99_ms"`
	Samples     int            `json:"samples"`           // samples in the window now
	Ceiling     int            `json:"ceiling,omitempty"` // step-ups to this B or higher are held back; 0: none
	Adjustments []Adjustment   `json:"adjustments"`       // the last 20, oldest first
	Totals      map[string]int `json:"adjustments_total"` // all adjustments, by reason
}

// Controller is the batch-size auto-tuner. It is safe for concurrent use.
//
// Every counted evaluation computes the P99 of the sliding window of gaps
// and folds it into an EMA. An evaluation is counted when at least one new
// sample arrived since the previous one and the window holds enough samples.
// The controller acts as follows:
//
//   - P99 > 2×Target in two counted evaluations in a row: B −= 2 at once
//     (emergency_down). One is not enough: a P99 over a few hundred gaps
//     can be one burst (a prefill, a pause of the machine).
//   - Otherwise, every Interval counted evaluations:
//     EMA > Target+Tolerance: B −= 1.
//     EMA < Target−Tolerance and requests are waiting: B += 1, subject to
//     the ceiling below.
//
// Samples taken at the old B don't describe the new B. So every change
// clears the window and the EMA and restarts the interval. The next
// evaluation also discards its samples, which may come from steps that
// straddled the change.
//
// Hysteresis: a step down from C sets a ceiling at C. For the next 30
// intervals, B does not step back up to C unless the latency has clearly
// improved. It has when the linear extrapolation from the current B,
// EMA·(B+1)/B, meets Target. (For step times of the form base + k·B with
// base ≥ 0, that extrapolation is an upper bound.) Reaching C lifts the
// ceiling. When the hold expires, C is probed once. If that probe is stepped
// down from within 3 intervals, the hold doubles, up to 16×. A load where
// C−1 is below the band and C is above it therefore costs one short probe
// per hold, instead of a flip every interval.
type Controller struct {
	cfg TuneConfig
	b   atomic.Int64 // read lock-free by B(); written under mu

	mu      sync.Mutex
	win     []time.Duration // ring buffer of the last cfg.Window gaps
	next    int             // ring write position
	n       int             // samples in win
	fresh   int             // samples since the last evaluation
	scratch []time.Duration

	p99, ema time.Duration
	emaSet   bool
	evals    int   // counted evaluations in the current interval
	clock    int64 // counted evaluations ever; the hysteresis clock
	settle   bool  // discard the samples of the next evaluation
	over     int   // counted evaluations in a row with P99 > 2×Target

	ceiling      int   // 0: none
	ceilingUntil int64 // clock value at which the ceiling stops holding
	hold         int64 // length of the current ceiling's hold, in evaluations
	lastUpTo     int   // B reached by the last step up
	lastUpAt     int64 // clock value of the last step up

	hist   []Adjustment
	totals map[string]int
}

// NewController returns a controller at cfg.Initial (after normalization).
func NewController(cfg TuneConfig) *Controller {
	cfg = cfg.normalized()
	c := &Controller{
		cfg:     cfg,
		win:     make([]time.Duration, cfg.Window),
		scratch: make([]time.Duration, cfg.Window),
		totals:  map[string]int{TuneUp: 0, TuneDown: 0, TuneEmergencyDown: 0},
	}
	c.b.Store(int64(cfg.Initial))
	return c
}

// Observe records one inter-token gap: the time between two consecutive
// tokens of one request. Negative gaps are ignored.
func (c *Controller) Observe(gap time.Duration) {
	if gap < 0 {
		return
	}
	c.mu.Lock()
	c.win[c.next] = gap
	c.next++
	if c.next == len(c.win) {
		c.next = 0
	}
	if c.n < len(c.win) {
		c.n++
	}
	c.fresh++
	c.mu.Unlock()
}

// B returns the current batch size.
func (c *Controller) B() int { return int(c.b.Load()) }

// Evaluate runs one evaluation and returns the current B and the adjustment
// it made (nil if none). The caller calls it periodically, e.g. every
// 200 ms. waiting tells whether requests are queued. It is evidence that the
// current B is fully used, and a step up requires it. With Enabled false,
// Evaluate still tracks P99 and EMA for State, but never changes B.
func (c *Controller) Evaluate(now time.Time, waiting bool) (b int, adj *Adjustment) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b = int(c.b.Load())
	if c.settle {
		c.settle = false
		c.clearWindow()
		return b, nil
	}
	if c.fresh == 0 || c.n < tuneMinSamples {
		return b, nil
	}
	c.fresh = 0
	c.p99 = c.windowP99()
	if c.emaSet {
		c.ema = time.Duration(c.cfg.Alpha*float64(c.p99) + (1-c.cfg.Alpha)*float64(c.ema))
	} else {
		c.ema, c.emaSet = c.p99, true
	}
	c.clock++
	if !c.cfg.Enabled {
		return b, nil
	}

	if c.p99 > 2*c.cfg.Target {
		c.over++
	} else {
		c.over = 0
	}
	if c.over >= 2 && b > c.cfg.Min {
		return c.changeLocked(now, b, max(c.cfg.Min, b-2), TuneEmergencyDown)
	}
	c.evals++
	if c.evals < c.cfg.Interval {
		return b, nil
	}
	c.evals = 0
	switch {
	case c.ema > c.cfg.Target+c.cfg.Tolerance && b > c.cfg.Min:
		return c.changeLocked(now, b, b-1, TuneDown)
	case c.ema < c.cfg.Target-c.cfg.Tolerance && waiting && b < c.cfg.Max && c.upAllowedLocked(b):
		return c.changeLocked(now, b, b+1, TuneUp)
	}
	return b, nil
}

// upAllowedLocked applies the ceiling to a step from b to b+1.
func (c *Controller) upAllowedLocked(b int) bool {
	if c.ceiling == 0 || b+1 < c.ceiling || c.clock >= c.ceilingUntil {
		return true
	}
	// Clearly improved: even the linear extrapolation meets the target.
	return float64(c.ema)*float64(b+1)/float64(b) <= float64(c.cfg.Target)
}

func (c *Controller) changeLocked(now time.Time, old, nb int, reason string) (int, *Adjustment) {
	interval := int64(c.cfg.Interval)
	if nb < old {
		base := tuneCeilingHold * interval
		if old == c.ceiling && old == c.lastUpTo && c.clock-c.lastUpAt <= tuneProbeWindow*interval {
			c.hold = min(2*c.hold, tuneCeilingMaxHold*base) // failed probe
		} else {
			c.hold = base
		}
		c.ceiling = old
		c.ceilingUntil = c.clock + c.hold
	} else {
		c.lastUpTo, c.lastUpAt = nb, c.clock
		if nb >= c.ceiling {
			// The ceiling is reached, so it no longer holds. Its value stays
			// known so that a failed probe can be detected.
			c.ceilingUntil = min(c.ceilingUntil, c.clock)
		}
	}

	a := Adjustment{Time: now, Old: old, New: nb, Reason: reason, P99: c.p99, EMA: c.ema}
	if len(c.hist) == tuneHistory {
		copy(c.hist, c.hist[1:])
		c.hist = c.hist[:tuneHistory-1]
	}
	c.hist = append(c.hist, a)
	c.totals[reason]++

	c.b.Store(int64(nb))
	c.clearWindow()
	c.emaSet = false
	c.evals, c.over = 0, 0
	c.settle = true
	return nb, &a
}

func (c *Controller) clearWindow() {
	c.n, c.next, c.fresh = 0, 0, 0
}

// windowP99 is the nearest-rank 99th percentile of the window (n > 0).
func (c *Controller) windowP99() time.Duration {
	s := c.scratch[:c.n]
	copy(s, c.win[:c.n]) // the ring's first n slots hold the n samples
	slices.Sort(s)
	rank := (99*c.n + 99) / 100 // ceil(0.99·n)
	return s[rank-1]
}

// State returns a snapshot for status endpoints.
func (c *Controller) State() TuneState {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := TuneState{
		Enabled:     c.cfg.Enabled,
		B:           int(c.b.Load()),
		Min:         c.cfg.Min,
		Max:         c.cfg.Max,
		TargetMs:    tuneMs(c.cfg.Target),
		ToleranceMs: tuneMs(c.cfg.Tolerance),
		EMAMs:       tuneMs(c.ema),
		P99Ms:       tuneMs(c.p99),
		Samples:     c.n,
		Adjustments: slices.Clone(c.hist),
		Totals:      make(map[string]int, len(c.totals)),
	}
	if st.Adjustments == nil {
		st.Adjustments = []Adjustment{}
	}
	if c.ceiling > 0 && c.clock < c.ceilingUntil {
		st.Ceiling = c.ceiling
	}
	for k, v := range c.totals {
		st.Totals[k] = v
	}
	return st
}

func tuneMs(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
