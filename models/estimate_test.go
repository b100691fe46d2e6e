package models

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func modelDir(t *testing.T, config string, weights int) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), make([]byte, weights), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestEstimate(t *testing.T) {
	// 2 layers, 2 KV heads of 16, context 1024: KV per token and sequence = 2*2*2*16 elements.
	const arch = `"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "max_position_embeddings": 1024`
	q4 := modelDir(t, `{`+arch+`, "torch_dtype": "bfloat16", "quantization": {"bits": 4, "group_size": 64}}`, 4500)
	f16 := modelDir(t, `{`+arch+`, "torch_dtype": "float16"}`, 1000)
	kvElems := int64(2 * 2 * 2 * 16 * 1024)
	for _, tc := range []struct {
		name string
		in   EstimateInput
		want int64
	}{
		{"4-bit dequantized on the CPU", EstimateInput{Dir: q4, Workers: 1, Batch: 1, Dequantize: "auto", CPU: true}, 32000 + kvElems*4},
		{"4-bit kept on a GPU", EstimateInput{Dir: q4, Workers: 1, Batch: 1, Dequantize: "auto"}, 4500 + kvElems*2},
		{"4-bit kept: float32 over a quarter of memory", EstimateInput{Dir: q4, Workers: 1, Batch: 1, Dequantize: "auto", CPU: true, Physical: 100000}, 4500 + kvElems*2},
		{"4-bit, --dequantize off", EstimateInput{Dir: q4, Workers: 1, Batch: 1, Dequantize: "off", CPU: true}, 4500 + kvElems*2},
		{"B sequences, each worker", EstimateInput{Dir: q4, Workers: 2, Batch: 8, Dequantize: "on"}, 2 * (32000 + 8*kvElems*4)},
		{"float16 on the CPU computes in float32", EstimateInput{Dir: f16, Workers: 1, Batch: 1, CPU: true}, 1000 + kvElems*4},
		{"float16 on a GPU", EstimateInput{Dir: f16, Workers: 1, Batch: 1}, 1000 + kvElems*2},
	} {
		got, detail, err := Estimate(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("%s: Estimate = %d (%s), %v; want %d", tc.name, got, detail, err, tc.want)
		}
	}
	if _, _, err := Estimate(EstimateInput{Dir: t.TempDir()}); err == nil {
		t.Error("a directory without weights has no estimate")
	}
}

