// Package metrics holds krserve's Prometheus instruments and the recorder
// behind the /stats JSON document.
//
// Conventions (node_exporter style):
//
//   - Each Metrics value owns its registry (prometheus.NewRegistry); nothing is
//     registered with the global default registry and the package has no init
//     side effects, so tests and several supervisors in one process are safe.
//   - Every series, including the go_*, process_* and promhttp_* ones, carries
//     the constant label model=<ModelInfo.Model>, added with
//     prometheus.WrapRegistererWith.
//   - Names use the krserve_ prefix and base units (seconds, bytes); counters
//     end in _total. Where vLLM has a name for the same concept the suffix is
//     the same, so its Grafana boards need only a prefix change.
//   - Counter vectors with a closed set of label values are pre-initialised,
//     so a scrape shows explicit zeros before the first event.
package metrics

import (
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "krserve"

// BuildInfo is exported as krserve_build_info{version,go_version,mlx_version,mlx_lm_version} 1.
// An empty GoVersion is replaced by runtime.Version().
type BuildInfo struct {
	Version      string
	GoVersion    string
	MLXVersion   string
	MLXLMVersion string
}

// ModelInfo names the served model. Model becomes the constant label "model"
// on every series; Quantization and ContextLength are exported as
// krserve_model_info{quantization,context_length} 1.
type ModelInfo struct {
	Model         string
	Quantization  string
	ContextLength int
}

// Label values. The supervisor may use others for the open-ended labels
// (worker, signal, code), but the closed sets below are pre-initialised.
var (
	FinishedReasons        = []string{"stop", "length"}
	FailureReasons         = []string{"overloaded", "invalid", "worker_crash", "timeout", "cancelled", "internal"}
	AdmissionRejectReasons = []string{"queue_full", "queue_tokens", "deadline", "draining", "connections", "too_large"}
	AutotuneDirections     = []string{"up", "down", "emergency_down"}
	RestartReasons         = []string{"crash", "wedged", "protocol", "recycle", "start_failure"}
	MemoryKinds            = []string{"rss", "mlx_active", "mlx_peak"}
)

// Histogram buckets, in base units.
var (
	// latencyBuckets (seconds) serve TTFT, e2e, queue, prefill and decode
	// time: 1 ms resolution at the low end, up to 60 s.
	latencyBuckets = []float64{
		0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075,
		0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
		0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
		1, 1.5, 2, 3, 5, 7.5,
		10, 15, 20, 30, 45, 60,
	}
	// perTokenBuckets (seconds) serve inter-token latency: 1 ms steps to
	// 10 ms, 2.5 ms steps to 25 ms, then coarser up to 2.5 s.
	perTokenBuckets = []float64{
		0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01,
		0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025,
		0.03, 0.035, 0.04, 0.045, 0.05, 0.06, 0.075,
		0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
		1, 1.5, 2, 2.5,
	}
	// windowBuckets (seconds) serve the batch admission window (nominally
	// 2 ms): 100 µs .. 100 ms.
	windowBuckets = []float64{
		0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175,
		0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
	}
	// ipcBuckets (seconds) serve the ping→pong round trip: 25 µs .. 5 s.
	ipcBuckets = []float64{
		0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075,
		0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
		0.1, 0.25, 0.5, 1, 2.5, 5,
	}
	// startBuckets (seconds) serve worker start (process spawn to ready,
	// including model load): 0.25 s .. 10 min.
	startBuckets = []float64{
		0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600,
	}
	// dispatchBuckets (requests) serve the number of requests sent to a
	// worker in one dispatch.
	dispatchBuckets = []float64{1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128}
)

// tokenBuckets returns 1-2-5 buckets (tokens) from 1 up to the first value
// that is at least maxTokens (131072 when maxTokens <= 0), vLLM style.
func tokenBuckets(maxTokens int) []float64 {
	if maxTokens <= 0 {
		maxTokens = 131072
	}
	var b []float64
	for mag := 1; ; mag *= 10 {
		for _, m := range []int{1, 2, 5} {
			v := m * mag
			b = append(b, float64(v))
			if v >= maxTokens {
				return b
			}
		}
	}
}

// Metrics is the supervisor's set of Prometheus instruments. All fields are
// ready to use after New; none is nil.
type Metrics struct {
	Registry *prometheus.Registry

	NumRequestsRunning prometheus.Gauge
	NumRequestsWaiting prometheus.Gauge

	RequestSuccess      *prometheus.CounterVec // finished_reason: stop|length
	RequestFailure      *prometheus.CounterVec // reason: overloaded|invalid|worker_crash|timeout|cancelled|internal
	AdmissionRejections *prometheus.CounterVec // reason: queue_full|queue_tokens|deadline|draining|connections|too_large

	TTFT              prometheus.Histogram
	InterTokenLatency prometheus.Histogram
	E2ELatency        prometheus.Histogram
	QueueTime         prometheus.Histogram
	PrefillTime       prometheus.Histogram
	DecodeTime        prometheus.Histogram

	PromptTokens            prometheus.Counter
	GenerationTokens        prometheus.Counter
	RequestPromptTokens     prometheus.Histogram
	RequestGenerationTokens prometheus.Histogram

	PrefixCacheQueries   prometheus.Counter
	PrefixCacheHits      prometheus.Counter
	PrefixCacheEvictions prometheus.Counter
	PromptCacheBytes     *prometheus.GaugeVec // worker
	PromptCacheBudget    *prometheus.GaugeVec // worker

	BatchSize           *prometheus.GaugeVec // worker
	BatchTargetSize     prometheus.Gauge
	BatchWindowWait     prometheus.Histogram
	BatchDispatched     prometheus.Histogram   // requests sent to a worker together
	AutotuneAdjustments *prometheus.CounterVec // direction: up|down|emergency_down
	LatencyTarget       prometheus.Gauge

	WorkerUp            *prometheus.GaugeVec   // worker
	WorkerRestarts      *prometheus.CounterVec // reason: crash|wedged|protocol|recycle|start_failure
	WorkerExits         *prometheus.CounterVec // signal: SIGSEGV|SIGKILL|...|none ; code: exit code as string or ""
	WorkerStartDuration prometheus.Histogram
	WorkerMemory        *prometheus.GaugeVec // worker, kind: rss|mlx_active|mlx_peak
	WorkerRankUp        *prometheus.GaugeVec // worker, rank: a group's ranks (--group-size > 1)
	WorkerRankMemory    *prometheus.GaugeVec // worker, rank: resident set of each rank

	RequestsRetried   prometheus.Counter
	RequestsResumed   prometheus.Counter
	RequestsLost      prometheus.Counter
	ClientDisconnects prometheus.Counter

	RequestsSuspected   prometheus.Counter
	Probations          prometheus.Counter
	RequestsOnProbation prometheus.Gauge
	RequestsPoisoned    prometheus.Counter

	RoutingDecisions      *prometheus.CounterVec // reason: cache|balance|least_loaded
	RoutingMispredictions prometheus.Counter

	IPCRoundTrip prometheus.Histogram // ping→pong seconds

	buildInfo   prometheus.Gauge // krserve_build_info, always 1
	modelInfo   prometheus.Gauge // krserve_model_info, always 1
	infoMu      sync.Mutex
	reg         prometheus.Registerer // Registry wrapped with model=<name>
	root        *Metrics              // ForModel: the Metrics whose registry this shares
	handlerOnce sync.Once
	handler     http.Handler
}

// New builds the instruments, registers them (and the Go runtime and process
// collectors) on a fresh registry, and returns them. It does not touch the
// global registry.
func New(model ModelInfo, build BuildInfo) *Metrics {
	m := newOn(prometheus.NewRegistry(), model, build)
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// ForModel builds the instruments of another model served by the same
// process on m's registry, every series labelled model=<model.Model> (which
// must differ from every other model's). The Go and process collectors and
// the /metrics handler stay m's.
func (m *Metrics) ForModel(model ModelInfo, build BuildInfo) *Metrics {
	c := newOn(m.Registry, model, build)
	c.root = m
	return c
}

func newOn(registry *prometheus.Registry, model ModelInfo, build BuildInfo) *Metrics {
	reg := prometheus.WrapRegistererWith(prometheus.Labels{"model": model.Model}, registry)
	m := &Metrics{Registry: registry, reg: reg}

	gauge := func(name, help string) prometheus.Gauge {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help})
		reg.MustRegister(g)
		return g
	}
	gaugeVec := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, labels)
		reg.MustRegister(g)
		return g
	}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
		reg.MustRegister(c)
		return c
	}
	counterVec := func(name, help, label string, values []string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, []string{label})
		for _, v := range values {
			c.WithLabelValues(v)
		}
		reg.MustRegister(c)
		return c
	}
	histogram := func(name, help string, buckets []float64) prometheus.Histogram {
		h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: buckets})
		reg.MustRegister(h)
		return h
	}

	// Load.
	m.NumRequestsRunning = gauge("num_requests_running",
		"Requests currently assigned to a worker (prefill or decode).")
	m.NumRequestsWaiting = gauge("num_requests_waiting",
		"Requests admitted and waiting in the supervisor queue for a worker slot.")

	// Outcomes.
	m.RequestSuccess = counterVec("request_success_total",
		"Requests that finished normally, by finished_reason (stop: EOS or stop sequence; length: max_tokens or context limit).",
		"finished_reason", FinishedReasons)
	m.RequestFailure = counterVec("request_failure_total",
		"Admitted requests that ended in an error, by reason.",
		"reason", FailureReasons)
	m.AdmissionRejections = counterVec("admission_rejections_total",
		"Requests refused before being queued, by reason.",
		"reason", AdmissionRejectReasons)

	// Latencies.
	m.TTFT = histogram("time_to_first_token_seconds",
		"Time from request arrival at the supervisor to the first generated token sent to the client.", latencyBuckets)
	m.InterTokenLatency = histogram("inter_token_latency_seconds",
		"Time between consecutive generated tokens of one request, observed per token.", perTokenBuckets)
	m.E2ELatency = histogram("e2e_request_latency_seconds",
		"Time from request arrival at the supervisor to its last byte, for finished requests.", latencyBuckets)
	m.QueueTime = histogram("request_queue_time_seconds",
		"Time a request spent waiting in the supervisor queue before dispatch to a worker.", latencyBuckets)
	m.PrefillTime = histogram("request_prefill_time_seconds",
		"Time from dispatch to a worker to the first generated token (prompt processing).", latencyBuckets)
	m.DecodeTime = histogram("request_decode_time_seconds",
		"Time from the first generated token to the last one.", latencyBuckets)

	// Tokens.
	m.PromptTokens = counter("prompt_tokens_total",
		"Prompt tokens processed for dispatched requests.")
	m.GenerationTokens = counter("generation_tokens_total",
		"Tokens generated, counted as they stream.")
	m.RequestPromptTokens = histogram("request_prompt_tokens",
		"Prompt length of finished requests, in tokens.", tokenBuckets(model.ContextLength))
	m.RequestGenerationTokens = histogram("request_generation_tokens",
		"Generated length of finished requests, in tokens.", tokenBuckets(model.ContextLength))

	// Prompt cache (vLLM's prefix cache names).
	m.PrefixCacheQueries = counter("prefix_cache_queries_total",
		"Prompt tokens the workers looked up in their prompt caches (every prefilled token of every request, resumed tokens included).")
	m.PrefixCacheHits = counter("prefix_cache_hits_total",
		"Prompt tokens the workers took from their prompt caches instead of prefilling them.")
	m.PrefixCacheEvictions = counter("prefix_cache_evictions_total",
		"Entries the workers' prompt caches evicted to stay within their byte budget.")
	m.PromptCacheBytes = gaugeVec("prompt_cache_bytes",
		"Bytes of KV state a worker's prompt cache holds (from its last heartbeat).", "worker")
	m.PromptCacheBudget = gaugeVec("prompt_cache_budget_bytes",
		"Bytes of KV state a worker's prompt cache and running sequences may hold together, as its hello advertised (0: no cache).", "worker")

	// Batching and the autotuner.
	m.BatchSize = gaugeVec("batch_size",
		"Sequences currently being decoded together in a worker's batch.", "worker")
	m.BatchTargetSize = gauge("batch_target_size",
		"Batch size the autotuning controller currently aims for.")
	m.BatchWindowWait = histogram("batch_window_wait_seconds",
		"Time a dispatch waited in the admission window collecting requests before being sent.", windowBuckets)
	m.BatchDispatched = histogram("batch_dispatched_requests",
		"Requests sent to a worker together in one dispatch.", dispatchBuckets)
	m.AutotuneAdjustments = counterVec("autotune_adjustments_total",
		"Changes the autotuning controller made to the target batch size, by direction.",
		"direction", AutotuneDirections)
	m.LatencyTarget = gauge("latency_target_seconds",
		"Latency target the autotuning controller steers towards.")

	// Workers.
	m.WorkerUp = gaugeVec("worker_up",
		"1 if the worker process is running and ready for requests, 0 otherwise.", "worker")
	m.WorkerRestarts = counterVec("worker_restarts_total",
		"Worker processes restarted by the supervisor, by reason.",
		"reason", RestartReasons)
	m.WorkerExits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "worker_exits_total",
		Help: "Worker process exits, by terminating signal (\"none\" for a normal exit) and exit code (\"\" when killed by a signal).",
	}, []string{"signal", "code"})
	reg.MustRegister(m.WorkerExits)
	m.WorkerStartDuration = histogram("worker_start_duration_seconds",
		"Time from spawning a worker process to it reporting ready (model loaded).", startBuckets)
	m.WorkerMemory = gaugeVec("worker_memory_bytes",
		"Worker memory by kind: rss (resident set of the process), mlx_active (MLX active memory), mlx_peak (MLX peak memory).",
		"worker", "kind")
	m.WorkerRankUp = gaugeVec("worker_rank_up",
		"For a worker that is a group of ranks (--group-size > 1): 1 if the rank's process is alive and not stopped, 0 otherwise.",
		"worker", "rank")
	m.WorkerRankMemory = gaugeVec("worker_rank_memory_bytes",
		"For a worker that is a group of ranks (--group-size > 1): resident set of each rank's process (Linux /proc).",
		"worker", "rank")

	// Resilience.
	m.RequestsRetried = counter("requests_retried_total",
		"Requests re-dispatched to another worker after a failure before any token was sent.")
	m.RequestsResumed = counter("requests_resumed_total",
		"Requests continued on another worker after a failure mid-generation.")
	m.RequestsLost = counter("requests_lost_total",
		"Requests that failed because of worker crashes: declared poison, or past --max-crashes.")
	m.RequestsSuspected = counter("requests_suspected_total",
		"Requests made suspects: in flight on a worker that died. Each is retried or resumed alone on a worker (probation).")
	m.Probations = counter("probations_total",
		"Suspects dispatched alone to a worker (probation); a request may be on probation more than once.")
	m.RequestsOnProbation = gauge("requests_on_probation",
		"Suspects running alone on a worker now.")
	m.RequestsPoisoned = counter("requests_poisoned_total",
		"Requests declared poison and failed: a worker died while running them alone on probation (--poison-after times).")
	m.RoutingDecisions = counterVec("routing_decisions_total",
		"Requests routed to a worker, by reason: cache (the worker holding most of the prompt), balance (load was imbalanced: the least loaded), least_loaded (no worker held enough).",
		"reason", []string{"cache", "balance", "least_loaded"})
	m.RoutingMispredictions = counter("routing_mispredictions_total",
		"Requests whose worker had cached less than half of what the routing index predicted; each shrinks that worker's index.")
	m.ClientDisconnects = counter("client_disconnects_total",
		"Requests whose client went away before the response finished.")
	m.IPCRoundTrip = histogram("ipc_roundtrip_seconds",
		"Round trip of a ping/pong message between the supervisor and a worker.", ipcBuckets)

	m.setInfo(model, build)
	return m
}

