package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/krserve/krserve/api"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// upConfig is every setting of `krserve up`, parsed once here and passed down.
type upConfig struct {
	Model, Python, Host       string
	Port, Workers             int
	MetricsAddr               string
	LogFormat, LogLevel       string
	LogPrompts                bool
	APIKey                    string
	ProtectOps                bool
	AllowOnline               bool
	BatchSize                 int
	WindowMS                  float64
	P99TargetMS, ToleranceMS  float64
	AutoTune                  bool
	TuneMin, TuneMax          int
	TuneAlpha                 float64
	TuneInterval              int
	TuneWindow                int
	MaxQueue, MaxQueueTokens  int
	MaxCrashes                int
	StartTimeout              time.Duration
	Heartbeat, HeartbeatLimit time.Duration
	ProgressTimeout           time.Duration
	DrainTimeout, StopGrace   time.Duration
	RecycleRequests           int
	RecycleRSSMB              int
	PrefillStep               int
	PrefillBatch              int
	Dequantize                string
	PromptCacheBytes          int64
	WorkerExec                string
	API                       api.Config
}

func newUpCmd() *cobra.Command {
	var c upConfig
	return newUpCmdFor(&c)
}

// newUpCmdFor binds the flags of `krserve up` to *cp (tests read it back).
func newUpCmdFor(cp *upConfig) *cobra.Command {
	*cp = upConfig{API: api.DefaultConfig()}
	c := cp
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start the supervisor, its workers and the HTTP server (foreground)",
		Long: "Start the supervisor, spawn the workers (each loads the model with mlx-lm) and serve the\n" +
			"OpenAI-compatible API. Environment variables honoured (flags win):\n" + envHelp(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := applyEnv(cmd.Flags(), os.LookupEnv); err != nil {
				return err
			}
			return runUp(cmd.Context(), *c)
		},
	}
	f := cmd.Flags()
	f.StringVar(&c.Model, "model", "", "mlx-lm model directory (default: SmolLM2-135M-Instruct, prepared on first use)")
	f.StringVar(&c.Python, "python", "", "Python interpreter for workers (default: the .venv next to the binary, else python3)")
	f.StringVar(&c.Host, "host", "127.0.0.1", "address to listen on; binding beyond loopback is an explicit choice")
	f.IntVar(&c.Port, "port", 8080, "port to listen on")
	f.IntVar(&c.Workers, "workers", 1, "worker processes")
	f.StringVar(&c.MetricsAddr, "metrics-addr", "", "also serve /metrics on this address (e.g. 127.0.0.1:9090)")
	f.StringVar(&c.LogFormat, "log-format", "text", "text or json")
	f.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&c.LogPrompts, "log-prompts", false, "log prompt text at debug level (off: never logged)")
	f.StringVar(&c.APIKey, "api-key", "", "require this bearer token on /v1/*")
	f.BoolVar(&c.ProtectOps, "protect-ops", false, "with --api-key: /metrics and /stats need the key too")
	f.BoolVar(&c.AllowOnline, "allow-online", false, "let workers download a Hugging Face repo id (default: offline)")
	f.IntVar(&c.BatchSize, "batch-size", 32, "sequences each worker decodes at once (B); the auto-tuner starts here")
	f.Float64Var(&c.WindowMS, "window-ms", 2, "batching window in milliseconds (0: dispatch at once)")
	f.Float64Var(&c.P99TargetMS, "p99-target-ms", 100, "auto-tuner target: P99 inter-token latency (ms)")
	f.Float64Var(&c.ToleranceMS, "p99-tolerance-ms", 20, "auto-tuner tolerance around the target (ms)")
	f.BoolVar(&c.AutoTune, "auto-tune", false, "move B toward the latency target")
	f.IntVar(&c.TuneMin, "auto-tune-min", 2, "smallest B the auto-tuner may choose")
	f.IntVar(&c.TuneMax, "auto-tune-max", 32, "largest B the auto-tuner may choose")
	f.Float64Var(&c.TuneAlpha, "auto-tune-alpha", 0.3, "auto-tuner EMA smoothing factor")
	f.IntVar(&c.TuneInterval, "auto-tune-interval", 10, "evaluations between ordinary auto-tuner steps")
	f.IntVar(&c.TuneWindow, "auto-tune-window", 512, "inter-token gaps the auto-tuner's P99 is taken over (more: steadier, slower)")
	f.IntVar(&c.MaxQueue, "max-queue", 256, "requests that may wait (429 beyond)")
	f.IntVar(&c.MaxQueueTokens, "max-queue-tokens", 1<<20, "prompt tokens that may wait (429 beyond)")
	f.IntVar(&c.MaxCrashes, "max-crashes", 2, "a request in flight during this many worker crashes fails")
	f.DurationVar(&c.StartTimeout, "start-timeout", 180*time.Second, "time a worker has to load the model and say hello")
	f.DurationVar(&c.Heartbeat, "heartbeat", time.Second, "heartbeat interval")
	f.DurationVar(&c.HeartbeatLimit, "heartbeat-timeout", 10*time.Second, "no heartbeat answer for this long: worker is wedged")
	f.DurationVar(&c.ProgressTimeout, "progress-timeout", 60*time.Second, "requests in flight and no token for this long: worker is wedged")
	f.DurationVar(&c.DrainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, time in-flight requests have to finish")
	f.DurationVar(&c.StopGrace, "stop-grace", 3*time.Second, "per stage of a worker stop (shutdown frame, SIGTERM, SIGKILL)")
	f.IntVar(&c.RecycleRequests, "recycle-requests", 0, "replace a worker after it served this many requests (0: never)")
	f.IntVar(&c.RecycleRSSMB, "recycle-rss-mb", 0, "replace a worker whose resident memory passes this (0: never)")
	f.IntVar(&c.PrefillStep, "prefill-step", 512, "prompt tokens per prefill step in the worker (smaller: faster cancel)")
	f.IntVar(&c.PrefillBatch, "prefill-batch", 0, "prompts a worker prefills in one step (0: as many as it decodes at once, so a burst of arrivals is prefilled together; less: shorter stalls of running streams)")
	f.StringVar(&c.Dequantize, "dequantize", "auto", "auto, on or off: workers hold a quantized model's weights as float32 (auto: on mlx's CPU device with OpenBLAS, when they fit in a quarter of memory; float32 matmuls are far faster there than quantized ones)")
	f.Int64Var(&c.PromptCacheBytes, "prompt-cache-bytes", -1, fmt.Sprintf("bytes of KV state each worker's prompt cache and its running sequences may hold together "+
		"(-1: an eighth of physical memory, %s here, split among the workers; 0: no prompt cache)", gib(physicalMemory()/8)))
	f.StringVar(&c.API.ModelName, "served-model-name", "default", "model id clients use (the model path is accepted too)")
	f.IntVar(&c.API.MaxTokens, "max-tokens-cap", c.API.MaxTokens, "largest max_tokens a request may ask for")
	f.IntVar(&c.API.DefaultMaxTokens, "default-max-tokens", c.API.DefaultMaxTokens, "max_tokens when a request names none")
	f.Int64Var(&c.API.MaxBodyBytes, "max-body-bytes", c.API.MaxBodyBytes, "largest request body (413 beyond)")
	f.IntVar(&c.API.MaxConcurrent, "max-connections", c.API.MaxConcurrent, "requests served at once (429 beyond)")
	f.DurationVar(&c.API.DefaultTimeout, "request-timeout", c.API.DefaultTimeout, "per-request deadline unless the request sets timeout")
	f.StringVar(&c.WorkerExec, "worker-exec", "", "run this program with the worker's arguments instead of python -m krserve_worker (benchmarks: scripts/bench/instantworker)")
	_ = f.MarkHidden("worker-exec")
	return cmd
}

