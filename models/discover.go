package models

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Found is an mlx-lm model directory on this machine.
type Found struct {
	Name   string `json:"name"`   // repo id (HF cache, LM Studio) or directory name
	Path   string `json:"path"`   // the directory with config.json
	Source string `json:"source"` // krserve, huggingface or lmstudio
	Bytes  int64  `json:"bytes"`  // weights on disk
}

// Places are where Discover looks; Getenv and Home are injected for tests.
type Places struct {
	Getenv func(string) string
	Home   string
}

// DefaultPlaces reads the real environment.
func DefaultPlaces() Places {
	home, _ := os.UserHomeDir()
	return Places{Getenv: os.Getenv, Home: home}
}

func (p Places) krserveCache() string {
	if d := p.Getenv("KRSERVE_CACHE_DIR"); d != "" {
		return filepath.Join(d, "models")
	}
	if d := p.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "krserve", "models")
	}
	return filepath.Join(p.Home, ".cache", "krserve", "models")
}

// HFHub is the Hugging Face hub cache: $HF_HUB_CACHE, $HF_HOME/hub or
// ~/.cache/huggingface/hub.
func (p Places) HFHub() string {
	if d := p.Getenv("HF_HUB_CACHE"); d != "" {
		return d
	}
	if d := p.Getenv("HF_HOME"); d != "" {
		return filepath.Join(d, "hub")
	}
	if d := p.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "huggingface", "hub")
	}
	return filepath.Join(p.Home, ".cache", "huggingface", "hub")
}

func (p Places) lmStudio() []string {
	return []string{filepath.Join(p.Home, ".lmstudio", "models"), filepath.Join(p.Home, ".cache", "lm-studio", "models")}
}

// IsModelDir reports whether dir holds an mlx-lm model: config.json and
// safetensors weights; it returns their size.
func IsModelDir(dir string) (int64, bool) {
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		return 0, false
	}
	n, err := weightBytes(dir)
	return n, err == nil
}

// Discover lists the model directories in the krserve cache, the Hugging
// Face cache and LM Studio's models folder.
func Discover(p Places) []Found {
	var out []Found
	if entries, err := os.ReadDir(p.krserveCache()); err == nil {
		for _, e := range entries {
			dir := filepath.Join(p.krserveCache(), e.Name())
			if n, ok := IsModelDir(dir); ok {
				out = append(out, Found{Name: e.Name(), Path: dir, Source: "krserve", Bytes: n})
			}
		}
	}
	if entries, err := os.ReadDir(p.HFHub()); err == nil {
		for _, e := range entries {
			repo, ok := strings.CutPrefix(e.Name(), "models--")
			if !ok {
				continue
			}
			repo = strings.Replace(repo, "--", "/", 1)
			if dir, ok := p.HFSnapshot(repo); ok {
				n, _ := IsModelDir(dir)
				out = append(out, Found{Name: repo, Path: dir, Source: "huggingface", Bytes: n})
			}
		}
	}
	for _, root := range p.lmStudio() {
		pubs, _ := os.ReadDir(root)
		for _, pub := range pubs {
			names, _ := os.ReadDir(filepath.Join(root, pub.Name()))
			for _, nm := range names {
				dir := filepath.Join(root, pub.Name(), nm.Name())
				if n, ok := IsModelDir(dir); ok {
					out = append(out, Found{Name: pub.Name() + "/" + nm.Name(), Path: dir, Source: "lmstudio", Bytes: n})
				}
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// HFSnapshot finds the snapshot of a repo id ("org/name") in the Hugging
// Face cache without going online: the revision refs/main names, else the
// most recently modified snapshot that is a complete model directory.
func (p Places) HFSnapshot(repo string) (string, bool) {
	org, name, ok := strings.Cut(repo, "/")
	if !ok || org == "" || name == "" || strings.Contains(name, "/") {
		return "", false
	}
	base := filepath.Join(p.HFHub(), "models--"+org+"--"+name)
	if ref, err := os.ReadFile(filepath.Join(base, "refs", "main")); err == nil {
		dir := filepath.Join(base, "snapshots", strings.TrimSpace(string(ref)))
		if _, ok := IsModelDir(dir); ok {
			return dir, true
		}
	}
	snaps, err := os.ReadDir(filepath.Join(base, "snapshots"))
	if err != nil {
		return "", false
	}
	best, bestTime := "", int64(0)
	for _, s := range snaps {
		dir := filepath.Join(base, "snapshots", s.Name())
		info, err := os.Stat(dir)
		if _, ok := IsModelDir(dir); err == nil && ok && info.ModTime().UnixNano() > bestTime {
			best, bestTime = dir, info.ModTime().UnixNano()
		}
	}
	return best, best != ""
}
