package loadgen

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// progress draws a one-line progress bar, redrawn with '\r' when a request
// finishes and on a ticker. All methods are no-ops on a nil *progress
// (Config.Progress == nil).
type progress struct {
	w     io.Writer
	total int
	now   func() time.Time

	mu     sync.Mutex
	t0     time.Time
	done   int
	errs   int
	toks   int
	width  int // length of the last line drawn, to blank leftovers
	stopCh chan struct{}
	wg     sync.WaitGroup
}

// progressTick is how often the line is redrawn while nothing finishes.
const progressTick = 250 * time.Millisecond

func newProgress(w io.Writer, total int, now func() time.Time) *progress {
	if w == nil {
		return nil
	}
	return &progress{w: w, total: total, now: now}
}

func (p *progress) start(t0 time.Time) {
	if p == nil {
		return
	}
	p.t0 = t0
	p.stopCh = make(chan struct{})
	p.redraw()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(progressTick)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.redraw()
			case <-p.stopCh:
				return
			}
		}
	}()
}

func (p *progress) tokens(n int) {
	if p == nil || n == 0 {
		return
	}
	p.mu.Lock()
	p.toks += n
	p.mu.Unlock()
}

func (p *progress) finish(rec Record) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.done++
	if !rec.OK() {
		p.errs++
	}
	p.mu.Unlock()
	p.redraw()
}

// stop draws the final state and ends the line.
func (p *progress) stop() {
	if p == nil {
		return
	}
	close(p.stopCh)
	p.wg.Wait()
	p.redraw()
	p.mu.Lock()
	fmt.Fprintln(p.w)
	p.mu.Unlock()
}

func (p *progress) redraw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	el := p.now().Sub(p.t0)
	rate := 0.0
	if s := el.Seconds(); s > 0 {
		rate = float64(p.toks) / s
	}
	const barW = 24
	filled := 0
	if p.total > 0 {
		filled = p.done * barW / p.total
	}
	line := fmt.Sprintf("[%s%s] %d/%d  errors %d  %s  %.1f tok/s",
		strings.Repeat("#", filled), strings.Repeat(".", barW-filled),
		p.done, p.total, p.errs, el.Truncate(100*time.Millisecond), rate)
	pad := ""
	if n := p.width - len(line); n > 0 {
		pad = strings.Repeat(" ", n)
	}
	p.width = len(line)
	fmt.Fprint(p.w, "\r"+line+pad)
}
