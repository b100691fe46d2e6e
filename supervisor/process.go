// Package supervisor starts, watches and restarts worker processes.
//
// A Process is one running worker: its pipes, its reader and writer
// goroutines and its one reaper. A Pool keeps N slots filled with Processes
// under a restart policy.
package supervisor

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/krserve/krserve/ipc"
)

// ErrStopped is returned by Send after the process has been stopped or died.
var ErrStopped = errors.New("worker stopped")

// Command describes how to start a worker process.
type Command struct {
	Path string   // executable (the virtualenv's python)
	Args []string // arguments after Path
	Env  []string // complete environment; nothing is inherited
	Dir  string
	// A rank on another host (Hosts): Host names it; Preamble is written to
	// stdin before anything else; stdout up to StdoutMarker is not the
	// worker's (the remote login shell's chatter) and is logged, not read.
	Host         string
	Preamble     []byte
	StdoutMarker []byte
}

// Exit describes how a worker process ended.
type Exit struct {
	Signal   syscall.Signal // 0 if it exited normally
	Code     int            // exit status, -1 if signalled
	Err      error          // why the supervisor thinks it died (protocol error, wedge...), may be nil
	Stderr   []string       // last lines of its stderr
	At       time.Time
	Uptime   time.Duration
	Intended bool // the supervisor asked it to stop
	// Rank and GroupSize: in a group of more than one (Group), the rank
	// whose exit this is. Host: the host it ran on, for a rank over ssh
	// (whose exit is its ssh's: the wrapper's status, 128+N for signal N).
	Rank, GroupSize int
	Host            string
}

// SignalName is e.g. "SIGSEGV", or "" for a normal exit.
func (e *Exit) SignalName() string {
	if e.Signal == 0 {
		return ""
	}
	return signalName(e.Signal)
}

func (e *Exit) String() string {
	var b strings.Builder
	if e.GroupSize > 1 {
		fmt.Fprintf(&b, "rank %d of %d ", e.Rank, e.GroupSize)
	}
	if e.Host != "" {
		fmt.Fprintf(&b, "(on %s, over ssh) ", e.Host)
	}
	if e.Signal != 0 {
		fmt.Fprintf(&b, "killed by %s", e.SignalName())
		if e.Signal == syscall.SIGKILL && !e.Intended {
			if e.Err == nil { // not the supervisor's own kill
				b.WriteString(" (out of memory killer or an operator)")
			}
		}
	} else {
		fmt.Fprintf(&b, "exited with status %d", e.Code)
	}
	if e.Err != nil {
		fmt.Fprintf(&b, " after %v", e.Err)
	}
	if line := tellingLine(e.Stderr); line != "" {
		fmt.Fprintf(&b, "; last stderr: %s", line)
	}
	return b.String()
}

// tellingLine picks the stderr line that says most about a death: the last
// one naming an error (a Python exception, faulthandler's "Fatal Python
// error: Segmentation fault", a fault injected on purpose, a remote rank's
// wrapper saying how its worker ended), else the last
// line that is not faulthandler's list of extension modules.
func tellingLine(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		l := lines[i]
		if strings.HasPrefix(l, "Fatal Python error") || strings.Contains(l, "Error:") ||
			strings.Contains(l, "Exception:") || strings.Contains(l, "fault injection:") ||
			strings.HasPrefix(l, "krserve-remote:") && !strings.Contains(l, ": started pid ") {
			return l
		}
	}
	for i := len(lines) - 1; i >= 0; i-- {
		if !strings.HasPrefix(lines[i], "Extension modules:") {
			return lines[i]
		}
	}
	return ""
}

// Process is one worker child. Messages it sends are passed to the handler
// given to Start, from a single reader goroutine, in order.
type Process struct {
	ID  int
	PID int

	host    string // Command.Host
	cmd     *exec.Cmd
	started time.Time
	log     *slog.Logger
	tail    *tailWriter

	out      chan []byte // frames for the writer goroutine
	in       syscall.RawConn
	wmu      sync.Mutex // orders direct writes with the writer goroutine's
	queued   int        // frames handed to the writer goroutine and not yet written (under wmu)
	stopOnce sync.Once
	stopping chan struct{} // closed when stop begins: no more sends

	failOnce sync.Once

	mu      sync.Mutex
	failErr error // set by fail from any goroutine, read by the reaper
	reaped  bool  // the pid is reaped: signalling it could hit a stranger

	exited chan struct{} // closed once the child is reaped
	done   chan struct{} // closed by the reaper after Wait and all readers
	exit   *Exit
}

