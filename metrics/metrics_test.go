package metrics

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

var testModel = ModelInfo{Model: "mlx-community/Qwen3-8B-4bit", Quantization: "4bit", ContextLength: 32768}
var testBuild = BuildInfo{Version: "0.1.0", GoVersion: "go1.26.8", MLXVersion: "0.32.0", MLXLMVersion: "0.28.0"}

// wantFamilies is every krserve_ family and its type.
var wantFamilies = map[string]dto.MetricType{
	"krserve_num_requests_running":          dto.MetricType_GAUGE,
	"krserve_num_requests_waiting":          dto.MetricType_GAUGE,
	"krserve_request_success_total":         dto.MetricType_COUNTER,
	"krserve_request_failure_total":         dto.MetricType_COUNTER,
	"krserve_admission_rejections_total":    dto.MetricType_COUNTER,
	"krserve_time_to_first_token_seconds":   dto.MetricType_HISTOGRAM,
	"krserve_inter_token_latency_seconds":   dto.MetricType_HISTOGRAM,
	"krserve_e2e_request_latency_seconds":   dto.MetricType_HISTOGRAM,
	"krserve_request_queue_time_seconds":    dto.MetricType_HISTOGRAM,
	"krserve_request_prefill_time_seconds":  dto.MetricType_HISTOGRAM,
	"krserve_request_decode_time_seconds":   dto.MetricType_HISTOGRAM,
	"krserve_prompt_tokens_total":           dto.MetricType_COUNTER,
	"krserve_generation_tokens_total":       dto.MetricType_COUNTER,
	"krserve_request_prompt_tokens":         dto.MetricType_HISTOGRAM,
	"krserve_request_generation_tokens":     dto.MetricType_HISTOGRAM,
	"krserve_prefix_cache_queries_total":    dto.MetricType_COUNTER,
	"krserve_prefix_cache_hits_total":       dto.MetricType_COUNTER,
	"krserve_prefix_cache_evictions_total":  dto.MetricType_COUNTER,
	"krserve_prompt_cache_bytes":            dto.MetricType_GAUGE,
	"krserve_prompt_cache_budget_bytes":     dto.MetricType_GAUGE,
	"krserve_batch_size":                    dto.MetricType_GAUGE,
	"krserve_batch_target_size":             dto.MetricType_GAUGE,
	"krserve_batch_window_wait_seconds":     dto.MetricType_HISTOGRAM,
	"krserve_batch_dispatched_requests":     dto.MetricType_HISTOGRAM,
	"krserve_autotune_adjustments_total":    dto.MetricType_COUNTER,
	"krserve_latency_target_seconds":        dto.MetricType_GAUGE,
	"krserve_worker_up":                     dto.MetricType_GAUGE,
	"krserve_worker_restarts_total":         dto.MetricType_COUNTER,
	"krserve_worker_exits_total":            dto.MetricType_COUNTER,
	"krserve_worker_start_duration_seconds": dto.MetricType_HISTOGRAM,
	"krserve_worker_memory_bytes":           dto.MetricType_GAUGE,
	"krserve_worker_rank_up":                dto.MetricType_GAUGE,
	"krserve_worker_rank_memory_bytes":      dto.MetricType_GAUGE,
	"krserve_requests_retried_total":        dto.MetricType_COUNTER,
	"krserve_requests_resumed_total":        dto.MetricType_COUNTER,
	"krserve_requests_suspected_total":      dto.MetricType_COUNTER,
	"krserve_probations_total":              dto.MetricType_COUNTER,
	"krserve_requests_on_probation":         dto.MetricType_GAUGE,
	"krserve_requests_poisoned_total":       dto.MetricType_COUNTER,
	"krserve_routing_decisions_total":       dto.MetricType_COUNTER,
	"krserve_routing_mispredictions_total":  dto.MetricType_COUNTER,
	"krserve_requests_lost_total":           dto.MetricType_COUNTER,
	"krserve_client_disconnects_total":      dto.MetricType_COUNTER,
	"krserve_ipc_roundtrip_seconds":         dto.MetricType_HISTOGRAM,
	"krserve_build_info":                    dto.MetricType_GAUGE,
	"krserve_model_info":                    dto.MetricType_GAUGE,
}

// touch gives every vector a child so that each family appears in a scrape.
func touch(m *Metrics) {
	m.BatchSize.WithLabelValues("0").Set(3)
	m.WorkerUp.WithLabelValues("0").Set(1)
	m.WorkerMemory.WithLabelValues("0", "rss").Set(1 << 30)
	m.PromptCacheBytes.WithLabelValues("0").Set(1 << 20)
	m.PromptCacheBudget.WithLabelValues("0").Set(1 << 30)
	m.WorkerRankUp.WithLabelValues("0", "1").Set(1)
	m.WorkerRankMemory.WithLabelValues("0", "1").Set(1 << 29)
	m.WorkerExits.WithLabelValues("SIGSEGV", "").Inc()
	m.TTFT.Observe(0.0123)
	m.GenerationTokens.Add(5)
}

