package metrics

import (
	"encoding/json"
	"math"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock; it never sleeps.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func wantRates(t *testing.T, what string, got WindowRates, r5, r30, r60 float64) {
	t.Helper()
	if !near(got.Last5s, r5) || !near(got.Last30s, r30) || !near(got.Last60s, r60) {
		t.Errorf("%s = %+v, want 5s=%v 30s=%v 60s=%v", what, got, r5, r30, r60)
	}
}

func TestStatsSteadyRate(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	// 100 tokens in each of the first 60 seconds (at t+0.5s, t+1.5s, ...).
	c.Advance(500 * time.Millisecond)
	for i := 0; i < 60; i++ {
		s.ObserveTokens(40)
		s.ObserveTokens(60)
		c.Advance(time.Second)
	}
	// now = t+60.5s: seconds 0..59 are complete.
	snap := s.Snapshot()
	wantRates(t, "tokens/s", snap.Throughput.TokensPerSecond, 100, 100, 100)
	if snap.Throughput.TokensTotal != 6000 {
		t.Errorf("tokens_total = %d", snap.Throughput.TokensTotal)
	}
	if !near(snap.UptimeSeconds, 60.5) || snap.Uptime != snap.UptimeSeconds {
		t.Errorf("uptime = %v / %v", snap.UptimeSeconds, snap.Uptime)
	}
}

func TestStatsHeavyTrafficNotTruncated(t *testing.T) {
	// kr-serve-mlx capped each window at 10 samples per second, so a burst of
	// many small observations read low. Per-second buckets must not.
	c := newFakeClock()
	s := NewStats(c.Now)
	for sec := 0; sec < 60; sec++ {
		for i := 0; i < 1000; i++ {
			s.ObserveTokens(1)
			c.Advance(time.Millisecond)
		}
	}
	wantRates(t, "tokens/s", s.Snapshot().Throughput.TokensPerSecond, 1000, 1000, 1000)
}

func TestStatsWindowsDiffer(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	c.Advance(100 * time.Millisecond)
	// seconds 0..29: 10 tok/s; seconds 30..54: 50 tok/s; 55..59: 200 tok/s.
	for sec := 0; sec < 60; sec++ {
		n := 10
		switch {
		case sec >= 55:
			n = 200
		case sec >= 30:
			n = 50
		}
		s.ObserveTokens(n)
		s.ObserveRequest(time.Second, 100*time.Millisecond, n)
		c.Advance(time.Second)
	}
	snap := s.Snapshot()
	r5 := 200.0
	r30 := (25*50 + 5*200) / 30.0
	r60 := (30*10 + 25*50 + 5*200) / 60.0
	wantRates(t, "tokens/s", snap.Throughput.TokensPerSecond, r5, round3(r30), round3(r60))
	wantRates(t, "requests/s", snap.Throughput.RequestsPerSecond, 1, 1, 1)
	if snap.Throughput.RequestsTotal != 60 {
		t.Errorf("requests_total = %d", snap.Throughput.RequestsTotal)
	}
}

func TestStatsOldBucketsExpire(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	c.Advance(200 * time.Millisecond)
	s.ObserveTokens(600) // second 0
	c.Advance(time.Second)

	// now 1.2s: only second 0 is complete; uptime-limited span is 1s.
	wantRates(t, "after 1s", s.Snapshot().Throughput.TokensPerSecond, 600, 600, 600)

	c.Advance(4 * time.Second) // now 5.2s: seconds 0..4 complete
	wantRates(t, "after 5s", s.Snapshot().Throughput.TokensPerSecond, 120, 120, 120)

	c.Advance(time.Second) // now 6.2s: second 0 left the 5s window
	wantRates(t, "after 6s", s.Snapshot().Throughput.TokensPerSecond, 0, 100, 100)

	c.Advance(24 * time.Second) // 30.2s
	wantRates(t, "after 30s", s.Snapshot().Throughput.TokensPerSecond, 0, 20, 20)

	c.Advance(time.Second) // 31.2s
	wantRates(t, "after 31s", s.Snapshot().Throughput.TokensPerSecond, 0, 0, round3(600.0/31))

	c.Advance(29 * time.Second) // 60.2s
	wantRates(t, "after 60s", s.Snapshot().Throughput.TokensPerSecond, 0, 0, 10)

	c.Advance(time.Second) // 61.2s: gone from every window
	wantRates(t, "after 61s", s.Snapshot().Throughput.TokensPerSecond, 0, 0, 0)

	// The ring slot second 0 used is reused 61 s later and must not carry the
	// old count: observe in second 61, read at 62.2s.
	s.ObserveTokens(5)
	c.Advance(time.Second)
	wantRates(t, "reused slot", s.Snapshot().Throughput.TokensPerSecond, 1, round3(5.0/30), round3(5.0/60))

	// A long idle gap (several laps of the ring) reads as zero.
	c.Advance(10 * time.Minute)
	wantRates(t, "idle", s.Snapshot().Throughput.TokensPerSecond, 0, 0, 0)
	if s.Snapshot().Throughput.TokensTotal != 605 {
		t.Error("total lost")
	}
}

func TestStatsCurrentSecondExcluded(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	s.ObserveTokens(50)
	c.Advance(999 * time.Millisecond)
	wantRates(t, "partial", s.Snapshot().Throughput.TokensPerSecond, 0, 0, 0)
	c.Advance(time.Millisecond)
	wantRates(t, "complete", s.Snapshot().Throughput.TokensPerSecond, 50, 50, 50)
	// Tokens in the (partial) current second do not move the rates yet.
	s.ObserveTokens(1000)
	c.Advance(500 * time.Millisecond)
	wantRates(t, "current", s.Snapshot().Throughput.TokensPerSecond, 50, 50, 50)
	c.Advance(500 * time.Millisecond)
	wantRates(t, "next", s.Snapshot().Throughput.TokensPerSecond, 525, 525, 525)
}

func TestPercentilesKnownData(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	// e2e 1..100 ms, ttft 10 ms, 11 tokens => tpot (e2e-10)/10.
	for i := 100; i >= 1; i-- {
		s.ObserveRequest(time.Duration(i)*time.Millisecond, 10*time.Millisecond, 11)
	}
	snap := s.Snapshot()
	l := snap.Latency
	// numpy.percentile(range(1,101), [50,95,99]) = 50.5, 95.05, 99.01
	want := LatencySummary{P50: 50.5, P95: 95.05, P99: 99.01, Min: 1, Max: 100, Mean: 50.5, Count: 100}
	if l != want {
		t.Errorf("latency = %+v, want %+v", l, want)
	}
	if tt := snap.TTFT; tt.P50 != 10 || tt.P99 != 10 || tt.Count != 100 {
		t.Errorf("ttft = %+v", tt)
	}
	// e2e < ttft for i < 10: those get no tpot sample.
	if tp := snap.TPOT; tp.Count != 91 || tp.Min != 0 || tp.Max != 9 {
		t.Errorf("tpot = %+v", tp)
	}

	// Small sets and interpolation between two values.
	s2 := NewStats(c.Now)
	for _, v := range []int{10, 20} {
		s2.ObserveRequest(time.Duration(v)*time.Millisecond, 0, 0)
	}
	l2 := s2.Snapshot().Latency
	if l2.P50 != 15 || l2.P95 != 19.5 || l2.P99 != 19.9 || l2.Mean != 15 {
		t.Errorf("two-sample latency = %+v", l2)
	}
	if s2.Snapshot().TTFT.Count != 0 {
		t.Error("ttft 0 must not be recorded")
	}

	// Sub-millisecond precision survives (rounded to the microsecond).
	s3 := NewStats(c.Now)
	s3.ObserveRequest(1500*time.Microsecond, 0, 0)
	if got := s3.Snapshot().Latency.P50; got != 1.5 {
		t.Errorf("p50 = %v, want 1.5", got)
	}
}

func TestLatencyWindowIsLast1000(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	for i := 0; i < 1000; i++ {
		s.ObserveRequest(10*time.Second, time.Second, 1)
	}
	for i := 0; i < 1000; i++ {
		s.ObserveRequest(time.Duration(i+1)*time.Millisecond, time.Millisecond, 1)
	}
	s.ObserveRequest(-time.Second, -time.Second, 1) // invalid: dropped
	l := s.Snapshot().Latency
	if l.Count != 1000 || l.Max != 1000 || l.Min != 1 {
		t.Errorf("latency = %+v", l)
	}
	if s.Snapshot().Throughput.RequestsTotal != 2001 {
		t.Error("requests_total")
	}
}

func TestBatchStats(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	if b := s.Snapshot().Batch; b.Count != 0 || b.Distribution == nil {
		t.Errorf("empty batch = %+v", b)
	}
	for _, b := range []int{1, 4, 4, 8, 0, -2, 3} {
		s.ObserveBatch(b)
	}
	b := s.Snapshot().Batch
	if b.Current != 3 || b.Min != 1 || b.Max != 8 || b.Mean != 4 || b.Count != 5 {
		t.Errorf("batch = %+v", b)
	}
	if len(b.Distribution) != 4 || b.Distribution[4] != 2 || b.Distribution[1] != 1 {
		t.Errorf("distribution = %v", b.Distribution)
	}
}

func TestPrefixCacheStats(t *testing.T) {
	s := NewStats(newFakeClock().Now)
	if pc := s.Snapshot().PrefixCache; pc != (PrefixCacheStats{}) {
		t.Errorf("empty recorder: %+v", pc)
	}
	s.ObservePrefixCache(100, 0)
	s.ObservePrefixCache(200, 150)
	s.ObservePrefixCache(-1, 5) // ignored
	if pc, want := s.Snapshot().PrefixCache, (PrefixCacheStats{QueriedTokens: 300, HitTokens: 150, HitRate: 0.5}); pc != want {
		t.Errorf("prefix cache %+v, want %+v", pc, want)
	}
}

func TestSnapshotJSON(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	empty, err := json.Marshal(s.Snapshot()) // no NaN on an empty recorder
	if err != nil {
		t.Fatal(err)
	}
	_ = empty
	s.ObserveRequest(20*time.Millisecond, 5*time.Millisecond, 4)
	s.ObserveBatch(2)
	s.ObserveTokens(4)
	c.Advance(2 * time.Second)
	raw, err := json.Marshal(s.Snapshot())
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"latency", "ttft", "tpot", "throughput", "batch", "prefix_cache", "uptime_seconds", "uptime", "timestamp"} {
		if _, ok := doc[k]; !ok {
			t.Errorf("key %q missing: %s", k, raw)
		}
	}
	lat := doc["latency"].(map[string]any)
	for _, k := range []string{"p50", "p95", "p99", "min", "max", "mean", "count"} {
		if _, ok := lat[k]; !ok {
			t.Errorf("latency.%s missing", k)
		}
	}
	tp := doc["throughput"].(map[string]any)
	for _, sect := range []string{"tokens_per_second", "requests_per_second"} {
		w := tp[sect].(map[string]any)
		for _, k := range []string{"5s", "30s", "60s"} {
			if _, ok := w[k]; !ok {
				t.Errorf("throughput.%s.%s missing", sect, k)
			}
		}
	}
	b := doc["batch"].(map[string]any)
	for _, k := range []string{"current", "min", "max", "mean", "distribution"} {
		if _, ok := b[k]; !ok {
			t.Errorf("batch.%s missing", k)
		}
	}
	if d := b["distribution"].(map[string]any); d["2"] != 1.0 {
		t.Errorf("distribution = %v", d)
	}
	if ts := doc["timestamp"].(float64); ts != float64(c.Now().Unix()) {
		t.Errorf("timestamp = %v", ts)
	}

	// The supervisor embeds the snapshot; its keys must flatten.
	type supervisorStats struct {
		StatsSnapshot
		QueueDepth int `json:"queue_depth"`
	}
	raw, _ = json.Marshal(supervisorStats{StatsSnapshot: s.Snapshot(), QueueDepth: 3})
	doc = nil
	_ = json.Unmarshal(raw, &doc)
	if _, ok := doc["latency"]; !ok || doc["queue_depth"] != 3.0 {
		t.Errorf("embedded = %s", raw)
	}
}

func TestStatsConcurrent(t *testing.T) {
	c := newFakeClock()
	s := NewStats(c.Now)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				s.ObserveTokens(1)
				s.ObserveRequest(time.Millisecond, time.Millisecond, 2)
				s.ObserveBatch(i%8 + 1)
				if i%50 == 0 {
					c.Advance(100 * time.Millisecond)
					_ = s.Snapshot()
				}
			}
		}()
	}
	wg.Wait()
	snap := s.Snapshot()
	if snap.Throughput.TokensTotal != 4000 || snap.Throughput.RequestsTotal != 4000 {
		t.Errorf("totals = %+v", snap.Throughput)
	}
}

func TestNilClock(t *testing.T) {
	s := NewStats(nil)
	s.ObserveTokens(1)
	if s.Snapshot().Timestamp == 0 {
		t.Error("timestamp")
	}
}

func BenchmarkObserveTokens(b *testing.B) {
	s := NewStats(time.Now)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s.ObserveTokens(1)
		}
	})
}
