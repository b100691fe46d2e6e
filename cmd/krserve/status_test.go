package main

import (
	"strings"
	"testing"
)

// printStatus shows the prompt cache: hit tokens and rate, bytes, budget (as
// each worker's hello advertised it) and evictions per worker (from /stats),
// and "off" for a ready worker without a cache.
func TestPrintStatusPromptCache(t *testing.T) {
	doc := `{"uptime_s": 12, "model": {"model": "m", "context_length": 2048},
	  "server": {"latency": {}, "ttft": {}, "throughput": {"tokens_per_second": {}, "requests_per_second": {}},
	    "prefix_cache": {"queried_tokens": 4000, "hit_tokens": 3000, "hit_rate": 0.75}},
	  "scheduler": {"autotune": {"b": 32}},
	  "workers": [{"slot": 0, "state": "ready", "pid": 42, "healthy": true, "rss_bytes": 104857600,
	    "prompt_cache_bytes": 52428800, "prompt_cache_evictions": 7, "prompt_cache_budget_bytes": 3221225472},
	    {"slot": 1, "state": "ready", "pid": 43, "healthy": true, "rss_bytes": 104857600},
	    {"slot": 2, "state": "starting", "pid": 44}]}`
	var b strings.Builder
	if err := printStatus(&b, []byte(doc)); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"3000 of 4000 prompt tokens from the prompt cache (hit rate 75.0%)", "PROMPT CACHE", "50 MiB of 3.0 GiB (7 evicted)"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	for _, row := range [][]string{{"1", "ready", "off"}, {"2", "starting", "-"}} {
		found := false
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) >= 10 && f[0] == row[0] && f[1] == row[1] && f[len(f)-2] == row[2] {
				found = true
			}
		}
		if !found {
			t.Errorf("no row of worker %s %s with prompt cache %q in:\n%s", row[0], row[1], row[2], out)
		}
	}
}

// A worker that is a group of ranks shows one line per rank under its own.
func TestStatusShowsRanks(t *testing.T) {
	body := `{"uptime_s": 5, "model": {"model": "/m", "context_length": 2048},
	  "workers": [{"slot": 0, "state": "ready", "pid": 101, "healthy": true, "rss_bytes": 1048576,
	    "ranks": [{"rank": 0, "pid": 101, "alive": true, "state": "sleeping", "rss_bytes": 1048576},
	              {"rank": 1, "pid": 102, "alive": true, "state": "stopped", "rss_bytes": 2097152},
	              {"rank": 2, "pid": 103, "alive": true, "state": "sleeping", "host": "mac2"}]}]}`
	var b strings.Builder
	if err := printStatus(&b, []byte(body)); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"rank 0  alive (sleeping)  101", "rank 1  alive (stopped)   102", "2 MiB", "rank 2  alive (sleeping)  103", "on mac2"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}

// The routing line says when a cache-aware policy routes by load because no
// worker has a prompt cache (every budget came out 0, say).
func TestStatusRouting(t *testing.T) {
	for _, c := range []struct{ sched, want string }{
		{`{"routing": "cache-aware", "routing_by_cache": true}`, "routing cache-aware\n"},
		{`{"routing": "cache-aware", "routing_by_cache": false}`, "routing cache-aware (by load: no worker has a prompt cache)\n"},
		{`{"routing": "least-loaded"}`, "routing least-loaded\n"},
	} {
		doc := `{"server": {"latency": {}, "ttft": {}, "throughput": {"tokens_per_second": {}, "requests_per_second": {}}},
		  "scheduler": ` + c.sched + `, "workers": []}`
		var b strings.Builder
		if err := printStatus(&b, []byte(doc)); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(b.String(), c.want) {
			t.Errorf("%s: no %q in:\n%s", c.sched, c.want, b.String())
		}
	}
}