// scrape fetches Handler() output in the text format and parses it.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL, nil)
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, body)
	}
	return fams
}

func label(m *dto.Metric, name string) (string, bool) {
	for _, lp := range m.GetLabel() {
		if lp.GetName() == name {
			return lp.GetValue(), true
		}
	}
	return "", false
}

func TestScrapeNamesAndTypes(t *testing.T) {
	m := New(testModel, testBuild)
	touch(m)
	fams := scrape(t, m)
	for name, typ := range wantFamilies {
		f, ok := fams[name]
		if !ok {
			t.Errorf("%s missing from scrape", name)
			continue
		}
		if f.GetType() != typ {
			t.Errorf("%s: type %v, want %v", name, f.GetType(), typ)
		}
		if f.GetHelp() == "" {
			t.Errorf("%s: no help", name)
		}
	}
	for name := range fams {
		if strings.HasPrefix(name, "krserve_") {
			if _, ok := wantFamilies[name]; !ok {
				t.Errorf("unexpected family %s", name)
			}
		}
	}
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "promhttp_metric_handler_requests_total"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("%s missing (go/process/promhttp collectors)", name)
		}
	}
}

func TestModelLabelEverywhere(t *testing.T) {
	m := New(testModel, testBuild)
	touch(m)
	fams := scrape(t, m)
	n := 0
	for name, f := range fams {
		for _, s := range f.GetMetric() {
			v, ok := label(s, "model")
			if !ok || v != testModel.Model {
				t.Errorf("%s: model label %q (present %v)", name, v, ok)
			}
			n++
		}
	}
	if n < len(wantFamilies) {
		t.Fatalf("only %d series", n)
	}
}

func TestInfoAndPreinitialisedLabels(t *testing.T) {
	m := New(testModel, BuildInfo{Version: "0.1.0", MLXVersion: "0.32.0", MLXLMVersion: "0.28.0"})
	fams := scrape(t, m)

	bi := fams["krserve_build_info"].GetMetric()[0]
	if bi.GetGauge().GetValue() != 1 {
		t.Errorf("build_info = %v", bi.GetGauge().GetValue())
	}
	for k, want := range map[string]string{"version": "0.1.0", "mlx_version": "0.32.0", "mlx_lm_version": "0.28.0"} {
		if v, _ := label(bi, k); v != want {
			t.Errorf("build_info %s=%q, want %q", k, v, want)
		}
	}
	if v, _ := label(bi, "go_version"); !strings.HasPrefix(v, "go") {
		t.Errorf("build_info go_version=%q, want runtime.Version()", v)
	}
	mi := fams["krserve_model_info"].GetMetric()[0]
	if v, _ := label(mi, "quantization"); v != "4bit" {
		t.Errorf("quantization=%q", v)
	}
	if v, _ := label(mi, "context_length"); v != "32768" {
		t.Errorf("context_length=%q", v)
	}

	want := map[string]struct {
		label  string
		values []string
	}{
		"krserve_request_success_total":      {"finished_reason", FinishedReasons},
		"krserve_request_failure_total":      {"reason", FailureReasons},
		"krserve_admission_rejections_total": {"reason", AdmissionRejectReasons},
		"krserve_autotune_adjustments_total": {"direction", AutotuneDirections},
		"krserve_worker_restarts_total":      {"reason", RestartReasons},
	}
	for name, w := range want {
		got := map[string]bool{}
		for _, s := range fams[name].GetMetric() {
			v, _ := label(s, w.label)
			got[v] = true
			if s.GetCounter().GetValue() != 0 {
				t.Errorf("%s{%s=%q} = %v, want 0", name, w.label, v, s.GetCounter().GetValue())
			}
		}
		for _, v := range w.values {
			if !got[v] {
				t.Errorf("%s{%s=%q} not pre-initialised", name, w.label, v)
			}
		}
	}
}

