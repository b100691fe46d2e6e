package models

import (
	"os"
	"path/filepath"
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
