package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/krserve/krserve/models"
)

// modelEntry is one served model as the command line and --config file
// declare it, before defaults are applied. Zero values mean "not set".
type modelEntry struct {
	Name      string
	Path      string
	Aliases   []string
	Workers   int
	BatchSize int
	GroupSize int
	TTL       *time.Duration
	Pin       *bool
	Preload   *bool
	where     string // file:line, for errors
}

// fileConfig is what a --config file declares.
type fileConfig struct {
	MemoryBudget    string
	MaxLoadedModels *int
	Models          []modelEntry
}

// loadConfigFile reads a --config YAML file. Every error names the file, the
// line and the key.
//
//	memory_budget: 75%        # bytes (8GiB, 8000000000) or a percentage of RAM
//	max_loaded_models: 2
//	models:
//	  small:
//	    path: ~/models/SmolLM2-135M-Instruct
//	    aliases: [smol]
//	    workers: 1
//	    batch_size: 16
//	    group_size: 2           # ranks per worker (mlx.distributed, tensor parallel)
//	    ttl: 10m                # never, 0 (unload when idle) or a duration
//	    pin: true
//	    preload: true
func loadConfigFile(path string) (*fileConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	fc := &fileConfig{}
	if len(doc.Content) == 0 {
		return fc, nil
	}
	root := doc.Content[0]
	bad := func(n *yaml.Node, key, format string, args ...any) error {
		return fmt.Errorf("%s:%d: %s: %s", path, n.Line, key, fmt.Sprintf(format, args...))
	}
	if root.Kind != yaml.MappingNode {
		return nil, bad(root, "(top level)", "want a mapping with models, memory_budget and max_loaded_models")
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		switch k.Value {
		case "memory_budget":
			if v.Kind != yaml.ScalarNode {
				return nil, bad(v, k.Value, "want bytes or a percentage")
			}
			if _, err := parseBudget(v.Value, 1); err != nil {
				return nil, bad(v, k.Value, "%v", err)
			}
			fc.MemoryBudget = v.Value
		case "max_loaded_models":
			n, err := intNode(v)
			if err != nil || n < 0 {
				return nil, bad(v, k.Value, "want a number of models (0: no limit)")
			}
			fc.MaxLoadedModels = &n
		case "models":
			if v.Kind != yaml.MappingNode {
				return nil, bad(v, k.Value, "want a mapping of model names to settings")
			}
			for j := 0; j+1 < len(v.Content); j += 2 {
				e, err := modelNode(v.Content[j], v.Content[j+1], bad)
				if err != nil {
					return nil, err
				}
				e.where = fmt.Sprintf("%s:%d", path, v.Content[j].Line)
				for _, prev := range fc.Models {
					if prev.Name == e.Name {
						return nil, bad(v.Content[j], "models."+e.Name, "declared twice")
					}
				}
				fc.Models = append(fc.Models, e)
			}
		default:
			return nil, bad(k, k.Value, "unknown key (want models, memory_budget or max_loaded_models)")
		}
	}
	return fc, nil
}

func modelNode(k, v *yaml.Node, bad func(*yaml.Node, string, string, ...any) error) (modelEntry, error) {
	e := modelEntry{Name: k.Value}
	key := "models." + k.Value
	if k.Value == "" || strings.ContainsAny(k.Value, " \t/") {
		return e, bad(k, key, "a model name may not be empty or contain spaces or slashes")
	}
	if v.Kind == yaml.ScalarNode && v.Tag != "!!null" { // name: path
		e.Path = v.Value
		return e, nil
	}
	if v.Kind != yaml.MappingNode {
		return e, bad(v, key, "want a path or a mapping with path, aliases, workers, batch_size, group_size, ttl, pin, preload")
	}
	for i := 0; i+1 < len(v.Content); i += 2 {
		f, x := v.Content[i], v.Content[i+1]
		fkey := key + "." + f.Value
		switch f.Value {
		case "path":
			if x.Kind != yaml.ScalarNode || x.Value == "" {
				return e, bad(x, fkey, "want a model directory or a Hugging Face repo id")
			}
			e.Path = x.Value
		case "aliases":
			if x.Kind == yaml.ScalarNode {
				e.Aliases = []string{x.Value}
				continue
			}
			if x.Kind != yaml.SequenceNode {
				return e, bad(x, fkey, "want a list of names")
			}
			for _, a := range x.Content {
				if a.Kind != yaml.ScalarNode || a.Value == "" {
					return e, bad(a, fkey, "want a list of names")
				}
				e.Aliases = append(e.Aliases, a.Value)
			}
		case "workers", "batch_size", "group_size":
			n, err := intNode(x)
			if err != nil || n < 1 {
				return e, bad(x, fkey, "want a whole number of at least 1")
			}
			switch f.Value {
			case "workers":
				e.Workers = n
			case "batch_size":
				e.BatchSize = n
			default:
				e.GroupSize = n
			}
		case "ttl":
			d, err := models.ParseTTL(x.Value)
			if err != nil || x.Kind != yaml.ScalarNode {
				return e, bad(x, fkey, "want never, 0 or a duration such as 10m")
			}
			e.TTL = &d
		case "pin", "preload":
			var b bool
			if x.Kind != yaml.ScalarNode || x.Decode(&b) != nil {
				return e, bad(x, fkey, "want true or false")
			}
			if f.Value == "pin" {
				e.Pin = &b
			} else {
				e.Preload = &b
			}
		default:
			return e, bad(f, fkey, "unknown key (want path, aliases, workers, batch_size, group_size, ttl, pin or preload)")
		}
	}
	if e.Path == "" {
		return e, bad(k, key, "no path")
	}
	return e, nil
}

