package supervisor

import (
	"bytes"
	"log/slog"
	"sync"
)

// tailWriter forwards a worker's stderr to the log line by line and keeps the
// last n lines, so a crash report can say why the worker died (the Python
// traceback or faulthandler dump).
type tailWriter struct {
	log *slog.Logger
	n   int

	mu      sync.Mutex
	partial []byte
	ring    []string
}

func newTailWriter(log *slog.Logger, n int) *tailWriter { return &tailWriter{log: log, n: n} }

const maxLine = 4096

func (t *tailWriter) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.partial = append(t.partial, p...)
	for {
		i := bytes.IndexByte(t.partial, '\n')
		if i < 0 || i > maxLine {
			if len(t.partial) > maxLine {
				t.lineLocked(t.partial[:maxLine])
				t.partial = append(t.partial[:0], t.partial[maxLine:]...)
				continue
			}
			break
		}
		t.lineLocked(t.partial[:i])
		t.partial = t.partial[i+1:]
	}
	if len(t.partial) == 0 {
		t.partial = nil
	}
	return len(p), nil
}

func (t *tailWriter) lineLocked(b []byte) {
	line := string(bytes.TrimRight(b, "\r"))
	if line == "" {
		return
	}
	t.log.Info(line, "stream", "stderr")
	t.ring = append(t.ring, line)
	if len(t.ring) > t.n {
		t.ring = t.ring[len(t.ring)-t.n:]
	}
}

func (t *tailWriter) flush() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.partial) > 0 {
		t.lineLocked(t.partial)
		t.partial = nil
	}
}

func (t *tailWriter) lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.ring...)
}