// writeSafetensors writes a safetensors file of tensors (name: bytes) whose
// data is zeros.
func writeSafetensors(t *testing.T, path string, tensors map[string]int64) {
	t.Helper()
	h := map[string]any{"__metadata__": map[string]string{"format": "mlx"}}
	var off int64
	for name, n := range tensors {
		h[name] = map[string]any{"dtype": "F32", "shape": []int64{n / 4}, "data_offsets": []int64{off, off + n}}
		off += n
	}
	b, _ := json.Marshal(h)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(b)))
	out = append(append(out, b...), make([]byte, off)...)
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A group of N ranks: each holds what shard() leaves whole, 1/N of the
// layers' projections and 1/N of the KV cache; only the ranks here count.
// The tensor names and the split are the tiny llama's, whose per-rank
// parameter bytes under mlx-lm's sharded_load with 2 ranks were measured:
// 263424 whole + 294912/2.
func TestEstimateGroup(t *testing.T) {
	const arch = `"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "max_position_embeddings": 1024`
	dir := modelDir(t, `{`+arch+`, "torch_dtype": "float32"}`, 0)
	os.Remove(filepath.Join(dir, "model.safetensors"))
	tensors := map[string]int64{"lm_head.weight": 131072, "model.embed_tokens.weight": 131072, "model.norm.weight": 256}
	for _, l := range []string{"0", "1"} {
		p := "model.layers." + l + "."
		tensors[p+"input_layernorm.weight"], tensors[p+"post_attention_layernorm.weight"] = 256, 256
		tensors[p+"self_attn.q_proj.weight"], tensors[p+"self_attn.o_proj.weight"] = 16384, 16384
		tensors[p+"self_attn.k_proj.weight"], tensors[p+"self_attn.v_proj.weight"] = 8192, 8192
		tensors[p+"mlp.gate_proj.weight"], tensors[p+"mlp.up_proj.weight"], tensors[p+"mlp.down_proj.weight"] = 32768, 32768, 32768
	}
	writeSafetensors(t, filepath.Join(dir, "model.safetensors"), tensors)
	split, whole, ok := weightSplit(dir)
	if !ok || split != 294912 || whole != 263424 {
		t.Fatalf("weightSplit = %d split, %d whole, %v; want 294912, 263424", split, whole, ok)
	}
	kv := int64(2*2*2*16*1024) * 4 * 8 // float32, 8 sequences
	st, _ := os.Stat(filepath.Join(dir, "model.safetensors"))
	disk := st.Size() // the tensors and the header
	for _, tc := range []struct {
		name string
		in   EstimateInput
		want int64
	}{
		{"one process", EstimateInput{Dir: dir, Workers: 1, Batch: 8}, disk + kv},
		{"2 ranks here", EstimateInput{Dir: dir, Workers: 1, Batch: 8, GroupSize: 2}, 2 * (whole + split/2 + kv/2)},
		{"2 workers of 2 ranks", EstimateInput{Dir: dir, Workers: 2, Batch: 8, GroupSize: 2}, 2 * 2 * (whole + split/2 + kv/2)},
		{"1 of 2 ranks here (--hostfile)", EstimateInput{Dir: dir, Workers: 1, Batch: 8, GroupSize: 2, RemoteRanks: 1}, whole + split/2 + kv/2},
		{"every rank elsewhere", EstimateInput{Dir: dir, Workers: 1, Batch: 8, GroupSize: 2, RemoteRanks: 2}, 0},
	} {
		got, detail, err := Estimate(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("%s: Estimate = %d (%s), %v; want %d", tc.name, got, detail, err, tc.want)
		}
	}
	// A quantized model's group keeps its weights as stored: --dequantize does not apply.
	q := modelDir(t, `{`+arch+`, "torch_dtype": "bfloat16", "quantization": {"bits": 4, "group_size": 64}}`, 0)
	writeSafetensors(t, filepath.Join(q, "model.safetensors"), map[string]int64{"model.embed_tokens.weight": 1000, "model.layers.0.self_attn.q_proj.scales": 4000})
	got, detail, err := Estimate(EstimateInput{Dir: q, Workers: 1, Batch: 1, GroupSize: 2, Dequantize: "on", CPU: true})
	kvq := int64(2*2*2*16*1024) * 2
	if err != nil || got != 2*(1000+4000/2+kvq/2) || !strings.Contains(detail, "kept quantized") {
		t.Errorf("quantized group: %d (%s), %v; want %d, kept quantized", got, detail, err, 2*(1000+4000/2+kvq/2))
	}
	// Without a safetensors header the split is unknown: every rank counts all of it.
	g := modelDir(t, `{`+arch+`, "torch_dtype": "float32"}`, 5000)
	got, detail, err = Estimate(EstimateInput{Dir: g, Workers: 1, Batch: 1, GroupSize: 2})
	if kv1 := kv / 8; err != nil || got != 2*(5000+kv1/2) || !strings.Contains(detail, "split unknown") {
		t.Errorf("no header: %d (%s), %v; want %d", got, detail, err, 2*(5000+kv1/2))
	}
}

func TestParseTTL(t *testing.T) {
	for in, want := range map[string]string{"never": "never", "-1": "never", "-5m": "never", "0": "0s", "300": "5m0s", "10m": "10m0s", "1.5": "1.5s"} {
		d, err := ParseTTL(in)
		if err != nil || FormatTTL(d) != want {
			t.Errorf("ParseTTL(%q) = %v, %v; want %s", in, d, err, want)
		}
	}
	for _, in := range []string{"soon", "", "1e300"} {
		if _, err := ParseTTL(in); err == nil {
			t.Errorf("ParseTTL(%q) accepted", in)
		}
	}
}
