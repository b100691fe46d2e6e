package metrics

import (
	"math"
	"sort"
	"sync"
	"time"
)

const (
	// statsSamples is how many recent requests (and dispatches) the
	// percentile and batch summaries cover.
	statsSamples = 1000
	// rateSlots is the per-second ring behind the tokens/s and requests/s
	// windows: the current (partial) second plus the 60 complete ones the
	// longest window needs.
	rateSlots = 61
)

// rateWindows are the throughput windows, in seconds, longest last.
var rateWindows = [...]int64{5, 30, 60}

// Stats records what the /stats JSON document reports. It is safe for
// concurrent use. Time comes only from the injected clock, so tests can
// drive it without sleeping.
//
// Throughput is kept in one bucket per second since the recorder was created
// (a ring of rateSlots), so heavy traffic cannot truncate a window the way a
// count-capped sample deque does. A window's rate is the tokens (or requests)
// in its last N complete seconds divided by N, or by the number of complete
// seconds so far when uptime is shorter than N. The partial current second is
// left out, so a rate lags by at most one second but never under-reads.
type Stats struct {
	now   func() time.Time
	start time.Time

	rateMu        sync.Mutex
	slots         [rateSlots]rateSlot
	tokensTotal   int64
	requestsTotal int64

	mu           sync.Mutex
	e2e          sampleRing // ms
	ttft         sampleRing // ms
	tpot         sampleRing // ms
	batches      sampleRing // sizes
	batchCurrent int
	batchDist    map[int]int64

	cacheQueries int64 // prompt tokens looked up in the workers' prompt caches
	cacheHits    int64 // of which found
}

type rateSlot struct {
	sec      int64 // seconds since start that this slot currently holds
	tokens   int64
	requests int64
}

// NewStats returns a recorder whose uptime starts at now(). A nil now means
// time.Now.
func NewStats(now func() time.Time) *Stats {
	if now == nil {
		now = time.Now
	}
	return &Stats{now: now, start: now(), batchDist: make(map[int]int64)}
}

// second returns the index of the one-second bucket t falls in. Durations
// are taken with Sub, so with time.Now the monotonic clock is used and wall
// clock steps do not disturb the windows.
func (s *Stats) second(t time.Time) int64 {
	d := t.Sub(s.start)
	if d < 0 {
		return 0
	}
	return int64(d / time.Second)
}

// slot returns the ring slot for sec, clearing it if it still holds an older
// second. Call with rateMu held.
func (s *Stats) slot(sec int64) *rateSlot {
	sl := &s.slots[sec%rateSlots]
	if sl.sec != sec {
		*sl = rateSlot{sec: sec}
	}
	return sl
}

// ObserveTokens counts n generated tokens as they stream; it feeds the
// tokens/s windows. It is cheap: one clock read and one short critical
// section. n <= 0 is ignored.
func (s *Stats) ObserveTokens(n int) {
	if n <= 0 {
		return
	}
	sec := s.second(s.now())
	s.rateMu.Lock()
	s.slot(sec).tokens += int64(n)
	s.tokensTotal += int64(n)
	s.rateMu.Unlock()
}

// ObserveRequest records a finished request: its end-to-end latency, its
// time to first token (0 when no token was produced) and how many tokens it
// generated. It feeds the requests/s windows and the latency, ttft and tpot
// (time per output token after the first) summaries. Negative durations are
// not recorded in the summaries. It does not count tokens for tokens/s; use
// ObserveTokens for that.
func (s *Stats) ObserveRequest(e2e, ttft time.Duration, completionTokens int) {
	sec := s.second(s.now())
	s.rateMu.Lock()
	s.slot(sec).requests++
	s.requestsTotal++
	s.rateMu.Unlock()

	s.mu.Lock()
	defer s.mu.Unlock()
	if e2e >= 0 {
		s.e2e.add(ms(e2e))
	}
	if ttft > 0 {
		s.ttft.add(ms(ttft))
		if completionTokens > 1 && e2e >= ttft {
			s.tpot.add(ms(e2e-ttft) / float64(completionTokens-1))
		}
	}
}

