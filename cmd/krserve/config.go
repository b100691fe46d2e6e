package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// envVar documents one environment setting that krserve honours. Every one
// is listed here, in one place; flags given on the command line win.
type envVar struct {
	Name, Flag, Help string
}

// envVars are kr-serve-mlx's settings (so its users keep their environment)
// plus krserve's own.
var envVars = []envVar{
	{"MLX_GPU_SCHEDULER_BATCH_SIZE", "batch-size", "sequences each worker decodes at once (B); the auto-tuner's start"},
	{"MLX_GPU_SCHEDULER_WINDOW_MS", "window-ms", "batching window in milliseconds"},
	{"MLX_GPU_SCHEDULER_P99_THRESHOLD_MS", "p99-target-ms", "auto-tuner target: P99 inter-token latency in milliseconds"},
	{"MLX_AUTO_TUNE", "auto-tune", "on/off: move B toward the latency target"},
	{"MLX_AUTO_TUNE_MIN_BATCH", "auto-tune-min", "smallest B the auto-tuner may choose"},
	{"MLX_AUTO_TUNE_MAX_BATCH", "auto-tune-max", "largest B the auto-tuner may choose"},
	{"MLX_AUTO_TUNE_EMA_ALPHA", "auto-tune-alpha", "EMA smoothing factor of the auto-tuner"},
	{"MLX_AUTO_TUNE_INTERVAL", "auto-tune-interval", "evaluations between ordinary auto-tuner steps"},
	{"MLX_METRICS_EXPORT", "", "on: also serve /metrics on a separate listener (127.0.0.1:MLX_METRICS_PORT)"},
	{"MLX_METRICS_PORT", "", "port of that listener (default 9090)"},
	{"KRSERVE_API_KEY", "api-key", "require Authorization: Bearer <key> on /v1/*"},
	{"KRSERVE_PYTHON", "python", "the Python interpreter that runs workers"},
	{"KRSERVE_MODEL", "model", "model directory (or Hugging Face repo id when online)"},
	{"KRSERVE_WORKERS", "workers", "number of worker processes"},
	{"KRSERVE_PROMPT_CACHE_BYTES", "prompt-cache-bytes", "prompt cache budget per worker in bytes (0: off)"},
	{"KRSERVE_GROUP_SIZE", "group-size", "ranks (processes) each worker is split over (mlx.distributed, tensor parallel)"},
	{"KRSERVE_HOSTFILE", "hostfile", "mlx host file: each worker a group of ranks on its hosts (started over ssh)"},
	{"KRSERVE_SSH", "ssh", "with a host file: the ssh command and its options"},
	{"KRSERVE_RING_PORT", "ring-port", "with a host file: first port of the ring backend and the control link"},
	{"KRSERVE_WORKER_BLAS", "", "passed to workers (Linux CPU): directory with libopenblas.so.0 to load before mlx, or off (default: <venv>/lib/krserve-blas)"},
	{"OPENBLAS_NUM_THREADS", "", "passed to workers: BLAS threads per worker (default: cores / workers)"},
	{"KRSERVE_WORKER_FAULT", "", "passed to workers, a testing aid: crash or hang on chosen prompts (segv-on-prompt:TEXT, segv-after-tokens:N[:TEXT], hang-on-prompt:TEXT; docs/architecture.md)"},
}

// applyEnv sets each flag from its environment variable unless the flag was
// given on the command line. It returns an error naming a bad value.
func applyEnv(fs *pflag.FlagSet, lookup func(string) (string, bool)) error {
	for _, e := range envVars {
		if e.Flag == "" {
			continue
		}
		v, ok := lookup(e.Name)
		if !ok || v == "" {
			continue
		}
		f := fs.Lookup(e.Flag)
		if f == nil || f.Changed {
			continue
		}
		if f.Value.Type() == "bool" {
			b, err := parseOnOff(v)
			if err != nil {
				return fmt.Errorf("%s=%q: %w", e.Name, v, err)
			}
			v = strconv.FormatBool(b)
		}
		if err := f.Value.Set(v); err != nil {
			return fmt.Errorf("%s=%q: %w", e.Name, v, err)
		}
	}
	if f := fs.Lookup("metrics-addr"); f != nil && !f.Changed {
		if v, ok := lookup("MLX_METRICS_EXPORT"); ok && v != "" {
			on, err := parseOnOff(v)
			if err != nil {
				return fmt.Errorf("MLX_METRICS_EXPORT=%q: %w", v, err)
			}
			if on {
				port := "9090"
				if p, ok := lookup("MLX_METRICS_PORT"); ok && p != "" {
					if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
						return fmt.Errorf("MLX_METRICS_PORT=%q: not a port number", p)
					}
					port = p
				}
				if err := f.Value.Set("127.0.0.1:" + port); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// givenFlags names the flags set on the command line or by their
// environment variable: those win over a --config file.
func givenFlags(fs *pflag.FlagSet, lookup func(string) (string, bool)) map[string]bool {
	given := map[string]bool{}
	fs.Visit(func(f *pflag.Flag) { given[f.Name] = true })
	for _, e := range envVars {
		if v, ok := lookup(e.Name); ok && v != "" && e.Flag != "" {
			given[e.Flag] = true
		}
	}
	return given
}

func parseOnOff(v string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "on", "true", "yes", "enabled":
		return true, nil
	case "0", "off", "false", "no", "disabled":
		return false, nil
	}
	return false, fmt.Errorf("want on or off")
}

func msDuration(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }

// workerEnv builds the environment of a worker from an allow-list: nothing
// else (API keys, cloud credentials) reaches the Python process.
func workerEnv(environ []string, offline bool) []string {
	allowPrefix := []string{"LC_", "MLX_", "OPENBLAS_", "OMP_", "KRSERVE_WORKER_", "CUDA_", "NVIDIA_"}
	allow := map[string]bool{"PATH": true, "HOME": true, "USER": true, "LANG": true, "TMPDIR": true, "TZ": true,
		"PYTHONPATH": true, "VIRTUAL_ENV": true, "HF_HOME": true, "XDG_CACHE_HOME": true, "LD_LIBRARY_PATH": true,
		"KRSERVE_CACHE_DIR": true, "MLX_PTX_CACHE_DIR": true, "HF_HUB_OFFLINE": true, "TRANSFORMERS_OFFLINE": true}
	var out []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		if strings.Contains(strings.ToUpper(k), "KEY") || strings.Contains(strings.ToUpper(k), "TOKEN") || strings.Contains(strings.ToUpper(k), "SECRET") {
			continue
		}
		ok := allow[k]
		for _, p := range allowPrefix {
			ok = ok || strings.HasPrefix(k, p)
		}
		if ok {
			out = append(out, kv)
		}
	}
	out = append(out, "PYTHONUNBUFFERED=1", "TOKENIZERS_PARALLELISM=false")
	if offline && os.Getenv("HF_HUB_OFFLINE") == "" {
		out = append(out, "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1")
	}
	return out
}

// blasThreads shares the CPU cores among the workers' BLAS thread pools
// (OpenBLAS, krserve_worker/blas.py): unless the user set
// OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, each worker gets cpus/workers
// threads (at least one), where OpenBLAS would otherwise start one per core in
// every worker and have them spin against each other.
func blasThreads(env []string, cpus, workers int) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "OPENBLAS_NUM_THREADS=") || strings.HasPrefix(kv, "OMP_NUM_THREADS=") {
			return env
		}
	}
	return append(env, "OPENBLAS_NUM_THREADS="+strconv.Itoa(max(1, cpus/max(1, workers))))
}
