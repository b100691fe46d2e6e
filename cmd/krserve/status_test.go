package main

import (
	"strings"
	"testing"
)

// printStatus shows the prompt cache: hit tokens and rate, bytes and
// evictions per worker (from /stats).
func TestPrintStatusPromptCache(t *testing.T) {
	doc := `{"uptime_s": 12, "model": {"model": "m", "context_length": 2048},
	  "server": {"latency": {}, "ttft": {}, "throughput": {"tokens_per_second": {}, "requests_per_second": {}},
	    "prefix_cache": {"queried_tokens": 4000, "hit_tokens": 3000, "hit_rate": 0.75}},
	  "scheduler": {"autotune": {"b": 32}},
	  "workers": [{"slot": 0, "state": "ready", "pid": 42, "healthy": true, "rss_bytes": 104857600,
	    "prompt_cache_bytes": 52428800, "prompt_cache_evictions": 7}]}`
	var b strings.Builder
	if err := printStatus(&b, []byte(doc)); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"3000 of 4000 prompt tokens from the prompt cache (hit rate 75.0%)", "PROMPT CACHE", "50 MiB (7 evicted)"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
}
