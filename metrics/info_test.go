package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestSetInfoReplacesLabels(t *testing.T) {
	m := New(ModelInfo{Model: "smol"}, BuildInfo{Version: "v1"})
	m.SetInfo(ModelInfo{Quantization: "4bit-g32", ContextLength: 8192}, BuildInfo{Version: "v1", MLXVersion: "0.32.4", MLXLMVersion: "0.32.2"})
	want := `
# HELP krserve_model_info Always 1; labels give the served model's quantization and context length in tokens.
# TYPE krserve_model_info gauge
krserve_model_info{context_length="8192",model="smol",quantization="4bit-g32"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "krserve_model_info"); err != nil {
		t.Fatal(err)
	}
	n, err := testutil.GatherAndCount(m.Registry, "krserve_build_info")
	if err != nil || n != 1 {
		t.Fatalf("build_info series: %d, %v", n, err)
	}
}
