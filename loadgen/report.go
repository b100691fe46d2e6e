package loadgen

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
)

// Label returns the name to print for r: r.Name, else the engine and URL.
func (r *Result) Label() string {
	if r.Name != "" {
		return r.Name
	}
	if r.Run.URL != "" {
		return r.Run.URL
	}
	if r.Run.Engine != "" {
		return r.Run.Engine
	}
	return "result"
}

// metric describes one of the four summarised quantities.
type metric struct {
	title  string
	unit   string
	higher bool // higher is better (throughput)
	get    func(*Result) Summary
}

var metrics = []metric{
	{"Response Time", "ms", false, func(r *Result) Summary { return r.ResponseMS }},
	{"Time To First Token (TTFT)", "ms", false, func(r *Result) Summary { return r.TTFTMS }},
	{"Throughput (tokens/sec per request)", "tok/s", true, func(r *Result) Summary { return r.ReqTokPerS }},
	{"Inter-token Gap", "ms", false, func(r *Result) Summary { return r.ITLMS }},
}

var rowNames = []string{"Mean", "Median", "P95", "P99", "Min", "Max", "Std Dev"}

func summaryRows(s Summary) []float64 {
	return []float64{s.Mean, s.Median, s.P95, s.P99, s.Min, s.Max, s.StdDev}
}

func fmtVal(v float64, unit string) string { return fmt.Sprintf("%.2f %s", v, unit) }

// commas formats n with thousands separators (2,500).
func commas(n int) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func successRate(r *Result) string {
	n := r.Completed + r.Errors
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.4g%% (%d/%d)", 100*float64(r.Completed)/float64(n), r.Completed, n)
}

// describe returns a one-line description of how r was run.
func describe(r *Result) string {
	ri := r.Run
	parts := []string{ri.Engine}
	if ri.Endpoint != "" {
		parts = append(parts, ri.Endpoint)
	}
	if ri.Model != "" {
		parts = append(parts, "model "+ri.Model)
	}
	parts = append(parts,
		fmt.Sprintf("concurrency %d", ri.Concurrency),
		fmt.Sprintf("%d requests", ri.Requests),
		fmt.Sprintf("max_tokens %d", ri.MaxTokens),
		fmt.Sprintf("temperature %g", ri.Temperature))
	if ri.Seed != nil {
		parts = append(parts, fmt.Sprintf("seed %d", *ri.Seed))
	}
	if ri.IgnoreEOS {
		parts = append(parts, "ignore_eos")
	}
	if len(ri.ResponseFormat) > 0 {
		parts = append(parts, "response_format "+string(ri.ResponseFormat))
	}
	return strings.Join(parts, " · ")
}

func errorsLine(r *Result) string {
	if r.Errors == 0 {
		return "0"
	}
	keys := make([]string, 0, len(r.ErrorsByStatus))
	for k := range r.ErrorsByStatus {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s×%d", k, r.ErrorsByStatus[k]))
	}
	return fmt.Sprintf("%d (%s)", r.Errors, strings.Join(parts, ", "))
}

// WriteTable prints r as markdown in the style of kr-serve-mlx's performance
// report: one table of the summaries (Mean, Median, P95, P99, Min, Max,
// Std Dev) of response time, TTFT, per-request tok/s and inter-token gap,
// then the run totals.
func (r *Result) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "## %s\n\n", r.Label())
	fmt.Fprintf(w, "%s\n\n", describe(r))
	fmt.Fprintln(w, "| Metric | Response Time | TTFT | Throughput | Inter-token Gap |")
	fmt.Fprintln(w, "|--------|---------------|------|------------|-----------------|")
	rows := make([][]float64, len(metrics))
	for i, m := range metrics {
		rows[i] = summaryRows(m.get(r))
	}
	for j, name := range rowNames {
		fmt.Fprintf(w, "| **%s** | %s | %s | %s | %s |\n", name,
			fmtVal(rows[0][j], "ms"), fmtVal(rows[1][j], "ms"),
			fmtVal(rows[2][j], "tok/s"), fmtVal(rows[3][j], "ms"))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| Total Time | Success Rate | Errors | Tokens Generated | Aggregate tok/s | Requests/s |")
	fmt.Fprintln(w, "|------------|--------------|--------|------------------|-----------------|------------|")
	fmt.Fprintf(w, "| %.2f s | %s | %s | %s | %.2f | %.2f |\n\n",
		r.WallMS/1000, successRate(r), errorsLine(r), commas(r.TotalTokens), r.TokPerS, r.ReqPerS)
	if r.ServerCPUS > 0 {
		fmt.Fprintf(w, "Server CPU (its process_cpu_seconds_total, workers excluded): %.2f s, %s per request\n\n",
			r.ServerCPUS, fmtCPU(r.ServerCPUUSPerReq))
	}
}