// SetInfo replaces the labels of krserve_build_info and krserve_model_info,
// for what is known only once a worker said hello (MLX versions, context
// length). model.Model is ignored: the model label is fixed at New.
func (m *Metrics) SetInfo(model ModelInfo, build BuildInfo) {
	m.infoMu.Lock()
	defer m.infoMu.Unlock()
	m.reg.Unregister(m.buildInfo)
	m.reg.Unregister(m.modelInfo)
	m.setInfo(model, build)
}

func (m *Metrics) setInfo(model ModelInfo, build BuildInfo) {
	goVersion := build.GoVersion
	if goVersion == "" {
		goVersion = runtime.Version()
	}
	m.buildInfo = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help: "Always 1; labels give the krserve, Go, MLX and mlx-lm versions.",
		ConstLabels: prometheus.Labels{
			"version":        build.Version,
			"go_version":     goVersion,
			"mlx_version":    build.MLXVersion,
			"mlx_lm_version": build.MLXLMVersion,
		},
	})
	m.buildInfo.Set(1)
	m.reg.MustRegister(m.buildInfo)
	m.modelInfo = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "model_info",
		Help: "Always 1; labels give the served model's quantization and context length in tokens.",
		ConstLabels: prometheus.Labels{
			"quantization":   model.Quantization,
			"context_length": strconv.Itoa(model.ContextLength),
		},
	})
	m.modelInfo.Set(1)
	m.reg.MustRegister(m.modelInfo)
}