// promptCacheBudget is each worker's --prompt-cache-bytes: the flag as given,
// or for -1 an eighth of physical memory split among the workers; -1 when
// memory is unknown (each worker then takes its own default).
func promptCacheBudget(flag, physical int64, workers int) int64 {
	if flag >= 0 {
		return flag
	}
	if physical <= 0 || workers < 1 {
		return -1
	}
	return physical / 8 / int64(workers)
}

func gib(n int64) string { return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30)) }

func envHelp() string {
	var b strings.Builder
	for _, e := range envVars {
		fmt.Fprintf(&b, "  %-36s %s\n", e.Name, e.Help)
	}
	return b.String()
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// findPython picks the workers' interpreter: the flag, else the .venv next
// to the binary (bin/../.venv) or in the working directory, else python3.
func findPython(flag string) string {
	if flag != "" {
		return flag
	}
	var candidates []string
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), "..", ".venv", "bin", "python"))
	}
	candidates = append(candidates, filepath.Join(".venv", "bin", "python"))
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && !st.IsDir() {
			if abs, err := filepath.Abs(c); err == nil {
				return abs
			}
			return c
		}
	}
	return "python3"
}

// prepareDefaultModel runs the worker package's preparation step (download
// and convert SmolLM2 on first use) and returns the model directory.
func prepareDefaultModel(ctx context.Context, python string, env []string, log *slog.Logger) (string, error) {
	cmd := exec.CommandContext(ctx, python, "-m", "krserve_worker.prepare")
	cmd.Env = env
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("preparing the default model with %s -m krserve_worker.prepare: %w (run `make model` to see why)", python, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return "", fmt.Errorf("krserve_worker.prepare printed %q, which is not a directory", dir)
	}
	return dir, nil
}

