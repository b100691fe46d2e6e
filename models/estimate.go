package models

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
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
	// (krserve_worker.cpuweights.dequantize_for_cpu).
	CPU      bool
	Physical int64 // the machine's memory (0: unknown)
	// GroupSize: ranks each worker is split over (0 or 1: one process);
	// RemoteRanks: how many of them run on other machines (--hostfile),
	// whose memory the estimate for this one leaves out.
	GroupSize, RemoteRanks int
}

// Estimate is a model's bytes on this machine before it has been loaded:
// per worker, its weights as the worker will hold them (the files on disk,
// times the dequantization factor where the worker turns quantized weights
// into float32) plus a KV cache for Batch sequences at the full context
// length. The KV part is the worst case; once loaded, what the workers
// measure replaces the whole estimate. detail says how it was reached.
//
// A worker that is a group of N ranks (tensor parallel, mlx-lm's shard())
// holds per rank the tensors shard() leaves whole (embeddings, norms, the
// output layer) plus 1/N of those it splits (the layers' *_proj
// projections, read from the safetensors headers) and 1/N of the KV cache
// (its KV heads); only the ranks on this machine count. The Python process
// of each worker or rank (~100 MiB measured on Linux) is counted for none.
func Estimate(in EstimateInput) (bytes int64, detail string, err error) {
	group := in.GroupSize > 1
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
		deq = deq && !group // a group's sharded layers are not nn.QuantizedLinear: kept as stored
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
	if group {
		total, detail := groupEstimate(in, disk, kv, how)
		return workers * total, fmt.Sprintf("%d worker(s) x %s", workers, detail), nil
	}
	total := workers * (weights + kv)
	detail = fmt.Sprintf("%d worker(s) x (%s %s + KV %s for %d sequences of %d tokens)",
		workers, FormatBytes(weights), how, FormatBytes(kv), max(in.Batch, 1), cfg.Context)
	return total, detail, nil
}

// groupEstimate is one worker's bytes on this machine when it is a group:
// its local ranks, each with the weights shard() leaves whole, its share of
// the split ones and of the KV cache (whole: one process's).
func groupEstimate(in EstimateInput, disk, kv int64, how string) (int64, string) {
	n := int64(in.GroupSize)
	local := max(n-int64(max(in.RemoteRanks, 0)), 0)
	split, whole, ok := weightSplit(in.Dir)
	weights := fmt.Sprintf("%s whole + 1/%d of %s split (%s)", FormatBytes(whole), n, FormatBytes(split), how)
	if !ok { // no safetensors header to read: every rank counted with all of it
		split, whole = 0, disk
		weights = fmt.Sprintf("%s %s, split unknown: counted whole", FormatBytes(disk), how)
	}
	perRank := whole + split/n + kv/n
	return local * perRank, fmt.Sprintf("%d of %d ranks here x (%s + KV %s/%d)", local, n, weights, FormatBytes(kv), n)
}

// weightSplit reads the safetensors headers in dir and returns the bytes of
// the tensors a tensor-parallel shard() splits over the ranks (those in a
// layer whose name has a *_proj component: attention and MLP projections,
// with a quantized one's scales and biases) and of the rest, which every rank
// holds whole. ok is false without a readable safetensors file.
func weightSplit(dir string) (split, whole int64, ok bool) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, false
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".safetensors") {
			continue
		}
		tensors, err := safetensorsHeader(filepath.Join(dir, e.Name()))
		if err != nil {
			return 0, 0, false
		}
		for name, size := range tensors {
			if isSplit(name) {
				split += size
			} else {
				whole += size
			}
		}
		ok = true
	}
	return split, whole, ok
}

func isSplit(name string) bool {
	if !strings.HasPrefix(name, "layers.") && !strings.Contains(name, ".layers.") {
		return false
	}
	for _, part := range strings.Split(name, ".") {
		if strings.HasSuffix(part, "_proj") {
			return true
		}
	}
	return false
}

// safetensorsHeader is each tensor's size in bytes, from a safetensors
// file's header (8-byte little-endian length, then JSON).
func safetensorsHeader(path string) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var n [8]byte
	if _, err := io.ReadFull(f, n[:]); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	size := binary.LittleEndian.Uint64(n[:])
	if size == 0 || size > 100<<20 {
		return nil, fmt.Errorf("%s: header of %d bytes", path, size)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var h map[string]json.RawMessage
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := map[string]int64{}
	for name, raw := range h {
		if name == "__metadata__" {
			continue
		}
		var t struct {
			Offsets [2]int64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &t); err != nil {
			return nil, fmt.Errorf("%s: tensor %s: %w", path, name, err)
		}
		out[name] = t.Offsets[1] - t.Offsets[0]
	}
	return out, nil
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