// Start launches the worker. onMsg is called for every decoded frame, from one
// goroutine; an error it returns (or any malformed frame) marks the worker
// broken: it is killed. The Message is reused for the next frame: onMsg must
// not keep m after it returns (copying *m is fine: the decoder never reuses
// the slices and strings it fills in).
func Start(id int, c Command, log *slog.Logger, onMsg func(*ipc.Message) error) (*Process, error) {
	p := &Process{
		ID:       id,
		host:     c.Host,
		log:      log,
		tail:     newTailWriter(log, 40),
		out:      make(chan []byte, 256),
		stopping: make(chan struct{}),
		exited:   make(chan struct{}),
		done:     make(chan struct{}),
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("worker %d: stdin pipe: %w", id, err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("worker %d: stdout pipe: %w", id, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("worker %d: stderr pipe: %w", id, err)
	}
	cmd := exec.Command(c.Path, c.Args...)
	cmd.Env = c.Env
	cmd.Dir = c.Dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p.cmd = cmd

	// Pdeathsig fires when the *thread* that forked the child exits, so the
	// reaper starts the child from a locked OS thread and keeps it until Wait
	// returns.
	started := make(chan error, 1)
	var waitErr error
	reaped := p.exited
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			close(reaped)
			return
		}
		started <- nil
		// Wait for the exit without reaping: while the worker is a zombie its
		// pid, and so its process group id, cannot be reused. Kill what it
		// left in its group (a subprocess holding its stdout or stderr would
		// keep the readers, and Done, waiting forever), then reap.
		pid := cmd.Process.Pid
		exited := waitExited(pid)
		p.mu.Lock()
		if exited {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
		p.reaped = true
		p.mu.Unlock()
		waitErr = cmd.Wait()
		close(reaped)
	}()
	err = <-started
	inR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("worker %d: start %s: %w", id, c.Path, err)
	}
	p.PID = cmd.Process.Pid
	p.started = time.Now()

	var readers sync.WaitGroup
	readers.Add(3)
	go func() { // stderr: forwarded to the log, tail kept
		defer readers.Done()
		_, _ = io.Copy(p.tail, errR)
		p.tail.flush()
		errR.Close()
	}()
	go func() { // stdout: frames
		defer readers.Done()
		defer outR.Close()
		var r io.Reader = outR
		if len(c.StdoutMarker) > 0 {
			r = skipToMarker(outR, c.StdoutMarker, func(junk []byte) {
				p.log.Warn("ignored output before the remote worker started (a login script that prints?)", "output", string(junk))
			})
		}
		p.readLoop(r, onMsg)
	}()
	if p.in, err = inW.SyscallConn(); err != nil {
		p.in = nil // Send then always queues
	}
	go func() { // stdin: frames Send could not write at once, in order
		defer readers.Done()
		defer inW.Close()
		for {
			select {
			case f := <-p.out:
				_, err := inW.Write(f)
				p.wmu.Lock()
				p.queued--
				p.wmu.Unlock()
				if err != nil {
					// EPIPE: the worker closed its input, so it is exiting and its
					// exit says why (blaming the write would hide a crash's
					// cause); if it lingers, the heartbeat or the full queue
					// ends it.
					if !errors.Is(err, syscall.EPIPE) {
						p.fail(fmt.Errorf("write to worker: %w", err))
					}
					return
				}
			case <-p.stopping:
				// Flush what is queued (a shutdown frame), then close stdin: EOF
				// also tells the worker to exit.
				for {
					select {
					case f := <-p.out:
						if _, err := inW.Write(f); err != nil {
							return
						}
					default:
						return
					}
				}
			case <-reaped:
				return
			}
		}
	}()
	if len(c.Preamble) > 0 {
		_ = p.Send(c.Preamble) // first on stdin; an error is the process's exit, seen by the reaper
	}
	go func() { // the one reaper
		<-reaped
		readers.Wait()
		p.exit = classify(waitErr, p)
		close(p.done)
	}()
	return p, nil
}

func (p *Process) readLoop(r io.Reader, onMsg func(*ipc.Message) error) {
	// Buffered: one read takes every frame the worker has written so far
	// (a decode step writes one tok frame per sequence), not two per frame.
	r = bufio.NewReaderSize(r, 64<<10)
	var buf []byte
	m := new(ipc.Message) // one per worker: a tok frame costs no Message allocation
	for {
		body, err := ipc.ReadFrame(r, buf)
		if err == io.EOF {
			return
		}
		if err != nil {
			p.fail(err)
			_, _ = io.Copy(io.Discard, r)
			return
		}
		buf = body[:0]
		if err := ipc.Decode(body, m); err != nil {
			p.fail(err)
			_, _ = io.Copy(io.Discard, r)
			return
		}
		if err := onMsg(m); err != nil {
			p.fail(err)
			_, _ = io.Copy(io.Discard, r)
			return
		}
	}
}

// fail records why the worker is considered broken and kills it.
func (p *Process) fail(err error) {
	p.failOnce.Do(func() {
		p.mu.Lock()
		p.failErr = err
		p.mu.Unlock()
		p.log.Error("worker broken, killing it", "worker", p.ID, "pid", p.PID, "err", err)
		p.signalGroup(syscall.SIGKILL)
	})
	p.stopOnce.Do(func() { close(p.stopping) })
}