func runUp(parent context.Context, c upConfig) error {
	log, err := newLogger(c.LogFormat, c.LogLevel)
	if err != nil {
		return err
	}
	if c.Workers < 1 {
		return fmt.Errorf("--workers must be at least 1; got %d", c.Workers)
	}
	if parent == nil {
		parent = context.Background()
	}
	sigCtx, stopSignals := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	defer stopSignals()

	python := findPython(c.Python)
	env := blasThreads(workerEnv(os.Environ(), !c.AllowOnline), runtime.NumCPU(), c.Workers)
	model := c.Model
	if model == "" {
		t0 := time.Now()
		model, err = prepareDefaultModel(sigCtx, python, env, log)
		if err != nil {
			return err
		}
		log.Info("default model ready", "dir", model, "seconds", time.Since(t0).Seconds())
	} else if st, err := os.Stat(model); err == nil && st.IsDir() {
		model, _ = filepath.Abs(model)
		if _, err := os.Stat(filepath.Join(model, "config.json")); err != nil {
			return fmt.Errorf("--model %q is not an mlx-lm model directory: it has no config.json", model)
		}
	} else if !c.AllowOnline || !strings.Contains(model, "/") || strings.HasPrefix(model, ".") || strings.HasPrefix(model, "/") {
		return fmt.Errorf("--model %q: no such directory (a Hugging Face repo id needs --allow-online and a network)", model)
	}
	log.Info("model", "path", model)

	tune := scheduler.TuneConfig{
		Enabled: c.AutoTune, Min: c.TuneMin, Max: c.TuneMax, Initial: c.BatchSize, Alpha: c.TuneAlpha,
		Interval: c.TuneInterval, Window: c.TuneWindow, Target: msDuration(c.P99TargetMS), Tolerance: msDuration(c.ToleranceMS),
	}
	if !c.AutoTune { // a fixed B is whatever the user asked for
		tune.Min, tune.Max = min(tune.Min, c.BatchSize), max(tune.Max, c.BatchSize)
	}
	if c.BatchSize < 1 {
		return fmt.Errorf("--batch-size must be at least 1; got %d", c.BatchSize)
	}
	if c.PrefillStep < 1 {
		return fmt.Errorf("--prefill-step must be at least 1; got %d", c.PrefillStep)
	}
	if c.PrefillBatch < 0 {
		return fmt.Errorf("--prefill-batch must be at least 0 (0: the batch size); got %d", c.PrefillBatch)
	}
	if c.Dequantize != "auto" && c.Dequantize != "on" && c.Dequantize != "off" {
		return fmt.Errorf("--dequantize must be auto, on or off; got %q", c.Dequantize)
	}
	if c.PromptCacheBytes < -1 {
		return fmt.Errorf("--prompt-cache-bytes must be at least -1 (-1: the default share of memory, 0: off); got %d", c.PromptCacheBytes)
	}
	cacheBytes := promptCacheBudget(c.PromptCacheBytes, physicalMemory(), c.Workers)
	if cacheBytes >= 0 {
		log.Info("prompt cache", "bytes_per_worker", cacheBytes)
	}
	if tune.Min < 1 || tune.Max < tune.Min {
		return fmt.Errorf("auto-tune bounds [%d, %d] are not a valid range", tune.Min, tune.Max)
	}
	maxB := max(tune.Max, c.BatchSize)
	prefillBatch := c.PrefillBatch
	if prefillBatch == 0 {
		prefillBatch = maxB
	}

	m := metrics.New(metrics.ModelInfo{Model: filepath.Base(model)}, metrics.BuildInfo{Version: version, GoVersion: runtime.Version()})
	st := metrics.NewStats(time.Now)
	scfg := scheduler.DefaultConfig()
	scfg.Window = msDuration(c.WindowMS)
	scfg.MaxQueue, scfg.MaxQueueTokens, scfg.MaxCrashes, scfg.Tune = c.MaxQueue, c.MaxQueueTokens, c.MaxCrashes, tune
	sched := scheduler.New(scfg, m, st)

	var ids atomic.Uint64
	nextID := func() uint64 { return ids.Add(1) }
	pcfg := supervisor.DefaultConfig()
	pcfg.Workers = c.Workers
	pcfg.StartTimeout, pcfg.HeartbeatInterval, pcfg.HeartbeatTimeout = c.StartTimeout, c.Heartbeat, c.HeartbeatLimit
	pcfg.ProgressTimeout, pcfg.StopGrace = c.ProgressTimeout, c.StopGrace
	pcfg.RecycleRequests, pcfg.RecycleRSS = c.RecycleRequests, int64(c.RecycleRSSMB)<<20
	pcfg.Command = func(slot int) supervisor.Command {
		args := []string{"-m", "krserve_worker", "--model", model,
			"--max-batch", strconv.Itoa(maxB), "--prefill-step", strconv.Itoa(c.PrefillStep),
			"--prefill-batch", strconv.Itoa(prefillBatch), "--dequantize", c.Dequantize}
		if cacheBytes >= 0 {
			args = append(args, "--prompt-cache-bytes", strconv.FormatInt(cacheBytes, 10))
		}
		if c.WorkerExec != "" {
			return supervisor.Command{Path: c.WorkerExec, Env: env, Args: args[2:]}
		}
		return supervisor.Command{Path: python, Env: env, Args: args}
	}
	pool := supervisor.NewPool(pcfg, sched, m, log)

	ops := &ops{pool: pool, sched: sched, stats: st, started: time.Now(), workers: c.Workers}
	apiCfg := c.API
	apiCfg.APIKey, apiCfg.ProtectOps, apiCfg.LogPrompts = c.APIKey, c.ProtectOps, c.LogPrompts
	front := api.New(apiCfg, sched, pool, ops, m, log, nextID)

	addr := net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: front.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second}
	var metricsSrv *http.Server
	var metricsLn net.Listener
	if c.MetricsAddr != "" {
		if metricsLn, err = net.Listen("tcp", c.MetricsAddr); err != nil {
			ln.Close()
			return fmt.Errorf("listen on --metrics-addr %s: %w", c.MetricsAddr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", m.Handler())
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	}
	log.Info("krserve listening", "addr", "http://"+ln.Addr().String(), "workers", c.Workers, "batch_size", c.BatchSize, "prefill_batch", prefillBatch,
		"window_ms", c.WindowMS, "auto_tune", c.AutoTune, "metrics_addr", c.MetricsAddr, "python", python)
	if c.Host != "127.0.0.1" && c.Host != "localhost" && c.Host != "::1" {
		log.Warn("listening beyond loopback", "host", c.Host, "api_key_set", c.APIKey != "")
	}

	// Actors: they start together; the first to return ends the others.
	schedCtx, stopSched := context.WithCancel(context.Background())
	poolCtx, stopPool := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Add(2)
	go func() { defer wg.Done(); errs <- sched.Run(schedCtx) }()
	go func() { defer wg.Done(); errs <- pool.Run(poolCtx) }()
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			errs <- fmt.Errorf("http server: %w", err)
		}
	}()
	if metricsSrv != nil {
		go func() {
			if err := metricsSrv.Serve(metricsLn); !errors.Is(err, http.ErrServerClosed) {
				errs <- fmt.Errorf("metrics server: %w", err)
			}
		}()
	}
	go func() {
		select {
		case <-pool.Ready():
			log.Info("ready: a worker has loaded the model")
			if h := pool.Hello(); h != nil {
				m.SetInfo(metrics.ModelInfo{Quantization: quantizationOf(model), ContextLength: h.Context},
					metrics.BuildInfo{Version: version, MLXVersion: h.Versions["mlx"], MLXLMVersion: h.Versions["mlx_lm"]})
			}
		case <-sigCtx.Done():
		}
	}()

	var runErr error
	select {
	case <-sigCtx.Done():
		log.Info("shutting down: draining", "drain_timeout", c.DrainTimeout)
	case runErr = <-errs:
		log.Error("shutting down after failure", "err", runErr)
	}
	// Drain: /ready turns 503, new requests get 503, in-flight ones finish.
	select {
	case <-sched.Drain():
		log.Info("drained: no request in flight")
	case <-time.After(c.DrainTimeout):
		log.Warn("drain timeout passed; failing what is left")
		sched.Abort("server shut down before the request finished")
	}
	// Let handlers write their last bytes, then stop workers and listeners.
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutCtx)
	if metricsSrv != nil {
		_ = metricsSrv.Shutdown(shutCtx)
	}
	stopPool()
	stopSched()
	wg.Wait()
	log.Info("stopped")
	return runErr
}