func TestLint(t *testing.T) {
	m := New(testModel, testBuild)
	touch(m)
	m.Handler() // registers the promhttp_* series too
	problems, err := testutil.GatherAndLint(m.Registry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

func TestBuckets(t *testing.T) {
	for name, b := range map[string][]float64{
		"latency": latencyBuckets, "per-token": perTokenBuckets, "window": windowBuckets,
		"ipc": ipcBuckets, "start": startBuckets, "dispatch": dispatchBuckets,
		"tokens": tokenBuckets(32768), "tokens-default": tokenBuckets(0),
	} {
		for i := 1; i < len(b); i++ {
			if b[i] <= b[i-1] {
				t.Errorf("%s buckets not increasing at %d: %v", name, i, b)
			}
		}
	}
	// 1 ms resolution at the low end.
	for _, b := range [][]float64{latencyBuckets, perTokenBuckets} {
		for _, edge := range []float64{0.001, 0.002, 0.003} {
			found := false
			for _, v := range b {
				found = found || v == edge
			}
			if !found {
				t.Errorf("bucket edge %v missing from %v", edge, b)
			}
		}
	}
	if latencyBuckets[len(latencyBuckets)-1] != 60 || perTokenBuckets[len(perTokenBuckets)-1] != 2.5 {
		t.Error("top buckets wrong")
	}
	if b := tokenBuckets(32768); b[len(b)-1] != 50000 || b[len(b)-2] != 20000 {
		t.Errorf("tokenBuckets(32768) = %v", b)
	}
}

func TestIndependentRegistries(t *testing.T) {
	// Two instances (and a handler each) must not collide, and nothing may
	// land in the global registry.
	a := New(testModel, testBuild)
	b := New(ModelInfo{Model: "other"}, testBuild)
	a.Handler()
	a.Handler()
	b.Handler()
	a.GenerationTokens.Add(2)
	if testutil.ToFloat64(b.GenerationTokens) != 0 {
		t.Error("instances share a counter")
	}
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "krserve_") {
			t.Errorf("%s registered globally", f.GetName())
		}
	}
}

func TestConcurrentUseAndScrape(t *testing.T) {
	m := New(testModel, testBuild)
	h := m.Handler()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				m.GenerationTokens.Inc()
				m.InterTokenLatency.Observe(0.02)
				m.BatchSize.WithLabelValues("1").Set(float64(j))
			}
		}()
	}
	for i := 0; i < 5; i++ {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		if rec.Code != 200 {
			t.Fatalf("scrape status %d", rec.Code)
		}
	}
	wg.Wait()
	if got := testutil.ToFloat64(m.GenerationTokens); got != 1600 {
		t.Errorf("generation tokens = %v", got)
	}
}

// TestSeveralModelsOnOneRegistry: ForModel and Models put every model's
// instruments and the model layer's on one registry: one scrape, a model
// label on everything but the server-wide budget, and promtool's lint clean.
func TestSeveralModelsOnOneRegistry(t *testing.T) {
	m := New(ModelInfo{Model: "small"}, testBuild)
	big := m.ForModel(ModelInfo{Model: "big"}, testBuild)
	touch(m)
	touch(big)
	big.TTFT.Observe(1)
	set := m.Models([]string{"small", "big"}, []string{"unloaded", "loading", "ready", "draining", "failed"},
		[]string{"ok", "failed", "timeout"}, []string{"ttl", "keep_alive", "room", "api"})
	set.SetState("small", "ready")
	set.SetState("big", "loading")
	set.SetState("big", "ready")
	set.Loads.WithLabelValues("big", "ok").Inc()
	set.LoadDuration.WithLabelValues("big").Observe(2.5)
	set.Memory.WithLabelValues("big", "estimated").Set(1 << 30)
	set.Budget.Set(8 << 30)
	fams := scrape(t, big) // a model's Handler serves the shared registry
	ttft := fams["krserve_time_to_first_token_seconds"]
	if ttft == nil || len(ttft.GetMetric()) != 2 {
		t.Fatalf("want TTFT of both models, got %v", ttft)
	}
	for name, typ := range map[string]dto.MetricType{
		"krserve_model_state": dto.MetricType_GAUGE, "krserve_model_loads_total": dto.MetricType_COUNTER,
		"krserve_model_evictions_total": dto.MetricType_COUNTER, "krserve_model_load_duration_seconds": dto.MetricType_HISTOGRAM,
		"krserve_model_memory_bytes": dto.MetricType_GAUGE, "krserve_memory_budget_bytes": dto.MetricType_GAUGE,
	} {
		f := fams[name]
		if f == nil || f.GetType() != typ || f.GetHelp() == "" {
			t.Errorf("%s: %v", name, f)
		}
	}
	states := map[string]float64{}
	for _, s := range fams["krserve_model_state"].GetMetric() {
		mo, _ := label(s, "model")
		st, _ := label(s, "state")
		states[mo+"/"+st] = s.GetGauge().GetValue()
	}
	if len(states) != 10 || states["big/ready"] != 1 || states["big/loading"] != 0 || states["small/ready"] != 1 || states["small/unloaded"] != 0 {
		t.Fatalf("model_state series: %v", states)
	}
	if ev := fams["krserve_model_evictions_total"]; len(ev.GetMetric()) != 8 {
		t.Fatalf("evictions not pre-initialised: %d series", len(ev.GetMetric()))
	}
	for name, f := range fams {
		for _, s := range f.GetMetric() {
			if _, ok := label(s, "model"); !ok && name != "krserve_memory_budget_bytes" {
				t.Errorf("%s has no model label", name)
			}
		}
	}
	problems, err := testutil.GatherAndLint(m.Registry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}
