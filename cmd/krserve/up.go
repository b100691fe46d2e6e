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
	"github.com/krserve/krserve/models"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// upConfig is every setting of `krserve up`, parsed once here and passed down.
type upConfig struct {
	Models                    []string // --model PATH or NAME=PATH, repeated
	ConfigFile                string
	Python, Host              string
	Port, Workers             int
	GroupSize                 int
	HostFile, SSH             string
	RingPort                  int
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
	PoisonAfter               int
	Routing                   string
	RoutingBalance            int
	ProbationTokens           int
	StartTimeout              time.Duration
	Heartbeat, HeartbeatLimit time.Duration
	ProgressTimeout           time.Duration
	DrainDelay                time.Duration
	DrainTimeout, StopGrace   time.Duration
	RecycleRequests           int
	RecycleRSSMB              int
	PrefillStep               int
	PrefillBatch              int
	Dequantize                string
	PromptCacheBytes          int64
	WorkerExec                string
	MemoryBudget              string
	MaxLoadedModels           int
	LoadTimeout               time.Duration
	ModelMaxWaiting           int
	MinResidency, SwapAgeCap  time.Duration
	API                       api.Config
	// given: flags set on the command line or by their environment
	// variable, which win over the --config file.
	given map[string]bool
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
			c.given = givenFlags(cmd.Flags(), os.LookupEnv)
			return runUp(cmd.Context(), *c)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&c.Models, "model", nil, "model to serve: an mlx-lm directory or a Hugging Face repo id in the local HF cache, served as --served-model-name; NAME=PATH serves it as NAME (repeat for several models, loaded on demand; default: SmolLM2-135M-Instruct, prepared on first use)")
	f.StringVar(&c.ConfigFile, "config", "", "YAML file declaring models (path, aliases, workers, batch_size, group_size, ttl, pin, preload) and memory_budget, max_loaded_models; flags win over it (README: Serving several models)")
	f.StringVar(&c.MemoryBudget, "memory-budget", "", "memory all loaded models may take: bytes (24GiB, 8000000000) or a percentage of RAM (75%); models are unloaded (idle ones, least recently used first) to make room, and a model that cannot fit alone is refused (default: no budget)")
	f.IntVar(&c.MaxLoadedModels, "max-loaded-models", 0, "models loaded at once; loading another unloads one first (0: no limit)")
	f.DurationVar(&c.LoadTimeout, "load-timeout", 5*time.Minute, "a model load (workers started, first one ready) that takes longer fails its waiting requests")
	f.IntVar(&c.ModelMaxWaiting, "model-max-waiting", 256, "requests that may wait for one model to load (429 beyond)")
	f.DurationVar(&c.MinResidency, "min-residency", 2*time.Second, "a loaded model is not unloaded to make room sooner than this after loading (two models used alternately do not thrash)")
	f.DurationVar(&c.SwapAgeCap, "swap-age-cap", 30*time.Second, "a load that has waited this long for room may unload busy models (they finish their requests first); before that only idle ones")
	f.StringVar(&c.Python, "python", "", "Python interpreter for workers (default: the .venv next to the binary, else python3)")
	f.StringVar(&c.Host, "host", "127.0.0.1", "address to listen on; binding beyond loopback is an explicit choice")
	f.IntVar(&c.Port, "port", 8080, "port to listen on")
	f.IntVar(&c.Workers, "workers", 1, "worker processes")
	f.IntVar(&c.GroupSize, "group-size", 1, "processes (ranks) each worker is split over with mlx.distributed (ring backend over loopback, or on several machines with --hostfile; tensor parallel with mlx-lm's sharded loading); the model's attention and KV heads must divide by it; the ranks are one crash domain: any rank's death or a stalled group restarts them all (README: A worker that is a group of ranks)")
	f.StringVar(&c.HostFile, "hostfile", "", "run each worker as a group of ranks on the machines of this mlx host file (JSON: [{\"ssh\": \"mac1\", \"ips\": [\"10.0.0.1\"]}, ...], or mlx.launch's object with \"hosts\" and \"envs\"): rank r on host r, the group size is the number of hosts; a host whose \"ssh\" is 127.0.0.1 or localhost runs here, every other one through --ssh, as mlx.launch does; the ring backend and rank 0's control link use the hosts' \"ips\"; the model, the Python (--python) and krserve_worker must be at the same paths on every host (docs/deploy.md: Ranks on several machines)")
	f.StringVar(&c.SSH, "ssh", "ssh", "with --hostfile: the ssh command, with any options (e.g. \"ssh -i ~/.ssh/cluster -o ConnectTimeout=5\"); krserve adds -T -o BatchMode=yes, which options given here override")
	f.IntVar(&c.RingPort, "ring-port", 32323, "with --hostfile: first TCP port of the ring backend and rank 0's control link (mlx.launch's default); a group takes one port per address of each host plus one, and a restarted group the next such block, over 64 blocks")
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
	f.IntVar(&c.MaxCrashes, "max-crashes", 8, "a request that lived through this many worker crashes fails, whatever caused them (bounds retries when the pool keeps dying)")
	f.IntVar(&c.PoisonAfter, "poison-after", 2, "a request in flight during a crash is retried alone on a worker (probation); one whose worker dies this many times while running it alone is declared poison and fails (1: convict at once, but a kill from outside that lands on a probation then fails an innocent request)")
	f.IntVar(&c.RoutingBalance, "routing-balance", scheduler.DefaultRoutingConfig().BalanceAbs, "cache-aware routing goes to the least loaded worker instead when the busiest has more than this many requests in flight above the idlest (and 1.5x as many)")
	f.StringVar(&c.Routing, "routing", scheduler.RoutingCacheAware, "which worker takes a request: cache-aware (the worker whose prompt cache holds most of the conversation, unless load is clearly imbalanced) or least-loaded")
	f.IntVar(&c.ProbationTokens, "probation-tokens", 2, "tokens past its crash point a suspect must produce alone before it rejoins batching")
	f.DurationVar(&c.StartTimeout, "start-timeout", 180*time.Second, "time a worker has to load the model and say hello")
	f.DurationVar(&c.Heartbeat, "heartbeat", time.Second, "heartbeat interval")
	f.DurationVar(&c.HeartbeatLimit, "heartbeat-timeout", 10*time.Second, "no heartbeat answer for this long: worker is wedged")
	f.DurationVar(&c.ProgressTimeout, "progress-timeout", 60*time.Second, "requests in flight and no token for this long: worker is wedged")
	f.DurationVar(&c.DrainDelay, "drain-delay", 0, "on SIGTERM, answer 503 on /ready but keep admitting requests this long, so a load balancer's health check takes this instance out before it refuses any (behind HAProxy or Kubernetes: longer than the balancer needs to notice; docs/deploy.md)")
	f.DurationVar(&c.DrainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, after --drain-delay: time in-flight requests have to finish while new ones get 503")
	f.DurationVar(&c.StopGrace, "stop-grace", 3*time.Second, "per stage of a worker stop (shutdown frame, SIGTERM, SIGKILL)")
	f.IntVar(&c.RecycleRequests, "recycle-requests", 0, "replace a worker after it served this many requests (0: never)")
	f.IntVar(&c.RecycleRSSMB, "recycle-rss-mb", 0, "replace a worker whose resident memory passes this (0: never)")
	f.IntVar(&c.PrefillStep, "prefill-step", 0, "prompt tokens per sequence per prefill step in the worker (0: the worker's default, 2048 on a GPU as mlx_lm.server, 512 on the CPU; smaller: faster cancel, shorter stalls of running streams; larger: fewer steps)")
	f.IntVar(&c.PrefillBatch, "prefill-batch", 0, "prompts a worker prefills in one step (0: as many as it decodes at once, so a burst of arrivals is prefilled together; less: shorter stalls of running streams)")
	f.StringVar(&c.Dequantize, "dequantize", "auto", "auto, on or off: workers hold a quantized model's weights as float32 (auto: on mlx's CPU device with OpenBLAS, when they fit in a quarter of memory; float32 matmuls are far faster there than quantized ones)")
	f.Int64Var(&c.PromptCacheBytes, "prompt-cache-bytes", -1, fmt.Sprintf("bytes of KV state each worker's prompt cache and its running sequences may hold together "+
		"(-1: each worker sizes it by the memory its KV cache lives in, once the model is loaded: on a CUDA GPU half of the GPU's memory less the weights of the workers of every model that may be loaded at once, "+
		"split among them, 0 (off) if the weights take that half; elsewhere (the CPU, Apple silicon) an eighth of physical memory, %s here, split among them; "+
		"0: no prompt cache, and --routing is least-loaded)", gib(models.PhysicalMemory()/8)))
	f.StringVar(&c.API.ModelName, "served-model-name", "default", "model id clients use for a --model given without NAME= (the model path is accepted too)")
	f.IntVar(&c.API.MaxTokens, "max-tokens-cap", c.API.MaxTokens, "largest max_tokens a request may ask for")
	f.IntVar(&c.API.DefaultMaxTokens, "default-max-tokens", c.API.DefaultMaxTokens, "max_tokens when a request names none")
	f.Int64Var(&c.API.MaxBodyBytes, "max-body-bytes", c.API.MaxBodyBytes, "largest request body (413 beyond)")
	f.IntVar(&c.API.MaxConcurrent, "max-connections", c.API.MaxConcurrent, "requests served at once (429 beyond)")
	f.DurationVar(&c.API.DefaultTimeout, "request-timeout", c.API.DefaultTimeout, "per-request deadline unless the request sets timeout")
	f.StringVar(&c.WorkerExec, "worker-exec", "", "run this program with the worker's arguments instead of python -m krserve_worker (benchmarks: scripts/bench/instantworker)")
	_ = f.MarkHidden("worker-exec")
	return cmd
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
	if c.GroupSize < 1 {
		return fmt.Errorf("--group-size must be at least 1; got %d", c.GroupSize)
	}
	if parent == nil {
		parent = context.Background()
	}
	if c.BatchSize < 1 {
		return fmt.Errorf("--batch-size must be at least 1; got %d", c.BatchSize)
	}
	for _, v := range []struct {
		name string
		n    int
	}{{"--max-crashes", c.MaxCrashes}, {"--poison-after", c.PoisonAfter}, {"--probation-tokens", c.ProbationTokens}} {
		if v.n < 1 {
			return fmt.Errorf("%s must be at least 1; got %d", v.name, v.n)
		}
	}
	if c.Routing != scheduler.RoutingCacheAware && c.Routing != scheduler.RoutingLeastLoaded {
		return fmt.Errorf("--routing must be %s or %s; got %q", scheduler.RoutingCacheAware, scheduler.RoutingLeastLoaded, c.Routing)
	}
	if c.DrainDelay < 0 || c.DrainTimeout < 0 {
		return fmt.Errorf("--drain-delay and --drain-timeout must not be negative; got %v and %v", c.DrainDelay, c.DrainTimeout)
	}
	if c.PrefillStep < 0 {
		return fmt.Errorf("--prefill-step must be at least 0 (0: the worker's default); got %d", c.PrefillStep)
	}
	if c.PrefillBatch < 0 {
		return fmt.Errorf("--prefill-batch must be at least 0 (0: the batch size); got %d", c.PrefillBatch)
	}
	if c.Dequantize != "auto" && c.Dequantize != "on" && c.Dequantize != "off" {
		return fmt.Errorf("--dequantize must be auto, on or off; got %q", c.Dequantize)
	}
	if c.PromptCacheBytes < -1 {
		return fmt.Errorf("--prompt-cache-bytes must be at least -1 (-1: each worker's default, by its device; 0: off); got %d", c.PromptCacheBytes)
	}
	if min(c.TuneMin, c.BatchSize) < 1 || (c.AutoTune && c.TuneMax < c.TuneMin) {
		return fmt.Errorf("auto-tune bounds [%d, %d] are not a valid range", c.TuneMin, c.TuneMax)
	}
	if c.MaxLoadedModels < 0 || c.ModelMaxWaiting < 1 || c.LoadTimeout <= 0 {
		return fmt.Errorf("--max-loaded-models must be at least 0, --model-max-waiting at least 1 and --load-timeout positive; got %d, %d and %v",
			c.MaxLoadedModels, c.ModelMaxWaiting, c.LoadTimeout)
	}
	physical := models.PhysicalMemory()
	budgetText := c.MemoryBudget
	maxLoaded := c.MaxLoadedModels
	var fileModels []modelEntry
	if c.ConfigFile != "" {
		fc, err := loadConfigFile(c.ConfigFile)
		if err != nil {
			return err
		}
		fileModels = fc.Models
		if !c.given["memory-budget"] && fc.MemoryBudget != "" {
			budgetText = fc.MemoryBudget
		}
		if !c.given["max-loaded-models"] && fc.MaxLoadedModels != nil {
			maxLoaded = *fc.MaxLoadedModels
		}
	}
	budget, err := parseBudget(budgetText, physical)
	if err != nil {
		return fmt.Errorf("--memory-budget %w", err)
	}
	var flagModels []modelEntry
	for _, v := range c.Models {
		flagModels = append(flagModels, parseModelFlag(v, c.API.ModelName))
	}
	var hf *hostFile
	groupSet := c.given["group-size"]
	if c.HostFile != "" {
		if hf, err = loadHostFile(c.HostFile); err != nil {
			return err
		}
		n := len(hf.Hosts)
		if groupSet && c.GroupSize != n {
			return fmt.Errorf("--group-size %d, but --hostfile %s lists %d hosts: with a host file the group size is its number of hosts (leave out --group-size)", c.GroupSize, c.HostFile, n)
		}
		for _, e := range fileModels {
			if e.GroupSize > 0 && e.GroupSize != n {
				return fmt.Errorf("%s: model %q has group_size %d, but --hostfile %s lists %d hosts (with a host file the group size is its number of hosts)", c.ConfigFile, e.Name, e.GroupSize, c.HostFile, n)
			}
		}
		c.GroupSize, groupSet = n, true
	} else if c.given["ssh"] || c.given["ring-port"] {
		log.Warn("--ssh and --ring-port apply to --hostfile only; ignored")
	}
	specs, err := mergeModels(fileModels, flagModels, modelSettings{Workers: c.Workers, BatchSize: c.BatchSize,
		GroupSize: c.GroupSize, WorkersSet: c.given["workers"], BatchSet: c.given["batch-size"], GroupSet: groupSet})
	if err != nil {
		return err
	}
	sigCtx, stopSignals := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	defer stopSignals()

	python := findPython(c.Python)
	env := workerEnv(os.Environ(), !c.AllowOnline)
	var hosts *supervisor.Hosts
	if hf != nil {
		if hosts, err = groupHosts(hf, c, python); err != nil {
			return err
		}
		for r, h := range hosts.Hosts {
			how := "over " + hosts.SSH[0]
			if h.Local() {
				how = "on this machine"
			}
			log.Info("group rank", "rank", r, "host", h.SSH, "ips", h.IPs, "started", how)
		}
	}
	if len(specs) == 0 {
		t0 := time.Now()
		dir, err := prepareDefaultModel(sigCtx, python, blasThreads(env, runtime.NumCPU(), c.Workers), log)
		if err != nil {
			return err
		}
		log.Info("default model ready", "dir", dir, "seconds", time.Since(t0).Seconds())
		specs, _ = mergeModels(nil, []modelEntry{{Name: c.API.ModelName, Path: dir, where: "the default model"}},
			modelSettings{Workers: c.Workers, BatchSize: c.BatchSize, GroupSize: c.GroupSize})
	}
	places := models.DefaultPlaces()
	for i := range specs {
		s := &specs[i]
		if s.Path, err = resolveModelPath(s.Path, c.AllowOnline, places); err != nil {
			return err
		}
		if s.Workers < 1 || s.BatchSize < 1 {
			return fmt.Errorf("model %q: workers and batch_size must be at least 1; got %d and %d", s.Name, s.Workers, s.BatchSize)
		}
		if s.GroupSize > 1 && c.WorkerExec == "" {
			if err := checkGroup(sigCtx, python, env, s.Path, s.GroupSize); err != nil {
				return fmt.Errorf("model %q: %w", s.Name, err)
			}
		}
		remote := 0 // ranks of each group on other machines
		if hosts != nil && s.GroupSize > 1 {
			for _, h := range hosts.Hosts {
				if !h.Local() {
					remote++
				}
			}
		}
		if est, detail, err := models.Estimate(models.EstimateInput{Dir: s.Path, Workers: s.Workers, Batch: max(s.BatchSize, c.TuneMax),
			Dequantize: c.Dequantize, CPU: runtime.GOOS == "linux", Physical: physical, GroupSize: s.GroupSize, RemoteRanks: remote}); err == nil {
			s.Estimate = est
			log.Info("model", "name", s.Name, "path", s.Path, "estimated_bytes", est, "estimate", detail,
				"ttl", models.FormatTTL(s.TTL), "preload", s.Preload, "pin", s.Pin, "aliases", s.Aliases)
		} else {
			log.Info("model", "name", s.Name, "path", s.Path, "estimate", "unknown: "+err.Error())
		}
	}

	// Instruments: one registry; each model's series carry its label (the
	// directory's name when one model is served, as before; else its name).
	single := len(specs) == 1
	build := metrics.BuildInfo{Version: version, GoVersion: runtime.Version()}
	var m *metrics.Metrics
	parts := map[string]modelParts{}
	var names []string
	if single {
		m = metrics.New(metrics.ModelInfo{Model: filepath.Base(specs[0].Path)}, build)
		parts[specs[0].Name] = modelParts{m: m, stats: metrics.NewStats(time.Now)}
		names = []string{filepath.Base(specs[0].Path)}
	} else {
		m = metrics.New(metrics.ModelInfo{Model: ""}, build) // the front door's own series, for no model in particular
		for _, s := range specs {
			parts[s.Name] = modelParts{m: m.ForModel(metrics.ModelInfo{Model: s.Name}, build), stats: metrics.NewStats(time.Now)}
			names = append(names, s.Name)
		}
	}
	label := func(name string) string {
		if single {
			return names[0]
		}
		return name
	}
	mset := m.Models(names, models.States, models.LoadResults, models.EvictReasons)
	mset.Budget.Set(float64(budget))
	builder := &modelBuilder{c: c, python: python, env: env, log: log, parts: parts, hosts: hosts,
		deviceShare: deviceShare(specs, maxLoaded)}
	mgr, err := models.New(models.Config{
		Models: specs, Load: builder.load, MemoryBudget: budget, MaxLoaded: maxLoaded, MaxWaiting: c.ModelMaxWaiting,
		LoadTimeout: c.LoadTimeout, MinResidency: c.MinResidency, AgeCap: c.SwapAgeCap, Log: log,
		Hooks: models.Hooks{
			State: func(model, state string) { mset.SetState(label(model), state) },
			Load: func(model, result string, seconds float64) {
				mset.Loads.WithLabelValues(label(model), result).Inc()
				mset.LoadDuration.WithLabelValues(label(model)).Observe(seconds)
			},
			Evict: func(model, reason string) { mset.Evictions.WithLabelValues(label(model), reason).Inc() },
			Memory: func(model string, estimated, measured int64) {
				mset.Memory.WithLabelValues(label(model), "estimated").Set(float64(estimated))
				mset.Memory.WithLabelValues(label(model), "measured").Set(float64(measured))
			},
		},
	})
	if err != nil {
		return err
	}

	var ids atomic.Uint64
	nextID := func() uint64 { return ids.Add(1) }
	ops := &ops{mgr: mgr, parts: parts, started: time.Now(), single: single}
	apiCfg := c.API
	apiCfg.APIKey, apiCfg.ProtectOps, apiCfg.LogPrompts = c.APIKey, c.ProtectOps, c.LogPrompts
	front := api.NewModels(apiCfg, mgr, ops, m, log, nextID)

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
	log.Info("krserve listening", "addr", "http://"+ln.Addr().String(), "models", len(specs), "workers", c.Workers, "batch_size", c.BatchSize,
		"window_ms", c.WindowMS, "auto_tune", c.AutoTune, "memory_budget", budget, "max_loaded_models", maxLoaded,
		"metrics_addr", c.MetricsAddr, "python", python)
	if c.Host != "127.0.0.1" && c.Host != "localhost" && c.Host != "::1" {
		log.Warn("listening beyond loopback", "host", c.Host, "api_key_set", c.APIKey != "")
	}

	// Actors: they start together; the first to return ends the others.
	mgrCtx, stopMgr := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Add(1)
	go func() { defer wg.Done(); errs <- mgr.Run(mgrCtx) }()
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

	var runErr error
	select {
	case <-sigCtx.Done():
		// /ready turns 503 at once; requests are admitted for the drain
		// delay, then refused with 503 while in-flight ones finish.
		runErr = drainAfterSignal(stopPlan{Delay: c.DrainDelay, Timeout: c.DrainTimeout}, ops.leave, mgr, errs, time.After, log)
	case runErr = <-errs:
		log.Error("shutting down after failure", "err", runErr)
		ops.leave()
		drainFor(c.DrainTimeout, mgr, time.After, log)
	}
	// Let handlers write their last bytes, then stop workers and listeners.
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutCtx)
	if metricsSrv != nil {
		_ = metricsSrv.Shutdown(shutCtx)
	}
	stopMgr()
	wg.Wait()
	log.Info("stopped")
	return runErr
}