// quantizationOf describes the model's quantization from its config.json
// ("4bit-g32", "none"), or "" if it cannot tell.
func quantizationOf(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return ""
	}
	var cfg struct {
		Quantization *struct {
			Bits      int `json:"bits"`
			GroupSize int `json:"group_size"`
		} `json:"quantization"`
	}
	if json.Unmarshal(b, &cfg) != nil {
		return ""
	}
	if cfg.Quantization == nil {
		return "none"
	}
	return fmt.Sprintf("%dbit-g%d", cfg.Quantization.Bits, cfg.Quantization.GroupSize)
}

// ops answers /ready and /stats from the pool and scheduler.
type ops struct {
	pool    *supervisor.Pool
	sched   *scheduler.Scheduler
	stats   *metrics.Stats
	started time.Time
	workers int
}

func (o *ops) Ready() (bool, any) {
	if o.sched.Draining() {
		return false, map[string]any{"status": "draining", "reason": "server is shutting down"}
	}
	healthy, loading, failed := 0, 0, 0
	var reasons []string
	for _, s := range o.pool.Status() {
		switch {
		case s.Healthy:
			healthy++
		case s.State == supervisor.StateStarting && s.Failure == "":
			loading++
		case s.State == supervisor.StateFailed:
			failed++
			reasons = append(reasons, fmt.Sprintf("worker %d failed: %s", s.Slot, s.Failure))
		case s.Failure != "":
			reasons = append(reasons, fmt.Sprintf("worker %d is %s after failing: %s", s.Slot, s.State, s.Failure))
		default:
			reasons = append(reasons, fmt.Sprintf("worker %d is %s", s.Slot, s.State))
		}
	}
	body := map[string]any{"workers_healthy": healthy, "workers_total": o.workers}
	switch {
	case healthy == o.workers:
		body["status"] = "ready"
		return true, body
	case healthy > 0:
		body["status"] = "degraded"
		body["reason"] = fmt.Sprintf("degraded: %d of %d workers healthy", healthy, o.workers)
		body["details"] = reasons
		return true, body
	case loading > 0 && failed == 0 && o.pool.Hello() == nil:
		body["status"] = "loading"
		body["reason"] = "loading the model"
	case failed == o.workers:
		body["status"] = "failed"
		body["reason"] = "every worker keeps failing; retrying later"
		body["details"] = reasons
	default:
		body["status"] = "unavailable"
		body["reason"] = "no worker is up"
		body["details"] = reasons
	}
	return false, body
}

func (o *ops) Stats() any {
	return map[string]any{
		"server":    o.stats.Snapshot(),
		"scheduler": o.sched.State(),
		"workers":   o.pool.Status(),
		"model":     o.pool.Hello(),
		"uptime_s":  time.Since(o.started).Seconds(),
	}
}
