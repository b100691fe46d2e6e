package main

import (
	"strings"
	"testing"
)

// A worker that is a group of ranks shows one line per rank under its own.
func TestStatusShowsRanks(t *testing.T) {
	body := `{"uptime_s": 5, "model": {"model": "/m", "context_length": 2048},
	  "workers": [{"slot": 0, "state": "ready", "pid": 101, "healthy": true, "rss_bytes": 1048576,
	    "ranks": [{"rank": 0, "pid": 101, "alive": true, "state": "sleeping", "rss_bytes": 1048576},
	              {"rank": 1, "pid": 102, "alive": true, "state": "stopped", "rss_bytes": 2097152}]}]}`
	var b strings.Builder
	if err := printStatus(&b, []byte(body)); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"rank 0  alive (sleeping)  101", "rank 1  alive (stopped)   102", "2 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}