// Kill marks the worker broken for reason err (wedged, over memory...) and
// kills its process group at once.
func (p *Process) Kill(err error) { p.fail(err) }

// Send writes frames to the worker's stdin. It never blocks on the pipe:
// when nothing is queued it tries one non-blocking write from the caller
// (no goroutine hand-off on the hot path) and queues whatever the pipe did
// not take for the writer goroutine; if that queue is more than its buffer
// behind, the worker is broken.
func (p *Process) Send(frames []byte) error {
	select {
	case <-p.stopping:
		return ErrStopped
	case <-p.exited: // died on its own: nobody writes the queue any more
		return ErrStopped
	default:
	}
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if p.queued == 0 && p.in != nil {
		n, err := p.writeNow(frames)
		switch {
		case err == nil && n == len(frames):
			return nil
		case err == nil || errors.Is(err, syscall.EAGAIN):
			frames = frames[n:] // the pipe is full: the writer waits for room
		case errors.Is(err, syscall.EPIPE):
			return nil // the worker closed its input: it is exiting, and its exit says why
		case errors.Is(err, os.ErrClosed):
			return ErrStopped // the writer closed stdin: the process is stopping
		default:
			p.fail(fmt.Errorf("write to worker: %w", err))
			return ErrStopped
		}
	}
	select {
	case p.out <- frames:
		p.queued++
		return nil
	case <-p.stopping:
		return ErrStopped
	default:
		p.fail(errors.New("worker is not reading its input (write queue full)"))
		return ErrStopped
	}
}

// writeNow makes one non-blocking write of b to the worker's stdin.
func (p *Process) writeNow(b []byte) (int, error) {
	var n int
	var werr error
	err := p.in.Write(func(fd uintptr) bool {
		for {
			n, werr = syscall.Write(int(fd), b)
			if werr != syscall.EINTR {
				break
			}
		}
		return true // done: never wait for the pipe here
	})
	if err != nil { // the file is closed: the process is stopping
		return 0, err
	}
	if n < 0 {
		n = 0
	}
	return n, werr
}

// Done is closed once the process has exited and every pipe is drained.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit is valid after Done is closed.
func (p *Process) Exit() *Exit { return p.exit }

// Stop ends the worker in stages: a shutdown frame and stdin EOF; after grace,
// SIGTERM to its process group; after grace again, SIGKILL. It returns once
// the process is reaped. Safe to call many times and concurrently.
func (p *Process) Stop(grace time.Duration) *Exit {
	p.stopOnce.Do(func() {
		if f, err := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TShutdown}); err == nil {
			select {
			case p.out <- f:
			default:
			}
		}
		close(p.stopping)
	})
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return p.exit
	case <-t.C:
	}
	p.signalGroup(syscall.SIGTERM)
	t.Reset(grace)
	select {
	case <-p.done:
		return p.exit
	case <-t.C:
	}
	p.signalGroup(syscall.SIGKILL)
	<-p.done
	return p.exit
}

// signalGroup signals the worker's process group; a group that is already
// gone is not an error.
func (p *Process) signalGroup(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.PID > 0 && !p.reaped {
		_ = syscall.Kill(-p.PID, sig)
	}
}

// waitExited blocks until child pid has exited, without reaping it
// (waitid with WNOWAIT); false if it could not wait.
func waitExited(pid int) bool {
	const pPID, wNOWAIT = 1, 0x01000000
	var info [128]byte // siginfo_t
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid), uintptr(unsafe.Pointer(&info)), syscall.WEXITED|wNOWAIT, 0, 0)
		if errno != syscall.EINTR {
			return errno == 0
		}
	}
}

func classify(waitErr error, p *Process) *Exit {
	e := &Exit{Code: 0, At: time.Now(), Uptime: time.Since(p.started), Stderr: p.tail.lines(), Host: p.host}
	p.mu.Lock()
	failErr := p.failErr
	p.mu.Unlock()
	select {
	case <-p.stopping:
		e.Intended = failErr == nil
	default:
	}
	e.Err = failErr
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			e.Signal = ws.Signal()
			e.Code = -1
		} else {
			e.Code = ee.ExitCode()
		}
	} else if waitErr != nil {
		e.Code = -1
		if e.Err == nil {
			e.Err = waitErr
		}
	}
	return e
}

func signalName(s syscall.Signal) string {
	switch s {
	case syscall.SIGSEGV:
		return "SIGSEGV"
	case syscall.SIGBUS:
		return "SIGBUS"
	case syscall.SIGABRT:
		return "SIGABRT"
	case syscall.SIGKILL:
		return "SIGKILL"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGILL:
		return "SIGILL"
	case syscall.SIGFPE:
		return "SIGFPE"
	case syscall.SIGPIPE:
		return "SIGPIPE"
	default:
		return fmt.Sprintf("signal %d", int(s))
	}
}