// resolveModelPath turns a configured path into the model directory the
// workers load: a directory with config.json (~/ expanded), a repo id found
// in the Hugging Face cache (offline), or, with --allow-online, a repo id the
// workers may download.
func resolveModelPath(p string, online bool, places models.Places) (string, error) {
	dir := expandHome(p)
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		dir, _ = filepath.Abs(dir)
		if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
			return "", fmt.Errorf("--model %q is not an mlx-lm model directory: it has no config.json", dir)
		}
		return dir, nil
	}
	if snap, ok := places.HFSnapshot(p); ok {
		return snap, nil
	}
	if !online || !strings.Contains(p, "/") || strings.HasPrefix(p, ".") || strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("--model %q: no such directory, nor a repo id in the Hugging Face cache %s (`krserve models` lists what is there; downloading needs --allow-online and a network)", p, places.HFHub())
	}
	return p, nil
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

// ops answers /ready and /stats from the models and their pools and
// schedulers.
type ops struct {
	mgr     *models.Manager
	parts   map[string]modelParts
	started time.Time
	single  bool        // one model: /ready and /stats keep their one-model shape
	leaving atomic.Bool // a signal came: not ready, whether or not the models refuse yet
}

// leave makes /ready answer 503 from now on.
func (o *ops) leave() { o.leaving.Store(true) }