// ratio returns the "Speedup" column: how much better the candidate is
// (>1 better): baseline/candidate for times, candidate/baseline for rates.
func ratio(base, cand float64, higher bool) string {
	num, den := base, cand
	if higher {
		num, den = cand, base
	}
	if den == 0 || math.IsNaN(num/den) || math.IsInf(num/den, 0) {
		return "-"
	}
	return fmt.Sprintf("%.3fx", num/den)
}

// overhead returns (candidate-baseline)/baseline in percent, signed.
func overhead(base, cand float64) string {
	if base == 0 {
		return "-"
	}
	return fmt.Sprintf("%+.1f%%", 100*(cand-base)/base)
}

// Compare prints candidate against baseline side by side, one table per
// metric as in kr-serve-mlx's report (| Metric | candidate | baseline |
// Speedup | Overhead |), then the totals. names gives the labels
// {baseline, candidate}; an empty name falls back to Result.Label.
// Speedup >1 means the candidate is better; Overhead is the signed relative
// difference (candidate-baseline)/baseline.
func Compare(w io.Writer, baseline, candidate *Result, names [2]string) {
	bn, cn := names[0], names[1]
	if bn == "" {
		bn = baseline.Label()
	}
	if cn == "" {
		cn = candidate.Label()
	}
	if bn == cn {
		bn += " (baseline)"
	}
	fmt.Fprintf(w, "## %s vs %s\n\n", cn, bn)
	fmt.Fprintf(w, "- candidate: %s\n- baseline: %s\n\n", describe(candidate), describe(baseline))
	for _, m := range metrics {
		b, c := summaryRows(m.get(baseline)), summaryRows(m.get(candidate))
		fmt.Fprintf(w, "### %s\n\n", m.title)
		fmt.Fprintf(w, "| Metric | %s | %s | Speedup | Overhead |\n", cn, bn)
		fmt.Fprintln(w, "|--------|---|---|---------|----------|")
		for j, name := range rowNames {
			sp := ratio(b[j], c[j], m.higher)
			if name == "Std Dev" {
				sp = "-"
			}
			fmt.Fprintf(w, "| **%s** | %s | %s | %s | %s |\n", name,
				fmtVal(c[j], m.unit), fmtVal(b[j], m.unit), sp, overhead(b[j], c[j]))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "### Total Execution Time")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| Engine | Total Time | Success Rate | Tokens Generated | Aggregate tok/s | Requests/s |")
	fmt.Fprintln(w, "|--------|------------|--------------|------------------|-----------------|------------|")
	for _, x := range []struct {
		n string
		r *Result
	}{{cn, candidate}, {bn, baseline}} {
		fmt.Fprintf(w, "| %s | %.2f s | %s | %s | %.2f | %.2f |\n", x.n,
			x.r.WallMS/1000, successRate(x.r), commas(x.r.TotalTokens), x.r.TokPerS, x.r.ReqPerS)
	}
	dTok := candidate.TotalTokens - baseline.TotalTokens
	fmt.Fprintf(w, "| **Difference** | **%+.2f s** | **%+d** | **%s** | **%s** | **%s** |\n",
		(candidate.WallMS-baseline.WallMS)/1000, candidate.Completed-baseline.Completed,
		signedCommas(dTok), overhead(baseline.TokPerS, candidate.TokPerS), overhead(baseline.ReqPerS, candidate.ReqPerS))
	fmt.Fprintf(w, "| **Speedup** | **%s** | - | - | **%s** | **%s** |\n\n",
		ratio(baseline.WallMS, candidate.WallMS, false),
		ratio(baseline.TokPerS, candidate.TokPerS, true), ratio(baseline.ReqPerS, candidate.ReqPerS, true))
}

func signedCommas(n int) string {
	if n >= 0 {
		return "+" + commas(n)
	}
	return commas(n)
}

// ReadResult loads a Result from a JSON file written by WriteJSON (or by
// scripts/bench/inprocess.py).
func ReadResult(path string) (*Result, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if r.Schema != SchemaVersion {
		return nil, fmt.Errorf("%s: schema %q, want %q", path, r.Schema, SchemaVersion)
	}
	return &r, nil
}

// WriteJSON writes r as indented JSON to path.
func (r *Result) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
