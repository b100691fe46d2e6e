package models

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// EstimateInput is what a model's memory estimate depends on.
type EstimateInput struct {
	Dir        string
	Workers    int    // each loads its own copy
	Batch      int    // sequences a worker decodes at once (B)
	Dequantize string // the workers' --dequantize: auto, on or off
	// CPU: workers run on mlx's CPU device (Linux), where auto dequantizes
	// quantized weights to float32 when they fit in a quarter of memory
	// (krserve_worker.worker.dequantize_for_cpu).
	CPU      bool
	Physical int64 // the machine's memory (0: unknown)
}

// Estimate is a model's bytes before it has been loaded: per worker, its
// weights as the worker will hold them (the files on disk, times the
// dequantization factor where the worker turns quantized weights into
// float32) plus a KV cache for Batch sequences at the full context length.
// The KV part is the worst case; once loaded, what the workers measure
// replaces the whole estimate. detail says how it was reached.
func Estimate(in EstimateInput) (bytes int64, detail string, err error) {
	disk, err := weightBytes(in.Dir)
	if err != nil {
		return 0, "", err
	}
	cfg, err := readModelConfig(in.Dir)
	if err != nil {
		return 0, "", err
	}
	weights := disk
	elem := int64(2)
	if cfg.DType == "float32" {
		elem = 4
	}
	how := "weights as on disk"
	if cfg.Bits > 0 {
		// Packed weights plus a float16 scale and bias per group.
		perWeight := float64(cfg.Bits) + 32/float64(max(cfg.GroupSize, 1))
		f32 := int64(float64(disk) * 32 / perWeight)
		deq := in.Dequantize == "on" || (in.Dequantize == "auto" && in.CPU && (in.Physical == 0 || f32 <= in.Physical/4))
		if deq {
			weights, elem = f32, 4
			how = fmt.Sprintf("%d-bit weights dequantized to float32 (x%.1f)", cfg.Bits, 32/perWeight)
		} else {
			how = fmt.Sprintf("%d-bit weights kept quantized", cfg.Bits)
		}
	} else if in.CPU {
		elem = 4 // float16 activations fall back to float32 on the CPU device
	}
	kv := 2 * int64(cfg.Layers) * int64(cfg.KVHeads) * int64(cfg.HeadDim) * int64(cfg.Context) * int64(max(in.Batch, 1)) * elem
	workers := int64(max(in.Workers, 1))
	total := workers * (weights + kv)
	detail = fmt.Sprintf("%d worker(s) x (%s %s + KV %s for %d sequences of %d tokens)",
		workers, FormatBytes(weights), how, FormatBytes(kv), max(in.Batch, 1), cfg.Context)
	return total, detail, nil
}

func weightBytes(dir string) (int64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".safetensors") || strings.HasSuffix(e.Name(), ".gguf") {
			st, err := os.Stat(filepath.Join(dir, e.Name())) // follows the HF cache's symlinks
			if err != nil {
				return 0, err
			}
			n += st.Size()
		}
	}
	if n == 0 {
		return 0, fmt.Errorf("%s has no .safetensors or .gguf weights", dir)
	}
	return n, nil
}

type modelConfig struct {
	Layers, KVHeads, HeadDim, Context int
	Bits, GroupSize                   int
	DType                             string
}

func readModelConfig(dir string) (modelConfig, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return modelConfig{}, err
	}
	type arch struct {
		Layers   int    `json:"num_hidden_layers"`
		Heads    int    `json:"num_attention_heads"`
		KVHeads  int    `json:"num_key_value_heads"`
		HeadDim  int    `json:"head_dim"`
		Hidden   int    `json:"hidden_size"`
		Context  int    `json:"max_position_embeddings"`
		DType    string `json:"torch_dtype"`
		DType2   string `json:"dtype"`
		QuantCfg *struct {
			Bits      int `json:"bits"`
			GroupSize int `json:"group_size"`
		} `json:"quantization"`
	}
	var raw struct {
		arch
		Text *arch `json:"text_config"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return modelConfig{}, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	a := raw.arch
	if a.Layers == 0 && raw.Text != nil {
		q := a.QuantCfg
		a = *raw.Text
		if a.QuantCfg == nil {
			a.QuantCfg = q
		}
	}
	c := modelConfig{Layers: a.Layers, KVHeads: a.KVHeads, HeadDim: a.HeadDim, Context: a.Context, DType: a.DType}
	if c.DType == "" {
		c.DType = a.DType2
	}
	if c.KVHeads == 0 {
		c.KVHeads = a.Heads
	}
	if c.HeadDim == 0 && a.Heads > 0 {
		c.HeadDim = a.Hidden / a.Heads
	}
	if c.Context == 0 {
		c.Context = 4096
	}
	if a.QuantCfg != nil {
		c.Bits, c.GroupSize = a.QuantCfg.Bits, a.QuantCfg.GroupSize
	}
	return c, nil
}

// PhysicalMemory is the machine's memory in bytes (0 if unknown).
func PhysicalMemory() int64 {
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				f := strings.Fields(rest)
				if len(f) > 0 {
					if kb, err := strconv.ParseInt(f[0], 10, 64); err == nil {
						return kb << 10
					}
				}
			}
		}
	}
	if runtime.GOOS == "darwin" {
		if out, err := exec.Command("sysctl", "-n", "hw.memsize").Output(); err == nil {
			if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil {
				return n
			}
		}
	}
	return 0
}
