package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/krserve/krserve/models"
)

func TestApplyEnv(t *testing.T) {
	cases := []struct {
		name    string
		env     map[string]string
		args    []string
		check   func(c upConfig) bool
		wantErr string
	}{
		{"kr-serve-mlx batch size", map[string]string{"MLX_GPU_SCHEDULER_BATCH_SIZE": "12"}, nil,
			func(c upConfig) bool { return c.BatchSize == 12 }, ""},
		{"flag wins over env", map[string]string{"MLX_GPU_SCHEDULER_BATCH_SIZE": "12"}, []string{"--batch-size", "3"},
			func(c upConfig) bool { return c.BatchSize == 3 }, ""},
		{"window and target", map[string]string{"MLX_GPU_SCHEDULER_WINDOW_MS": "1.5", "MLX_GPU_SCHEDULER_P99_THRESHOLD_MS": "80"}, nil,
			func(c upConfig) bool { return c.WindowMS == 1.5 && c.P99TargetMS == 80 }, ""},
		{"auto-tune on/off words", map[string]string{"MLX_AUTO_TUNE": "on", "MLX_AUTO_TUNE_MIN_BATCH": "3", "MLX_AUTO_TUNE_MAX_BATCH": "24",
			"MLX_AUTO_TUNE_EMA_ALPHA": "0.5", "MLX_AUTO_TUNE_INTERVAL": "4"}, nil,
			func(c upConfig) bool {
				return c.AutoTune && c.TuneMin == 3 && c.TuneMax == 24 && c.TuneAlpha == 0.5 && c.TuneInterval == 4
			}, ""},
		{"metrics export default port", map[string]string{"MLX_METRICS_EXPORT": "on"}, nil,
			func(c upConfig) bool { return c.MetricsAddr == "127.0.0.1:9090" }, ""},
		{"metrics export custom port", map[string]string{"MLX_METRICS_EXPORT": "true", "MLX_METRICS_PORT": "9191"}, nil,
			func(c upConfig) bool { return c.MetricsAddr == "127.0.0.1:9191" }, ""},
		{"metrics export off", map[string]string{"MLX_METRICS_EXPORT": "off", "MLX_METRICS_PORT": "9191"}, nil,
			func(c upConfig) bool { return c.MetricsAddr == "" }, ""},
		{"api key", map[string]string{"KRSERVE_API_KEY": "s3cret"}, nil,
			func(c upConfig) bool { return c.APIKey == "s3cret" }, ""},
		{"bad number names the variable", map[string]string{"MLX_GPU_SCHEDULER_BATCH_SIZE": "many"}, nil, nil, "MLX_GPU_SCHEDULER_BATCH_SIZE"},
		{"bad on/off", map[string]string{"MLX_AUTO_TUNE": "maybe"}, nil, nil, "MLX_AUTO_TUNE"},
		{"bad port", map[string]string{"MLX_METRICS_EXPORT": "on", "MLX_METRICS_PORT": "99999"}, nil, nil, "MLX_METRICS_PORT"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var c upConfig
			cmd := newUpCmdFor(&c)
			if err := cmd.Flags().Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			err := applyEnv(cmd.Flags(), func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok })
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want error naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(c) {
				t.Fatalf("config not as expected: %+v", c)
			}
		})
	}
}

func TestWorkerEnvIsBuiltNotInherited(t *testing.T) {
	env := workerEnv([]string{"PATH=/bin", "HOME=/root", "KRSERVE_API_KEY=s3cret", "AWS_SECRET_ACCESS_KEY=x",
		"GITHUB_TOKEN=y", "OPENAI_API_KEY=z", "MLX_METAL_DEBUG=1", "RANDOM_THING=1", "KRSERVE_WORKER_NOISE=1"}, true)
	for _, bad := range []string{"KRSERVE_API_KEY=s3cret", "AWS_SECRET_ACCESS_KEY=x", "GITHUB_TOKEN=y", "OPENAI_API_KEY=z", "RANDOM_THING=1"} {
		if slices.Contains(env, bad) {
			t.Errorf("%s reached the worker", bad)
		}
	}
	for _, good := range []string{"PATH=/bin", "HOME=/root", "MLX_METAL_DEBUG=1", "KRSERVE_WORKER_NOISE=1", "PYTHONUNBUFFERED=1", "HF_HUB_OFFLINE=1"} {
		if !slices.Contains(env, good) {
			t.Errorf("%s missing from the worker environment %v", good, env)
		}
	}
}

