package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/models"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// modelRuntime is one loaded model: its scheduler and worker pool, running.
// It is what the front door routes a request to (Submit, Cancel, Hello,
// CanServe) and what the models.Manager starts and stops.
type modelRuntime struct {
	*scheduler.Scheduler
	*supervisor.Pool
	stats  *metrics.Stats
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// MemoryBytes is the resident memory its workers report (their last pong);
// for a worker that is a group of ranks, every rank's on this machine (a
// rank over ssh holds its memory on its own host: /stats shows no RSS for it).
func (r *modelRuntime) MemoryBytes() int64 {
	var n int64
	for _, s := range r.Pool.Status() {
		if len(s.Ranks) > 0 {
			for _, rk := range s.Ranks {
				n += rk.RSS
			}
			continue
		}
		n += s.RSS
	}
	return n
}

// Stop stops the workers (staged) and the scheduler and returns once every
// process is reaped.
func (r *modelRuntime) Stop() {
	r.cancel()
	r.wg.Wait()
}

// modelParts are what a model keeps across loads: its instruments.
type modelParts struct {
	m     *metrics.Metrics
	stats *metrics.Stats
}

// modelBuilder builds one model's scheduler and pool from upConfig, the
// way `krserve up` has always built its one model: everything but the path,
// the workers and B is the server's setting.
type modelBuilder struct {
	c      upConfig
	python string
	env    []string
	log    *slog.Logger
	parts  map[string]modelParts
	hosts  *supervisor.Hosts // --hostfile: where each group's ranks run (nil: all here)
	// deviceShare: the most workers of all models that run at once on this
	// machine's device (deviceShare), passed to each as --device-share.
	deviceShare int
}

// deviceShare is how many workers, of all the models, may hold memory on the
// device at once: every model's workers, or, with --max-loaded-models N, the
// workers of the N models with the most. Each worker sizes its default cache
// budget and (on a CUDA GPU) mlx's memory limit by it, so that models loaded
// side by side do not each plan for the whole device.
func deviceShare(specs []models.Spec, maxLoaded int) int {
	n := make([]int, 0, len(specs))
	for _, s := range specs {
		n = append(n, max(s.Workers, 1))
	}
	slices.Sort(n)
	slices.Reverse(n)
	if maxLoaded > 0 && maxLoaded < len(n) {
		n = n[:maxLoaded]
	}
	total := 0
	for _, k := range n {
		total += k
	}
	return max(total, 1)
}

// load is the models.Loader: it starts the model's workers and returns once
// one has said hello, or with the workers' reasons once every one of them
// has failed to start.
func (b *modelBuilder) load(ctx context.Context, spec models.Spec) (models.Instance, error) {
	c := b.c
	log := b.log.With("model", spec.Name)
	parts := b.parts[spec.Name]
	tune := scheduler.TuneConfig{
		Enabled: c.AutoTune, Min: c.TuneMin, Max: c.TuneMax, Initial: spec.BatchSize, Alpha: c.TuneAlpha,
		Interval: c.TuneInterval, Window: c.TuneWindow, Target: msDuration(c.P99TargetMS), Tolerance: msDuration(c.ToleranceMS),
	}
	if !c.AutoTune { // a fixed B is whatever the user asked for
		tune.Min, tune.Max = min(tune.Min, spec.BatchSize), max(tune.Max, spec.BatchSize)
	}
	maxB := max(tune.Max, spec.BatchSize)
	prefillBatch := c.PrefillBatch
	if prefillBatch == 0 {
		prefillBatch = maxB
	}
	scfg := scheduler.DefaultConfig()
	scfg.Window = msDuration(c.WindowMS)
	scfg.MaxQueue, scfg.MaxQueueTokens, scfg.MaxCrashes, scfg.Tune = c.MaxQueue, c.MaxQueueTokens, c.MaxCrashes, tune
	scfg.PoisonAfter, scfg.ProbationTokens, scfg.Log = c.PoisonAfter, c.ProbationTokens, log
	scfg.Routing.Policy, scfg.Routing.BalanceAbs = c.Routing, c.RoutingBalance
	budget, cacheOff := promptCacheSetting(c, spec)
	if cacheOff {
		scfg.Routing.Policy = scheduler.RoutingLeastLoaded // no cache to be near
	}
	log.Info("prompt cache", "bytes_per_worker", budget, "routing", scfg.Routing.Policy)
	sched := scheduler.New(scfg, parts.m, parts.stats)

	type startFailure struct {
		slot int
		err  error
	}
	failures := make(chan startFailure, 64)
	env := blasThreads(b.env, runtime.NumCPU(), spec.Workers*max(spec.GroupSize, 1))
	pcfg := supervisor.DefaultConfig()
	pcfg.Workers = spec.Workers
	pcfg.GroupSize = spec.GroupSize
	if spec.GroupSize > 1 {
		pcfg.Hosts = b.hosts
	}
	pcfg.StartTimeout, pcfg.HeartbeatInterval, pcfg.HeartbeatTimeout = c.StartTimeout, c.Heartbeat, c.HeartbeatLimit
	pcfg.ProgressTimeout, pcfg.StopGrace = c.ProgressTimeout, c.StopGrace
	pcfg.RecycleRequests, pcfg.RecycleRSS = c.RecycleRequests, int64(c.RecycleRSSMB)<<20
	pcfg.OnStartFailure = func(slot int, err error) {
		select {
		case failures <- startFailure{slot, err}:
		default:
		}
	}
	pcfg.Command = func(slot int) supervisor.Command {
		args := workerArgs(c, spec, maxB, prefillBatch, max(b.deviceShare, spec.Workers))
		if c.WorkerExec != "" {
			return supervisor.Command{Path: c.WorkerExec, Env: env, Args: args[2:]}
		}
		return supervisor.Command{Path: b.python, Env: env, Args: args}
	}
	pool := supervisor.NewPool(pcfg, sched, parts.m, log)

	rctx, cancel := context.WithCancel(context.Background())
	r := &modelRuntime{Scheduler: sched, Pool: pool, stats: parts.stats, cancel: cancel}
	r.wg.Add(2)
	go func() { defer r.wg.Done(); _ = sched.Run(rctx) }()
	go func() { defer r.wg.Done(); _ = pool.Run(rctx) }()
	failed := map[int]string{}
	for {
		select {
		case <-pool.Ready():
			if h := pool.Hello(); h != nil {
				parts.m.SetInfo(metrics.ModelInfo{Quantization: quantizationOf(spec.Path), ContextLength: h.Context},
					metrics.BuildInfo{Version: version, MLXVersion: h.Versions["mlx"], MLXLMVersion: h.Versions["mlx_lm"]})
			}
			return r, nil
		case f := <-failures:
			failed[f.slot] = f.err.Error()
			if len(failed) < spec.Workers {
				continue
			}
			r.Stop()
			return nil, errors.New(joinReasons(failed))
		case <-ctx.Done():
			r.Stop()
			return nil, ctx.Err()
		}
	}
}

// promptCacheSetting says, before the workers start, what their prompt cache
// budget is (for the log) and whether it is off for all of them. The default
// (-1) is each worker's to decide, since only it knows its device: "auto"
// here, the bytes in each worker's hello later (a worker whose budget comes
// out 0 is then routed by load: scheduler.WorkerInfo).
func promptCacheSetting(c upConfig, spec models.Spec) (budget string, off bool) {
	switch {
	case spec.GroupSize > 1: // not yet kept in step across a group's ranks
		return "off (a group of ranks)", true
	case c.PromptCacheBytes == 0:
		return "off", true
	case c.PromptCacheBytes > 0:
		return strconv.FormatInt(c.PromptCacheBytes, 10), false
	}
	return "auto (each worker's, by its device)", false
}

// workerArgs is the command line of one of the model's workers (after the
// Python interpreter): -m krserve_worker and its flags.
func workerArgs(c upConfig, spec models.Spec, maxB, prefillBatch, share int) []string {
	args := []string{"-m", "krserve_worker", "--model", spec.Path,
		"--max-batch", strconv.Itoa(maxB),
		"--prefill-batch", strconv.Itoa(prefillBatch), "--dequantize", c.Dequantize}
	if c.PrefillStep > 0 { // else the worker picks by its device
		args = append(args, "--prefill-step", strconv.Itoa(c.PrefillStep))
	}
	// The workers of all models loaded at once share the device's memory:
	// each sizes its default cache budget (and on a CUDA GPU mlx's memory
	// limit) by their number.
	args = append(args, "--device-share", strconv.Itoa(share))
	switch _, off := promptCacheSetting(c, spec); {
	case off:
		args = append(args, "--prompt-cache-bytes", "0")
	case c.PromptCacheBytes > 0: // as given, per worker
		args = append(args, "--prompt-cache-bytes", strconv.FormatInt(c.PromptCacheBytes, 10))
	} // else each worker sizes it by its device
	if spec.GroupSize > 1 {
		args = append(args, "--group-size", strconv.Itoa(spec.GroupSize))
	}
	return args
}

// joinReasons writes the workers' start failures, the same reason once.
func joinReasons(failed map[int]string) string {
	seen := map[string][]int{}
	for slot, why := range failed {
		seen[why] = append(seen[why], slot)
	}
	var parts []string
	for why, slots := range seen {
		sort.Ints(slots)
		parts = append(parts, why)
	}
	sort.Strings(parts)
	if len(failed) == 1 {
		return parts[0]
	}
	return fmt.Sprintf("every worker failed to start: %s", strings.Join(parts, "; "))
}