// Handler serves the registry in the Prometheus text or OpenMetrics format.
// Scrapes are counted in promhttp_metric_handler_* series. Repeated calls
// return the same handler.
func (m *Metrics) Handler() http.Handler {
	if m.root != nil {
		return m.root.Handler()
	}
	m.handlerOnce.Do(func() {
		h := promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{
			ErrorHandling:       promhttp.ContinueOnError,
			Registry:            m.reg,
			MaxRequestsInFlight: 4,
			Timeout:             10 * time.Second,
			EnableOpenMetrics:   true,
		})
		m.handler = promhttp.InstrumentMetricHandler(m.reg, h)
	})
	return m.handler
}

// ModelSet holds the instruments of the layer that loads and unloads models
// (package models). Their series are labelled with each model's name.
type ModelSet struct {
	State        *prometheus.GaugeVec     // model, state: 1 for the model's current state, 0 for the others
	Loads        *prometheus.CounterVec   // model, result: ok|failed|timeout
	Evictions    *prometheus.CounterVec   // model, reason: ttl|keep_alive|room|api
	LoadDuration *prometheus.HistogramVec // model
	Memory       *prometheus.GaugeVec     // model, kind: estimated|measured
	Budget       prometheus.Gauge         // no model label: the server's
	states       []string
}

