package loadgen

import (
	"bufio"
	"strings"
	"testing"
)

func TestParseCPUSeconds(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       float64
		ok         bool
	}{
		{"plain", "# HELP x\nprocess_cpu_seconds_total 12.5\n", 12.5, true},
		{"labelled", `process_cpu_seconds_total{model="m"} 3.25` + "\n", 3.25, true},
		{"prefix of another metric", "process_cpu_seconds_totalx 9\nprocess_cpu_seconds_total 1e-2\n", 0.01, true},
		{"absent", "go_goroutines 12\n", 0, false},
		{"garbage value", "process_cpu_seconds_total abc\n", 0, false},
		{"unclosed labels", "process_cpu_seconds_total{model=\"m\" 3\n", 0, false},
	} {
		got, ok := parseCPUSeconds(bufio.NewScanner(strings.NewReader(tc.text)))
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: got %v, %v; want %v, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}