// ObservePrefixCache records one request's prompt cache lookup on a worker:
// queried prompt tokens and how many of them were found. Negative values are
// ignored.
func (s *Stats) ObservePrefixCache(queried, hits int) {
	if queried < 0 || hits < 0 {
		return
	}
	s.mu.Lock()
	s.cacheQueries += int64(queried)
	s.cacheHits += int64(hits)
	s.mu.Unlock()
}

// ObserveBatch records the batch size in effect when a dispatch happens.
// Sizes below 1 are ignored.
func (s *Stats) ObserveBatch(size int) {
	if size < 1 {
		return
	}
	s.mu.Lock()
	s.batches.add(float64(size))
	s.batchCurrent = size
	s.batchDist[size]++
	s.mu.Unlock()
}

// LatencySummary is in milliseconds over the last 1000 samples; percentiles
// interpolate linearly between the closest ranks. All fields are 0 when
// Count is 0.
type LatencySummary struct {
	P50   float64 `json:"p50"`
	P95   float64 `json:"p95"`
	P99   float64 `json:"p99"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
	Mean  float64 `json:"mean"`
	Count int     `json:"count"`
}

// WindowRates are per-second rates over the last 5, 30 and 60 seconds.
type WindowRates struct {
	Last5s  float64 `json:"5s"`
	Last30s float64 `json:"30s"`
	Last60s float64 `json:"60s"`
}

// ThroughputStats are time-windowed rates plus all-time totals.
type ThroughputStats struct {
	TokensPerSecond   WindowRates `json:"tokens_per_second"`
	RequestsPerSecond WindowRates `json:"requests_per_second"`
	TokensTotal       int64       `json:"tokens_total"`
	RequestsTotal     int64       `json:"requests_total"`
}

// BatchStats describe dispatch batch sizes: Current is the latest, Min, Max
// and Mean cover the last 1000 dispatches (Count of them), and Distribution
// counts every dispatch since start by size (JSON keys are the sizes).
type BatchStats struct {
	Current      int           `json:"current"`
	Min          int           `json:"min"`
	Max          int           `json:"max"`
	Mean         float64       `json:"mean"`
	Count        int           `json:"count"`
	Distribution map[int]int64 `json:"distribution"`
}

// PrefixCacheStats count prompt tokens since start: looked up in the
// workers' prompt caches, found there, and the ratio (0 before any lookup).
type PrefixCacheStats struct {
	QueriedTokens int64   `json:"queried_tokens"`
	HitTokens     int64   `json:"hit_tokens"`
	HitRate       float64 `json:"hit_rate"`
}

// StatsSnapshot is the /stats document. It is a superset of kr-serve-mlx's
// (whose uptime key is kept as Uptime); queue and worker sections are added
// by the supervisor, which embeds this struct in its own.
type StatsSnapshot struct {
	Latency       LatencySummary   `json:"latency"` // end-to-end
	TTFT          LatencySummary   `json:"ttft"`
	TPOT          LatencySummary   `json:"tpot"` // per output token after the first
	Throughput    ThroughputStats  `json:"throughput"`
	Batch         BatchStats       `json:"batch"`
	PrefixCache   PrefixCacheStats `json:"prefix_cache"`
	UptimeSeconds float64          `json:"uptime_seconds"`
	Uptime        float64          `json:"uptime"`    // same value; kr-serve-mlx's name
	Timestamp     float64          `json:"timestamp"` // Unix seconds
}

// Snapshot returns the current statistics. Values are rounded to 3 decimals.
func (s *Stats) Snapshot() StatsSnapshot {
	now := s.now()
	cur := s.second(now)

	var snap StatsSnapshot
	s.rateMu.Lock()
	snap.Throughput.TokensPerSecond, snap.Throughput.RequestsPerSecond = s.rates(cur)
	snap.Throughput.TokensTotal = s.tokensTotal
	snap.Throughput.RequestsTotal = s.requestsTotal
	s.rateMu.Unlock()

	s.mu.Lock()
	e2e := s.e2e.values()
	ttft := s.ttft.values()
	tpot := s.tpot.values()
	batches := s.batches.values()
	snap.Batch.Current = s.batchCurrent
	snap.PrefixCache = PrefixCacheStats{QueriedTokens: s.cacheQueries, HitTokens: s.cacheHits}
	if s.cacheQueries > 0 {
		snap.PrefixCache.HitRate = round3(float64(s.cacheHits) / float64(s.cacheQueries))
	}
	snap.Batch.Distribution = make(map[int]int64, len(s.batchDist))
	for k, v := range s.batchDist {
		snap.Batch.Distribution[k] = v
	}
	s.mu.Unlock()

	snap.Latency = summarize(e2e)
	snap.TTFT = summarize(ttft)
	snap.TPOT = summarize(tpot)
	if b := summarize(batches); b.Count > 0 {
		snap.Batch.Min = int(b.Min)
		snap.Batch.Max = int(b.Max)
		snap.Batch.Mean = b.Mean
		snap.Batch.Count = b.Count
	}

	up := now.Sub(s.start).Seconds()
	if up < 0 {
		up = 0
	}
	snap.UptimeSeconds = round3(up)
	snap.Uptime = snap.UptimeSeconds
	snap.Timestamp = round3(float64(now.UnixNano()) / 1e9)
	return snap
}

// rates computes the windowed rates at second cur from complete seconds
// only. Call with rateMu held.
func (s *Stats) rates(cur int64) (tokens, requests WindowRates) {
	var tok, req [len(rateWindows)]float64
	var sumTok, sumReq int64
	w := 0
	for back := int64(1); back <= rateWindows[len(rateWindows)-1]; back++ {
		sec := cur - back
		if sec >= 0 {
			if sl := &s.slots[sec%rateSlots]; sl.sec == sec {
				sumTok += sl.tokens
				sumReq += sl.requests
			}
		}
		for w < len(rateWindows) && back == rateWindows[w] {
			span := min(rateWindows[w], cur)
			if span > 0 {
				tok[w] = round3(float64(sumTok) / float64(span))
				req[w] = round3(float64(sumReq) / float64(span))
			}
			w++
		}
	}
	return WindowRates{tok[0], tok[1], tok[2]}, WindowRates{req[0], req[1], req[2]}
}

// summarize sorts xs in place and summarises it.
func summarize(xs []float64) LatencySummary {
	if len(xs) == 0 {
		return LatencySummary{}
	}
	sort.Float64s(xs)
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return LatencySummary{
		P50:   round3(percentile(xs, 50)),
		P95:   round3(percentile(xs, 95)),
		P99:   round3(percentile(xs, 99)),
		Min:   round3(xs[0]),
		Max:   round3(xs[len(xs)-1]),
		Mean:  round3(sum / float64(len(xs))),
		Count: len(xs),
	}
}

// percentile of sorted, non-empty xs with linear interpolation between
// closest ranks (numpy's default method).
func percentile(sorted []float64, p float64) float64 {
	h := p / 100 * float64(len(sorted)-1)
	lo := int(math.Floor(h))
	if lo >= len(sorted)-1 {
		return sorted[len(sorted)-1]
	}
	return sorted[lo] + (h-float64(lo))*(sorted[lo+1]-sorted[lo])
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func round3(x float64) float64 { return math.Round(x*1000) / 1000 }

// sampleRing keeps the last statsSamples values.
type sampleRing struct {
	buf  []float64
	next int
}

func (r *sampleRing) add(v float64) {
	if len(r.buf) < statsSamples {
		r.buf = append(r.buf, v)
		return
	}
	r.buf[r.next] = v
	r.next = (r.next + 1) % statsSamples
}

// values returns a copy of the samples, in no particular order.
func (r *sampleRing) values() []float64 {
	return append([]float64(nil), r.buf...)
}