// Models registers the model layer's instruments on m's registry, for the
// named models (label value of each: names[i]), with every closed label set
// pre-initialised. Call it once per registry.
func (m *Metrics) Models(names, states, results, reasons []string) *ModelSet {
	s := &ModelSet{states: states}
	s.State = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: "model_state",
		Help: "1 for each model's current state (unloaded, loading, ready, draining, failed), 0 for the others."}, []string{"model", "state"})
	s.Loads = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "model_loads_total",
		Help: "Model loads, by result (ok, failed, timeout)."}, []string{"model", "result"})
	s.Evictions = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "model_evictions_total",
		Help: "Models unloaded, by reason (ttl: idle past its ttl or keep_alive; keep_alive: a request asked for 0; room: to load another model; api: unloaded by hand)."},
		[]string{"model", "reason"})
	s.LoadDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "model_load_duration_seconds",
		Help: "Time to load a model: from starting its workers to the first one ready, or the failure.", Buckets: startBuckets}, []string{"model"})
	s.Memory = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: "model_memory_bytes",
		Help: "Memory of each model by kind: estimated (before loading: weights as held plus KV cache) and measured (resident memory its workers report while loaded, else 0)."},
		[]string{"model", "kind"})
	s.Budget = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "memory_budget_bytes",
		Help: "Memory all loaded models may take together (--memory-budget; 0: no budget)."})
	for _, n := range names {
		for _, st := range states {
			s.State.WithLabelValues(n, st)
		}
		for _, r := range results {
			s.Loads.WithLabelValues(n, r)
		}
		for _, r := range reasons {
			s.Evictions.WithLabelValues(n, r)
		}
		s.Memory.WithLabelValues(n, "estimated")
		s.Memory.WithLabelValues(n, "measured")
	}
	m.Registry.MustRegister(s.State, s.Loads, s.Evictions, s.LoadDuration, s.Memory, s.Budget)
	return s
}

// SetState sets model's state series: 1 for state, 0 for the others.
func (s *ModelSet) SetState(model, state string) {
	for _, st := range s.states {
		v := 0.0
		if st == state {
			v = 1
		}
		s.State.WithLabelValues(model, st).Set(v)
	}
}