func intNode(n *yaml.Node) (int, error) {
	var v int
	if n.Kind != yaml.ScalarNode {
		return 0, fmt.Errorf("not a number")
	}
	return v, n.Decode(&v)
}

// parseBudget reads a memory budget: bytes with an optional unit (8GiB, 8G,
// 512MB, 8000000000) or a percentage of total, the machine's memory.
func parseBudget(s string, total int64) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "0" {
		return 0, nil
	}
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || f <= 0 || f > 100 {
			return 0, fmt.Errorf("%q: want a percentage in (0, 100]", s)
		}
		if total <= 0 {
			return 0, fmt.Errorf("%q: the machine's memory is unknown; give bytes", s)
		}
		return int64(f / 100 * float64(total)), nil
	}
	num := strings.TrimRight(s, "KMGTiBkmgtib ")
	unit := strings.ToUpper(strings.TrimSpace(s[len(num):]))
	f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q: want bytes (8GiB, 512MB, 8000000000) or a percentage of memory (75%%)", s)
	}
	mult := map[string]float64{"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 1 << 10, "M": 1e6, "MB": 1e6, "MIB": 1 << 20,
		"G": 1e9, "GB": 1e9, "GIB": 1 << 30, "T": 1e12, "TB": 1e12, "TIB": 1 << 40}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("%q: unknown unit %q (want B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)", s, unit)
	}
	return int64(f * mult), nil
}

// parseModelFlag reads one --model value: PATH, or NAME=PATH.
func parseModelFlag(v, defaultName string) modelEntry {
	if name, path, ok := strings.Cut(v, "="); ok && name != "" && !strings.ContainsAny(name, "/ ") {
		return modelEntry{Name: name, Path: path, where: "--model " + v}
	}
	return modelEntry{Name: defaultName, Path: v, where: "--model " + v}
}

// modelSettings are the defaults the flags give every model.
type modelSettings struct {
	Workers, BatchSize, GroupSize int
	// flagWins: the flag was given on the command line, so it replaces what
	// the file says for every model.
	WorkersSet, BatchSet, GroupSet bool
}

// mergeModels combines the file's models and the --model flags (a flag for
// a name the file declares replaces its path) and applies the defaults: a
// single model is loaded at start and kept; several load on demand and
// unload after 5 minutes idle.
func mergeModels(file []modelEntry, flags []modelEntry, d modelSettings) ([]models.Spec, error) {
	seen := map[string]string{}
	for _, f := range flags {
		if prev, dup := seen[f.Name]; dup {
			return nil, fmt.Errorf("%s and %s both name model %q", prev, f.where, f.Name)
		}
		seen[f.Name] = f.where
	}
	entries := append([]modelEntry(nil), file...)
	for _, f := range flags {
		replaced := false
		for i := range entries {
			if entries[i].Name == f.Name { // the flag wins over the file
				entries[i].Path, entries[i].where = f.Path, f.where
				replaced = true
			}
		}
		if !replaced {
			entries = append(entries, f)
		}
	}
	single := len(entries) == 1
	var specs []models.Spec
	for _, e := range entries {
		s := models.Spec{Name: e.Name, Path: e.Path, Aliases: e.Aliases, Workers: d.Workers, BatchSize: d.BatchSize,
			GroupSize: max(d.GroupSize, 1), TTL: 5 * time.Minute, Preload: single}
		if single {
			s.TTL = models.Never
		}
		if e.Workers > 0 && !d.WorkersSet {
			s.Workers = e.Workers
		}
		if e.BatchSize > 0 && !d.BatchSet {
			s.BatchSize = e.BatchSize
		}
		if e.GroupSize > 0 && !d.GroupSet {
			s.GroupSize = e.GroupSize
		}
		if e.TTL != nil {
			s.TTL = *e.TTL
		}
		if e.Pin != nil {
			s.Pin = *e.Pin
		}
		if e.Preload != nil {
			s.Preload = *e.Preload
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// expandHome turns a leading ~/ into the home directory.
func expandHome(p string) string {
	if rest, ok := strings.CutPrefix(p, "~/"); ok {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, rest)
		}
	}
	return p
}