func TestBlasThreadsShareTheCores(t *testing.T) {
	for _, tc := range []struct {
		env           []string
		cpus, workers int
		want          string
	}{
		{[]string{"PATH=/bin"}, 16, 4, "OPENBLAS_NUM_THREADS=4"},
		{[]string{"PATH=/bin"}, 2, 1, "OPENBLAS_NUM_THREADS=2"},
		{[]string{"PATH=/bin"}, 2, 3, "OPENBLAS_NUM_THREADS=1"},
		{[]string{"OPENBLAS_NUM_THREADS=7"}, 16, 4, "OPENBLAS_NUM_THREADS=7"},
		{[]string{"OMP_NUM_THREADS=3"}, 16, 4, "OMP_NUM_THREADS=3"},
	} {
		got := blasThreads(tc.env, tc.cpus, tc.workers)
		if !slices.Contains(got, tc.want) {
			t.Errorf("blasThreads(%v, %d, %d) = %v, want %s in it", tc.env, tc.cpus, tc.workers, got, tc.want)
		}
		n := 0
		for _, kv := range got {
			if strings.HasPrefix(kv, "OPENBLAS_NUM_THREADS=") || strings.HasPrefix(kv, "OMP_NUM_THREADS=") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("blasThreads(%v) = %v: %d thread settings, want 1", tc.env, got, n)
		}
	}
}

// TestUpRefusesBadSettings: impossible settings stop `krserve up` before any
// worker starts, with an error naming the flag.
func TestUpRefusesBadSettings(t *testing.T) {
	model := t.TempDir()
	if err := os.WriteFile(filepath.Join(model, "config.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--workers", "0"}, "--workers"},
		{[]string{"--group-size", "0"}, "--group-size"},
		{[]string{"--batch-size", "0"}, "--batch-size"},
		{[]string{"--prefill-step", "-1"}, "--prefill-step"},
		{[]string{"--prefill-batch", "-1"}, "--prefill-batch"},
		{[]string{"--max-crashes", "0"}, "--max-crashes"},
		{[]string{"--poison-after", "0"}, "--poison-after"},
		{[]string{"--probation-tokens", "0"}, "--probation-tokens"},
		{[]string{"--routing", "random"}, "--routing"},
		{[]string{"--dequantize", "yes"}, "--dequantize"},
		{[]string{"--drain-delay", "-1s"}, "--drain-delay"},
		{[]string{"--prompt-cache-bytes", "-2"}, "--prompt-cache-bytes"},
		{[]string{"--auto-tune", "--auto-tune-min", "8", "--auto-tune-max", "4"}, "auto-tune bounds"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var c upConfig
			cmd := newUpCmdFor(&c)
			if err := cmd.Flags().Parse(append([]string{"--model", model, "--log-level", "error"}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			err := runUp(context.Background(), c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming %s", err, tc.want)
			}
		})
	}
}