// Ready answers /ready: with one model, whether it can serve; with several,
// whether the server takes requests (models load on demand) and each one's
// state. ReadyModel answers /ready?model=NAME.
func (o *ops) Ready() (bool, any) {
	if o.leaving.Load() {
		return false, map[string]any{"status": "draining", "reason": "server is shutting down: in-flight requests finish, new ones get 503"}
	}
	if o.single {
		return o.ReadyModel(o.mgr.Names()[0])
	}
	states := map[string]string{}
	for _, s := range o.mgr.Status() {
		states[s.Name] = s.State
	}
	return true, map[string]any{"status": "ready", "models": states}
}

// ReadyModel is one model's readiness: loaded with a healthy worker.
func (o *ops) ReadyModel(name string) (bool, any) {
	if o.leaving.Load() {
		return false, map[string]any{"status": "draining", "reason": "server is shutting down: in-flight requests finish, new ones get 503"}
	}
	st, ok := o.mgr.StatusOf(name)
	if !ok {
		return false, nil
	}
	inst, _ := o.mgr.Instance(name).(*modelRuntime)
	if st.State != models.StateReady || inst == nil {
		body := map[string]any{"status": st.State, "model": name, "workers_healthy": 0, "workers_total": st.Workers}
		switch st.State {
		case models.StateLoading:
			body["status"], body["reason"] = "loading", "loading the model"
		case models.StateFailed:
			body["reason"] = "the model failed to load: " + st.Reason
		case models.StateDraining:
			body["reason"] = "the model is being unloaded"
		default:
			body["reason"] = "the model is not loaded; a request loads it"
		}
		return false, body
	}
	if inst.Scheduler.Draining() {
		return false, map[string]any{"status": "draining", "reason": "server is shutting down: in-flight requests finish, new ones get 503"}
	}
	healthy, loading, failed := 0, 0, 0
	var reasons []string
	for _, s := range inst.Pool.Status() {
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
	workers := st.Workers
	body := map[string]any{"workers_healthy": healthy, "workers_total": workers}
	if !o.single {
		body["model"] = name
	}
	switch {
	case healthy == workers:
		body["status"] = "ready"
		return true, body
	case healthy > 0:
		body["status"] = "degraded"
		body["reason"] = fmt.Sprintf("degraded: %d of %d workers healthy", healthy, workers)
		body["details"] = reasons
		return true, body
	case loading > 0 && failed == 0 && inst.Pool.Hello() == nil:
		body["status"] = "loading"
		body["reason"] = "loading the model"
	case failed == workers:
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

// modelStats is one model's part of /stats.
func (o *ops) modelStats(st models.Status) map[string]any {
	doc := map[string]any{"state": st.State, "server": o.parts[st.Name].stats.Snapshot(),
		"scheduler": nil, "workers": []supervisor.SlotStatus{}, "model": nil}
	if inst, _ := o.mgr.Instance(st.Name).(*modelRuntime); inst != nil {
		doc["scheduler"], doc["workers"], doc["model"] = inst.Scheduler.State(), inst.Pool.Status(), inst.Pool.Hello()
	}
	return doc
}

// Stats answers /stats: per model its request statistics, scheduler,
// workers and hello; with one model those are also the top-level keys, as
// they always were.
func (o *ops) Stats() any {
	all := map[string]any{}
	doc := map[string]any{"uptime_s": time.Since(o.started).Seconds(), "models": all}
	for _, st := range o.mgr.Status() {
		ms := o.modelStats(st)
		all[st.Name] = ms
		if o.single {
			for _, k := range []string{"server", "scheduler", "workers", "model"} {
				doc[k] = ms[k]
			}
		}
	}
	return doc
}
