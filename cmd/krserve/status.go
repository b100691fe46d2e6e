package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/krserve/krserve/scheduler"
)

func newStatusCmd() *cobra.Command {
	var url, apiKey string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a running server's workers, queue, batch size, latency and throughput",
		RunE: func(cmd *cobra.Command, args []string) error {
			if apiKey == "" {
				apiKey = os.Getenv("KRSERVE_API_KEY")
			}
			req, err := http.NewRequestWithContext(cmd.Context(), "GET", strings.TrimRight(url, "/")+"/stats", nil)
			if err != nil {
				return err
			}
			if apiKey != "" {
				req.Header.Set("Authorization", "Bearer "+apiKey)
			}
			client := &http.Client{Timeout: 10 * time.Second}
			resp, err := client.Do(req)
			if err != nil {
				return fmt.Errorf("reading %s/stats: %w (is `krserve up` running?)", url, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return err
			}
			if resp.StatusCode != 200 {
				return fmt.Errorf("%s/stats answered %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
			}
			if asJSON {
				_, err := os.Stdout.Write(body)
				return err
			}
			return printStatus(os.Stdout, body)
		},
	}
	cmd.Flags().StringVar(&url, "url", "http://127.0.0.1:8080", "server base URL")
	cmd.Flags().StringVar(&apiKey, "api-key", "", "bearer token, if the server protects /stats (default $KRSERVE_API_KEY)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the raw /stats document")
	return cmd
}

type statusDoc struct {
	UptimeS float64 `json:"uptime_s"`
	Model   *struct {
		Model   string `json:"model"`
		Context int    `json:"context_length"`
	} `json:"model"`
	Server struct {
		Latency    map[string]float64 `json:"latency"`
		TTFT       map[string]float64 `json:"ttft"`
		Throughput struct {
			Tokens   map[string]float64 `json:"tokens_per_second"`
			Requests map[string]float64 `json:"requests_per_second"`
		} `json:"throughput"`
		Batch       map[string]any `json:"batch"`
		PrefixCache struct {
			Queried int64   `json:"queried_tokens"`
			Hits    int64   `json:"hit_tokens"`
			Rate    float64 `json:"hit_rate"`
		} `json:"prefix_cache"`
	} `json:"server"`
	Scheduler struct {
		QueueRequests int    `json:"queue_requests"`
		QueueTokens   int    `json:"queue_prompt_tokens"`
		Running       int    `json:"running"`
		Draining      bool   `json:"draining"`
		Suspects      int    `json:"suspects_waiting"`
		OnProbation   int    `json:"on_probation"`
		Poisoned      int    `json:"poisoned"`
		LastPoison    string `json:"last_poison"`
		Routing       string `json:"routing"`
		RoutingCache  bool   `json:"routing_by_cache"`
		AutoTune      struct {
			Enabled bool    `json:"enabled"`
			B       int     `json:"b"`
			EMA     float64 `json:"ema_ms"`
			P99     float64 `json:"p99_ms"`
			Target  float64 `json:"target_ms"`
		} `json:"autotune"`
	} `json:"scheduler"`
	Workers []struct {
		Slot     int     `json:"slot"`
		State    string  `json:"state"`
		PID      int     `json:"pid"`
		Uptime   float64 `json:"uptime_seconds"`
		Served   int     `json:"requests_served"`
		Inflight int     `json:"requests_in_flight"`
		Restarts int     `json:"restarts"`
		RSS      int64   `json:"rss_bytes"`
		Cache    int64   `json:"prompt_cache_bytes"`
		Evicted  int64   `json:"prompt_cache_evictions"`
		Budget   int64   `json:"prompt_cache_budget_bytes"`
		Healthy  bool    `json:"healthy"`
		Failure  string  `json:"failure"`
		LastExit *struct {
			Signal string    `json:"signal"`
			Code   int       `json:"code"`
			Reason string    `json:"reason"`
			At     time.Time `json:"at"`
		} `json:"last_exit"`
		Ranks []struct {
			Rank  int    `json:"rank"`
			PID   int    `json:"pid"`
			Alive bool   `json:"alive"`
			State string `json:"state"`
			RSS   int64  `json:"rss_bytes"`
			Host  string `json:"host"`
		} `json:"ranks"`
	} `json:"workers"`
}

func printStatus(w io.Writer, body []byte) error {
	var several struct {
		Server json.RawMessage            `json:"server"`
		Models map[string]json.RawMessage `json:"models"`
	}
	if json.Unmarshal(body, &several) == nil && several.Server == nil && len(several.Models) > 0 {
		// Several models: one section each (krserve ps has the overview).
		names := make([]string, 0, len(several.Models))
		for n := range several.Models {
			names = append(names, n)
		}
		sort.Strings(names)
		for i, n := range names {
			if i > 0 {
				fmt.Fprintln(w)
			}
			var st struct {
				State string `json:"state"`
			}
			_ = json.Unmarshal(several.Models[n], &st)
			fmt.Fprintf(w, "== %s (%s)\n", n, st.State)
			if err := printStatus(w, several.Models[n]); err != nil {
				return err
			}
		}
		return nil
	}
	var d statusDoc
	if err := json.Unmarshal(body, &d); err != nil {
		return fmt.Errorf("parsing /stats: %w", err)
	}
	model := "(loading)"
	if d.Model != nil {
		model = fmt.Sprintf("%s (context %d)", d.Model.Model, d.Model.Context)
	}
	fmt.Fprintf(w, "model    %s\nuptime   %s\n", model, (time.Duration(d.UptimeS) * time.Second).String())
	s := d.Scheduler
	state := "serving"
	if s.Draining {
		state = "draining"
	}
	fmt.Fprintf(w, "state    %s    queue %d requests / %d tokens    running %d\n", state, s.QueueRequests, s.QueueTokens, s.Running)
	tune := "off"
	if s.AutoTune.Enabled {
		tune = fmt.Sprintf("on (target %.0f ms, P99 %.1f ms, EMA %.1f ms)", s.AutoTune.Target, s.AutoTune.P99, s.AutoTune.EMA)
	}
	routing := s.Routing
	if routing == scheduler.RoutingCacheAware && !s.RoutingCache {
		routing += " (by load: no worker has a prompt cache)"
	}
	fmt.Fprintf(w, "batch    B=%d    auto-tune %s    routing %s\n", s.AutoTune.B, tune, routing)
	fmt.Fprintf(w, "crashes  suspects waiting %d    on probation %d    declared poison %d\n", s.Suspects, s.OnProbation, s.Poisoned)
	if s.LastPoison != "" {
		fmt.Fprintf(w, "         last poison: %s\n", s.LastPoison)
	}
	l, t := d.Server.Latency, d.Server.TTFT
	fmt.Fprintf(w, "latency  p50 %.1f ms  p95 %.1f ms  p99 %.1f ms  (n=%.0f)\n", l["p50"], l["p95"], l["p99"], l["count"])
	fmt.Fprintf(w, "ttft     p50 %.1f ms  p95 %.1f ms  p99 %.1f ms\n", t["p50"], t["p95"], t["p99"])
	keys := func(m map[string]float64) string {
		var ks []string
		for k := range m {
			ks = append(ks, k)
		}
		sort.Slice(ks, func(i, j int) bool { return len(ks[i]) < len(ks[j]) || (len(ks[i]) == len(ks[j]) && ks[i] < ks[j]) })
		var parts []string
		for _, k := range ks {
			parts = append(parts, fmt.Sprintf("%s %.1f", k, m[k]))
		}
		return strings.Join(parts, "  ")
	}
	fmt.Fprintf(w, "tok/s    %s\nreq/s    %s\n", keys(d.Server.Throughput.Tokens), keys(d.Server.Throughput.Requests))
	pc := d.Server.PrefixCache
	fmt.Fprintf(w, "cache    %d of %d prompt tokens from the prompt cache (hit rate %.1f%%)\n\n", pc.Hits, pc.Queried, 100*pc.Rate)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKER\tSTATE\tPID\tUPTIME\tSERVED\tIN FLIGHT\tRESTARTS\tRSS\tPROMPT CACHE\tLAST EXIT")
	for _, wk := range d.Workers {
		last := "-"
		if wk.LastExit != nil {
			how := wk.LastExit.Signal
			if how == "" {
				how = fmt.Sprintf("status %d", wk.LastExit.Code)
			}
			last = fmt.Sprintf("%s (%s) %s ago", how, wk.LastExit.Reason, time.Since(wk.LastExit.At).Round(time.Second))
		}
		st := wk.State
		if !wk.Healthy && (st == "ready" || st == "draining") {
			st += " (unhealthy)"
		}
		if wk.Failure != "" {
			st += ": " + wk.Failure
		}
		cache := "-" // no hello yet
		switch {
		case wk.Budget > 0: // the budget the worker's hello advertised
			cache = fmt.Sprintf("%.0f MiB of %s (%d evicted)", float64(wk.Cache)/(1<<20), gib(wk.Budget), wk.Evicted)
		case wk.State == "ready" || wk.State == "draining":
			cache = "off"
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%d\t%d\t%d\t%.0f MiB\t%s\t%s\n", wk.Slot, st, wk.PID,
			(time.Duration(wk.Uptime) * time.Second).String(), wk.Served, wk.Inflight, wk.Restarts, float64(wk.RSS)/(1<<20),
			cache, last)
		for _, r := range wk.Ranks { // a worker that is a group of ranks (--group-size)
			alive := "alive"
			if !r.Alive {
				alive = "dead"
			}
			if r.State != "" {
				alive += " (" + r.State + ")"
			}
			if r.Host != "" { // over ssh: the pid and state are its ssh's, its memory is on that host
				fmt.Fprintf(tw, "  rank %d\t%s\t%d\t\t\t\t\ton %s\t\t\n", r.Rank, alive, r.PID, r.Host)
				continue
			}
			fmt.Fprintf(tw, "  rank %d\t%s\t%d\t\t\t\t\t%.0f MiB\t\t\n", r.Rank, alive, r.PID, float64(r.RSS)/(1<<20))
		}
	}
	return tw.Flush()
}