// The workers' prompt cache arguments: always the number of workers sharing
// the device (--device-share), from which each worker sizes its own default
// budget and, on a CUDA GPU, mlx's memory limit; the bytes when given (flag
// or kr-serve-mlx-era environment variable); a group of ranks runs without
// the cache. Off (0, or a group) also makes routing least-loaded.
func TestWorkerArgsPromptCache(t *testing.T) {
	for _, tc := range []struct {
		name          string
		args          []string
		env           map[string]string
		workers, size int
		want, not     []string // pairs that must and must not be there
		budget        string
		off           bool
	}{
		{"default", nil, nil, 2, 1, []string{"--device-share", "2"}, []string{"--prompt-cache-bytes"}, "auto", false},
		{"-1", []string{"--prompt-cache-bytes", "-1"}, nil, 3, 1, []string{"--device-share", "3"}, []string{"--prompt-cache-bytes"}, "auto", false},
		{"one worker", nil, nil, 1, 1, []string{"--device-share", "1"}, []string{"--prompt-cache-bytes"}, "auto", false},
		{"0: off", []string{"--prompt-cache-bytes", "0"}, nil, 2, 1, []string{"--prompt-cache-bytes", "0", "--device-share", "2"}, nil, "off", true},
		{"N", []string{"--prompt-cache-bytes", "123456789"}, nil, 4, 1, []string{"--prompt-cache-bytes", "123456789", "--device-share", "4"}, nil, "123456789", false},
		{"env N", nil, map[string]string{"KRSERVE_PROMPT_CACHE_BYTES": "777"}, 2, 1, []string{"--prompt-cache-bytes", "777"}, nil, "777", false},
		{"env -1", nil, map[string]string{"KRSERVE_PROMPT_CACHE_BYTES": "-1"}, 2, 1, []string{"--device-share", "2"}, []string{"--prompt-cache-bytes"}, "auto", false},
		{"env 0", nil, map[string]string{"KRSERVE_PROMPT_CACHE_BYTES": "0"}, 2, 1, []string{"--prompt-cache-bytes", "0"}, nil, "off", true},
		{"flag wins over env", []string{"--prompt-cache-bytes", "5"}, map[string]string{"KRSERVE_PROMPT_CACHE_BYTES": "0"}, 2, 1, []string{"--prompt-cache-bytes", "5"}, nil, "5", false},
		{"group of ranks", nil, nil, 2, 2, []string{"--prompt-cache-bytes", "0", "--group-size", "2", "--device-share", "2"}, nil, "off", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c upConfig
			cmd := newUpCmdFor(&c)
			if err := cmd.Flags().Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if err := applyEnv(cmd.Flags(), func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok }); err != nil {
				t.Fatal(err)
			}
			spec := models.Spec{Name: "m", Path: "/models/m", Workers: tc.workers, GroupSize: tc.size}
			args := workerArgs(c, spec, 8, 8, tc.workers)
			if !slices.Equal(args[:4], []string{"-m", "krserve_worker", "--model", "/models/m"}) {
				t.Fatalf("args %q", args)
			}
			for i := 0; i < len(tc.want); i += 2 {
				k := slices.Index(args, tc.want[i])
				if k < 0 || k+1 >= len(args) || args[k+1] != tc.want[i+1] {
					t.Errorf("args %q lack %s %s", args, tc.want[i], tc.want[i+1])
				}
			}
			for _, flag := range tc.not {
				if slices.Contains(args, flag) {
					t.Errorf("args %q have %s", args, flag)
				}
			}
			budget, off := promptCacheSetting(c, spec)
			if !strings.HasPrefix(budget, tc.budget) || off != tc.off {
				t.Errorf("promptCacheSetting = %q, %v; want %q..., %v", budget, off, tc.budget, tc.off)
			}
		})
	}
	if models.PhysicalMemory() <= 0 {
		t.Errorf("models.PhysicalMemory() = %d on this machine (the --help text shows its eighth)", models.PhysicalMemory())
	}
}

// deviceShare counts the workers of every model that may be loaded at once:
// all of them, or those of the --max-loaded-models models with the most.
func TestDeviceShare(t *testing.T) {
	spec := func(workers ...int) []models.Spec {
		var out []models.Spec
		for i, w := range workers {
			out = append(out, models.Spec{Name: fmt.Sprint(i), Workers: w})
		}
		return out
	}
	for _, tc := range []struct {
		name      string
		specs     []models.Spec
		maxLoaded int
		want      int
	}{
		{"one model", spec(2), 0, 2},
		{"two models", spec(2, 1), 0, 3},
		{"three, two at once", spec(1, 3, 2), 2, 5},
		{"limit above the models", spec(1, 1), 5, 2},
		{"one at a time", spec(1, 4, 2), 1, 4},
		{"workers 0 counts as 1", spec(0), 0, 1},
		{"no models", nil, 0, 1},
	} {
		if got := deviceShare(tc.specs, tc.maxLoaded); got != tc.want {
			t.Errorf("%s: deviceShare = %d, want %d", tc.name, got, tc.want)
		}
	}
}
