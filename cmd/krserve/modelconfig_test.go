package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krserve/krserve/models"
)

func writeFile(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigFile(t *testing.T) {
	p := writeFile(t, t.TempDir(), "krserve.yaml", `
memory_budget: 12GiB
max_loaded_models: 2
models:
  small:
    path: ~/models/small
    aliases: [smol, fast]
    workers: 2
    batch_size: 16
    group_size: 2
    ttl: 10m
    pin: true
    preload: true
  coder: /models/coder
  big:
    path: /models/big
    ttl: never
`)
	fc, err := loadConfigFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if fc.MemoryBudget != "12GiB" || fc.MaxLoadedModels == nil || *fc.MaxLoadedModels != 2 || len(fc.Models) != 3 {
		t.Fatalf("%+v", fc)
	}
	specs, err := mergeModels(fc.Models, []modelEntry{parseModelFlag("coder=/elsewhere/coder", "default"), parseModelFlag("x=/models/x", "default")},
		modelSettings{Workers: 1, BatchSize: 32})
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]models.Spec{}
	for _, s := range specs {
		byName[s.Name] = s
	}
	small := byName["small"]
	if small.Workers != 2 || small.BatchSize != 16 || small.GroupSize != 2 || small.TTL != 10*time.Minute || !small.Pin || !small.Preload ||
		strings.Join(small.Aliases, ",") != "smol,fast" || small.Path != "~/models/small" {
		t.Fatalf("small: %+v", small)
	}
	if c := byName["coder"]; c.Path != "/elsewhere/coder" || c.TTL != 5*time.Minute || c.Preload || c.Workers != 1 || c.BatchSize != 32 || c.GroupSize != 1 {
		t.Fatalf("coder (the flag's path wins; on-demand defaults): %+v", c)
	}
	if b := byName["big"]; b.TTL != models.Never {
		t.Fatalf("big: %+v", b)
	}
	if len(specs) != 4 || specs[3].Name != "x" {
		t.Fatalf("want the file's models in order, then the flag's new one: %+v", specs)
	}
	// A flag given on the command line wins for every model.
	specs, _ = mergeModels(fc.Models, nil, modelSettings{Workers: 3, BatchSize: 8, GroupSize: 1, WorkersSet: true, BatchSet: true, GroupSet: true})
	if specs[0].Workers != 3 || specs[0].BatchSize != 8 || specs[0].GroupSize != 1 {
		t.Fatalf("flags must win: %+v", specs[0])
	}
}

func TestConfigFileErrorsNameFileLineAndKey(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ yaml, want string }{
		{"models:\n  a:\n    path: /m/a\n    batchsize: 4\n", `:4: models.a.batchsize: unknown key`},
		{"models:\n  a:\n    path: /m/a\n    workers: zero\n", `:4: models.a.workers: want a whole number`},
		{"models:\n  a:\n    path: /m/a\n    workers: 0\n", `:4: models.a.workers: want a whole number of at least 1`},
		{"models:\n  a:\n    path: /m/a\n    ttl: soon\n", `:4: models.a.ttl: want never, 0 or a duration`},
		{"models:\n  a:\n    path: /m/a\n    pin: maybe\n", `:4: models.a.pin: want true or false`},
		{"models:\n  a:\n    workers: 2\n", `:2: models.a: no path`},
		{"memory_budget: lots\nmodels: {}\n", `:1: memory_budget:`},
		{"max_loaded_models: -1\n", `:1: max_loaded_models: want a number`},
		{"model:\n  a: /m/a\n", `:1: model: unknown key`},
		{"models:\n  a: /m/a\n  a: /m/b\n", `:3: models.a: declared twice`},
		{"models: [a, b]\n", `:1: models: want a mapping`},
		{"models:\n  a:\n    path: /m/a\n  bad: [\n", `krserve.yaml: yaml: line`},
	} {
		p := writeFile(t, dir, "krserve.yaml", tc.yaml)
		_, err := loadConfigFile(p)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "krserve.yaml") {
			t.Errorf("%q: got %v, want an error naming the file and %q", tc.yaml, err, tc.want)
		}
	}
	if _, err := loadConfigFile(filepath.Join(dir, "missing.yaml")); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("missing file: %v", err)
	}
}

func TestModelFlags(t *testing.T) {
	if e := parseModelFlag("/models/x", "default"); e.Name != "default" || e.Path != "/models/x" {
		t.Fatalf("%+v", e)
	}
	if e := parseModelFlag("fast=/models/x", "default"); e.Name != "fast" || e.Path != "/models/x" {
		t.Fatalf("%+v", e)
	}
	if e := parseModelFlag("org/repo", "default"); e.Name != "default" || e.Path != "org/repo" {
		t.Fatalf("a repo id is a path: %+v", e)
	}
	specs, err := mergeModels(nil, []modelEntry{parseModelFlag("/m/x", "default")}, modelSettings{Workers: 1, BatchSize: 4})
	if err != nil || len(specs) != 1 || specs[0].TTL != models.Never || !specs[0].Preload {
		t.Fatalf("one model is loaded at start and kept: %+v %v", specs, err)
	}
	if _, err := mergeModels(nil, []modelEntry{parseModelFlag("a=/m/x", "d"), parseModelFlag("a=/m/y", "d")}, modelSettings{}); err == nil ||
		!strings.Contains(err.Error(), `both name model "a"`) {
		t.Fatalf("two flags for one name: %v", err)
	}
}

func TestParseBudget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{{"", 0}, {"0", 0}, {"8GiB", 8 << 30}, {"8G", 8e9}, {"512MB", 512e6}, {"1000", 1000}, {"1.5GiB", 3 << 29}, {"50%", 500}, {"100%", 1000}} {
		got, err := parseBudget(tc.in, 1000)
		if err != nil || got != tc.want {
			t.Errorf("parseBudget(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"lots", "8XB", "120%", "-5", "0%"} {
		if _, err := parseBudget(in, 1000); err == nil {
			t.Errorf("parseBudget(%q) accepted", in)
		}
	}
}

func TestResolveModelPathFromHFCache(t *testing.T) {
	home := t.TempDir()
	hub := filepath.Join(home, "hf", "hub")
	snap := filepath.Join(hub, "models--org--tiny", "snapshots", "abc123")
	writeFile(t, snap, "config.json", "{}")
	writeFile(t, snap, "model.safetensors", "weights")
	writeFile(t, filepath.Join(hub, "models--org--tiny", "refs"), "main", "abc123\n")
	places := models.Places{Home: home, Getenv: func(k string) string {
		if k == "HF_HOME" {
			return filepath.Join(home, "hf")
		}
		return ""
	}}
	got, err := resolveModelPath("org/tiny", false, places)
	if err != nil || got != snap {
		t.Fatalf("resolveModelPath = %q, %v; want %q", got, err, snap)
	}
	if _, err := resolveModelPath("org/absent", false, places); err == nil || !strings.Contains(err.Error(), "--allow-online") {
		t.Fatalf("absent repo offline: %v", err)
	}
	if got, err := resolveModelPath("org/absent", true, places); err != nil || got != "org/absent" {
		t.Fatalf("absent repo online: %q %v", got, err)
	}
	found := models.Discover(places)
	if len(found) != 1 || found[0].Name != "org/tiny" || found[0].Source != "huggingface" || found[0].Path != snap {
		t.Fatalf("Discover = %+v", found)
	}
}
