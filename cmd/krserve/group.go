package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// checkGroup refuses a --group-size the model cannot run with before any
// worker starts: its attention and KV heads must divide by n and its mlx-lm
// model class must have shard() (tensor parallel). The check is the
// worker's own (krserve_worker.ranks.check, which each rank runs again), so
// the rules live in one place; it runs in the workers' interpreter because
// only mlx-lm knows which classes shard.
func checkGroup(ctx context.Context, python string, env []string, dir string, n int) error {
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		return nil // a repo id the workers will download: they check it
	}
	cmd := exec.CommandContext(ctx, python, "-m", "krserve_worker.ranks", "--check", dir, "--group-size", strconv.Itoa(n))
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err == nil {
		return nil
	}
	var ee *exec.ExitError
	msg := strings.TrimSpace(string(out))
	if errors.As(err, &ee) && ee.ExitCode() == 2 && msg != "" {
		return fmt.Errorf("--group-size %d: %s", n, msg)
	}
	return fmt.Errorf("--group-size %d: checking the model with %s -m krserve_worker.ranks failed: %w: %s", n, python, err, lastLine(stderr.String()))
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
