package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// serverCPU reads the server's process_cpu_seconds_total from base/metrics
// (krserve exports it; a server that does not gives ok false). It is the
// supervisor's own CPU: worker processes are separate processes.
func serverCPU(ctx context.Context, client *http.Client, base string) (seconds float64, ok bool) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(base, "/")+"/metrics", nil)
	if err != nil {
		return 0, false
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, false
	}
	return parseCPUSeconds(bufio.NewScanner(resp.Body))
}

// parseCPUSeconds finds process_cpu_seconds_total in a Prometheus text
// exposition.
func parseCPUSeconds(sc *bufio.Scanner) (float64, bool) {
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		rest, found := strings.CutPrefix(sc.Text(), "process_cpu_seconds_total")
		if !found || rest == "" {
			continue
		}
		switch rest[0] {
		case '{':
			i := strings.IndexByte(rest, '}')
			if i < 0 {
				return 0, false
			}
			rest = rest[i+1:]
		case ' ':
		default:
			continue // another metric with this prefix
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false
		}
		v, err := strconv.ParseFloat(f[0], 64)
		return v, err == nil
	}
	return 0, false
}

// fmtCPU formats microseconds of server CPU per request.
func fmtCPU(us float64) string { return fmt.Sprintf("%.0f µs", us) }
