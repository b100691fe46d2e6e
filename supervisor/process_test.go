package supervisor

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
)

// startFake starts a fake worker and returns it with the channel of the frames
// it sends.
func startFake(t *testing.T, spec string) (*Process, chan *ipc.Message) {
	t.Helper()
	msgs := make(chan *ipc.Message, 4096)
	proc, err := Start(1, fakeCommand(t, spec), testLog(), func(m *ipc.Message) error {
		c := *m
		msgs <- &c
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Kill(errors.New("test cleanup")); <-proc.Done() })
	return proc, msgs
}

func recv(t *testing.T, msgs chan *ipc.Message, want string) *ipc.Message {
	t.Helper()
	select {
	case m := <-msgs:
		if m.T != want {
			t.Fatalf("got %q frame %+v, want %q", m.T, m, want)
		}
		return m
	case <-time.After(waitLimit):
		t.Fatalf("no %q frame within %s", want, waitLimit)
		return nil
	}
}

func send(t *testing.T, proc *Process, ms ...*ipc.Message) {
	t.Helper()
	var b []byte
	for _, m := range ms {
		var err error
		if b, err = ipc.AppendMessage(b, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := proc.Send(b); err != nil {
		t.Fatalf("send: %v", err)
	}
}

func hasLine(lines []string, sub string) bool {
	for _, l := range lines {
		if strings.Contains(l, sub) {
			return true
		}
	}
	return false
}

func TestProcessProtocolRoundTrip(t *testing.T) {
	proc, msgs := startFake(t, "ok,tokdelay=1ms")
	h := recv(t, msgs, ipc.THello)
	if h.V != ipc.Version || h.PID != proc.PID || h.Model != "fake-model" {
		t.Fatalf("hello %+v (process pid %d)", h, proc.PID)
	}

	send(t, proc, &ipc.Message{T: ipc.TPing, Seq: 5})
	if p := recv(t, msgs, ipc.TPong); p.Seq != 5 {
		t.Fatalf("pong seq %d, want 5", p.Seq)
	}

	// Two gens in one write: both streams complete, text and ids exact.
	send(t, proc, &ipc.Message{T: ipc.TGen, ID: 11, Prompt: []int32{100}, MaxTokens: 4},
		&ipc.Message{T: ipc.TGen, ID: 12, Prompt: []int32{500, 1}, MaxTokens: 3})
	text := map[uint64]string{}
	ids := map[uint64][]int32{}
	for done := 0; done < 2; {
		select {
		case m := <-msgs:
			text[m.ID] += m.Text
			ids[m.ID] = append(ids[m.ID], m.IDs...)
			if m.T == ipc.TDone {
				if m.Reason != "length" {
					t.Fatalf("done %+v", m)
				}
				done++
			}
		case <-time.After(waitLimit):
			t.Fatal("gen did not finish")
		}
	}
	if text[11] != fakeText(0, 4) || text[12] != fakeText(0, 3) {
		t.Fatalf("texts %v", text)
	}
	if len(ids[11]) != 4 || ids[11][3] != 103 || len(ids[12]) != 3 || ids[12][0] != 500 {
		t.Fatalf("ids %v", ids)
	}

	// Cancel mid-stream.
	send(t, proc, &ipc.Message{T: ipc.TGen, ID: 13, Prompt: []int32{1}, MaxTokens: 1 << 20})
	recv(t, msgs, ipc.TTok)
	send(t, proc, &ipc.Message{T: ipc.TCancel, ID: 13}, &ipc.Message{T: ipc.TCancel, ID: 999})
	for {
		m := <-msgs
		if m.T == ipc.TDone {
			if m.Reason != "cancelled" || m.ID != 13 {
				t.Fatalf("done %+v, want cancelled 13", m)
			}
			break
		}
	}

	start := time.Now()
	e := proc.Stop(waitLimit)
	if e.Signal != 0 || e.Code != 0 || !e.Intended || e.Err != nil {
		t.Fatalf("clean stop: exit %+v (%s)", e, e)
	}
	if el := time.Since(start); el > waitLimit/2 {
		t.Fatalf("a worker that honours shutdown took %s to stop", el)
	}
	if !hasLine(e.Stderr, "shutdown received") {
		t.Errorf("stderr tail %q lacks the shutdown trace", e.Stderr)
	}
	if e.Uptime <= 0 || e.At.IsZero() {
		t.Errorf("exit times %v %v", e.Uptime, e.At)
	}
	assertGone(t, proc.PID)
	if err := proc.Send([]byte{0}); !errors.Is(err, ErrStopped) {
		t.Errorf("Send after Stop: %v, want ErrStopped", err)
	}
}

func TestProcessExitClassification(t *testing.T) {
	cases := []struct {
		spec   string
		sig    syscall.Signal
		name   string
		code   int
		stderr string // a line the tail must hold
		last   string // the last line
		str    string // in Exit.String()
	}{
		{"die,sig=SEGV", syscall.SIGSEGV, "SIGSEGV", -1, "Fatal Python error: Segmentation fault", "line 212 in step", "killed by SIGSEGV"},
		{"die,sig=ABRT", syscall.SIGABRT, "SIGABRT", -1, "Fatal Python error: Aborted", "line 212 in step", "killed by SIGABRT"},
		{"die,sig=BUS", syscall.SIGBUS, "SIGBUS", -1, "Fatal Python error: Bus error", "line 212 in step", "killed by SIGBUS"},
		{"die,sig=KILL", syscall.SIGKILL, "SIGKILL", -1, "about to die", "about to die", "killed by SIGKILL (out of memory killer or an operator)"},
		{"die,code=3", 0, "", 3, "about to die", "about to die", "exited with status 3"},
		{"crash-on-start", 0, "", 1, "Traceback (most recent call last):", "FileNotFoundError: [Errno 2] No such file or directory: '/models/missing/config.json'", "exited with status 1; last stderr: FileNotFoundError"},
	}
	for _, c := range cases {
		t.Run(c.spec, func(t *testing.T) {
			t.Parallel()
			proc, _ := startFake(t, c.spec)
			e := waitDone(t, proc)
			if e.Signal != c.sig || e.SignalName() != c.name || e.Code != c.code {
				t.Errorf("exit signal %v (%q) code %d, want %v (%q) code %d", e.Signal, e.SignalName(), e.Code, c.sig, c.name, c.code)
			}
			if e.Intended || e.Err != nil {
				t.Errorf("a crash is not intended and has no supervisor cause: %+v", e)
			}
			if !hasLine(e.Stderr, c.stderr) || len(e.Stderr) == 0 || !strings.Contains(e.Stderr[len(e.Stderr)-1], c.last) {
				t.Errorf("stderr tail %q: want a line %q and last line %q", e.Stderr, c.stderr, c.last)
			}
			if !strings.Contains(e.String(), c.str) {
				t.Errorf("Exit.String() = %q, want it to contain %q", e.String(), c.str)
			}
			assertGone(t, proc.PID)
		})
	}
}

func TestProcessStopEscalates(t *testing.T) {
	// The grace must cover the worker's reaction to a stage (dying of
	// SIGTERM, logging that it ignores it) even on a loaded machine.
	cases := []struct {
		spec   string
		sig    syscall.Signal
		stages int    // grace periods the stop needs at least
		stderr string // proof it saw the earlier stage
		grace  time.Duration
	}{
		{"term-only", syscall.SIGTERM, 1, "ignoring the request to exit", time.Second},
		{"hang", syscall.SIGTERM, 1, "", time.Second},
		{"ignore-shutdown", syscall.SIGKILL, 2, "ignoring SIGTERM", 500 * time.Millisecond},
	}
	for _, c := range cases {
		t.Run(c.spec, func(t *testing.T) {
			t.Parallel()
			proc, msgs := startFake(t, c.spec)
			recv(t, msgs, ipc.THello)
			start := time.Now()
			e := proc.Stop(c.grace)
			el := time.Since(start)
			if e.Signal != c.sig || !e.Intended || e.Err != nil {
				t.Fatalf("exit %+v (%s), want intended %s", e, e, signalName(c.sig))
			}
			if el < time.Duration(c.stages)*c.grace {
				t.Errorf("stopped after %s, before %d grace periods", el, c.stages)
			}
			if c.stderr != "" && !hasLine(e.Stderr, c.stderr) {
				t.Errorf("stderr tail %q lacks %q", e.Stderr, c.stderr)
			}
			if strings.Contains(e.String(), "out of memory") {
				t.Errorf("an intended SIGKILL blamed on the OOM killer: %s", e)
			}
			assertGone(t, proc.PID)
		})
	}
}

func TestProcessStopIdempotentAndConcurrent(t *testing.T) {
	proc, msgs := startFake(t, "ignore-shutdown")
	recv(t, msgs, ipc.THello)
	var wg sync.WaitGroup
	exits := make([]*Exit, 8)
	for i := range exits {
		wg.Add(1)
		go func() {
			defer wg.Done()
			exits[i] = proc.Stop(100 * time.Millisecond)
		}()
	}
	wg.Wait()
	for i, e := range exits {
		if e == nil || e != exits[0] {
			t.Fatalf("Stop #%d returned %p, want the one Exit %p", i, e, exits[0])
		}
	}
	if exits[0].Signal != syscall.SIGKILL || !exits[0].Intended {
		t.Fatalf("exit %+v", exits[0])
	}
	start := time.Now()
	if e := proc.Stop(time.Hour); e != exits[0] {
		t.Fatalf("Stop after reap returned %p, want %p", e, exits[0])
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("Stop on a reaped worker waited %s", el)
	}
	proc.Kill(errors.New("late kill"))
	if proc.Exit() != exits[0] || proc.Exit().Err != nil {
		t.Fatalf("a Kill after the reap changed the exit: %+v", proc.Exit())
	}
	assertGone(t, proc.PID)
}

func TestProcessKill(t *testing.T) {
	proc, msgs := startFake(t, "ok")
	recv(t, msgs, ipc.THello)
	why := errors.New("resident memory 9 GiB over the limit")
	proc.Kill(why)
	proc.Kill(errors.New("second reason")) // the first reason sticks
	e := waitDone(t, proc)
	if e.Signal != syscall.SIGKILL || e.Intended || e.Err != why {
		t.Fatalf("exit %+v, want SIGKILL, unintended, Err %v", e, why)
	}
	s := e.String()
	if !strings.Contains(s, why.Error()) {
		t.Errorf("Exit.String() %q lacks the reason", s)
	}
	// The supervisor killed it: blaming the OOM killer or an operator misleads
	// whoever reads /stats.
	if strings.Contains(s, "out of memory killer") {
		t.Errorf("Exit.String() %q blames the OOM killer for the supervisor's own kill", s)
	}
	// Stop on a killed worker returns at once with the same Exit.
	if got := proc.Stop(time.Hour); got != e {
		t.Fatalf("Stop after Kill: %p, want %p", got, e)
	}
	assertGone(t, proc.PID)
}

func TestProcessProtocolErrors(t *testing.T) {
	for _, spec := range []string{"garbage-oversize", "garbage-body"} {
		t.Run(spec, func(t *testing.T) {
			t.Parallel()
			proc, msgs := startFake(t, spec)
			recv(t, msgs, ipc.THello)
			send(t, proc, &ipc.Message{T: ipc.TPing, Seq: 1})
			e := waitDone(t, proc)
			if !errors.Is(e.Err, ipc.ErrProtocol) || e.Signal != syscall.SIGKILL || e.Intended {
				t.Fatalf("exit %+v (%s), want a SIGKILL for a protocol error", e, e)
			}
			assertGone(t, proc.PID)
		})
	}
	t.Run("handler refuses a frame", func(t *testing.T) {
		t.Parallel()
		refused := errors.New("refused")
		proc, err := Start(2, fakeCommand(t, "ok"), testLog(), func(m *ipc.Message) error {
			if m.T == ipc.TPong {
				return refused
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		f, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TPing, Seq: 1})
		if err := proc.Send(f); err != nil {
			t.Fatal(err)
		}
		if e := waitDone(t, proc); e.Err != refused || e.Signal != syscall.SIGKILL {
			t.Fatalf("exit %+v", e)
		}
		assertGone(t, proc.PID)
	})
}

// A worker that stops reading its stdin must not block the caller of Send (the
// scheduler, under its lock): once the queue is full it is killed.
func TestProcessNotReadingInput(t *testing.T) {
	proc, msgs := startFake(t, "no-read")
	recv(t, msgs, ipc.THello)
	frame, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TPing, Seq: 1, Text: strings.Repeat("a", 4096)})
	var err error
	for i := 0; i < 10000 && err == nil; i++ {
		err = proc.Send(frame)
	}
	if !errors.Is(err, ErrStopped) {
		t.Fatalf("Send never failed: %v", err)
	}
	e := waitDone(t, proc)
	if e.Err == nil || !strings.Contains(e.Err.Error(), "not reading its input") || e.Signal != syscall.SIGKILL {
		t.Fatalf("exit %+v", e)
	}
	assertGone(t, proc.PID)
}

// Send on a worker that died on its own must say so, not queue frames that
// nobody will ever write.
func TestProcessSendAfterCrash(t *testing.T) {
	proc, _ := startFake(t, "die,code=2")
	waitDone(t, proc)
	f, _ := ipc.AppendMessage(nil, &ipc.Message{T: ipc.TPing, Seq: 1})
	if err := proc.Send(f); !errors.Is(err, ErrStopped) {
		t.Fatalf("Send to a dead worker: %v, want ErrStopped", err)
	}
}

// A crashing worker's exit is the crash, not the supervisor's failed write
// into its closed pipe (a ping racing the death).
func TestProcessWriteToExitingWorkerIsNotTheCause(t *testing.T) {
	proc, msgs := startFake(t, "close-stdin")
	recv(t, msgs, ipc.THello)
	recv(t, msgs, ipc.TPong) // its stdin is closed now
	send(t, proc, &ipc.Message{T: ipc.TPing, Seq: 2})
	e := waitDone(t, proc)
	if e.Code != 5 || e.Err != nil || e.Intended {
		t.Fatalf("exit %+v (%s), want status 5 with no supervisor cause", e, e)
	}
}

// A worker's subprocess (Python's multiprocessing resource tracker, a
// compiler...) inherits its stderr. When the worker dies, the subprocess must
// not keep the slot from being reaped and restarted.
func TestProcessGrandchildDoesNotBlockReap(t *testing.T) {
	proc, _ := startFake(t, "orphan")
	var e *Exit
	select {
	case <-proc.Done():
		e = proc.Exit()
	case <-time.After(5 * time.Second):
		t.Fatal("worker exited but is not reaped: its grandchild holds the stderr pipe open")
	}
	if e.Code != 1 {
		t.Fatalf("exit %+v", e)
	}
	gc := stderrPID(e.Stderr, "grandchild")
	if gc == 0 {
		t.Fatalf("no grandchild pid in %q", e.Stderr)
	}
	// SIGKILL is delivered asynchronously, and init reaps the orphan.
	eventually(t, "the grandchild to die with the worker's group", func() bool { return !alive(gc) })
	eventually(t, "the worker's process group to vanish", func() bool {
		return errors.Is(syscall.Kill(-proc.PID, 0), syscall.ESRCH)
	})
	assertGone(t, proc.PID)
}

// alive reports whether pid exists and is not a zombie (an orphan's zombie is
// init's to reap).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func TestProcessNoisyStderr(t *testing.T) {
	proc, msgs := startFake(t, "noisy-stderr")
	recv(t, msgs, ipc.THello)
	send(t, proc, &ipc.Message{T: ipc.TGen, ID: 1, Prompt: []int32{1}, MaxTokens: 50})
	var text string
	for {
		m := <-msgs
		text += m.Text
		if m.T == ipc.TDone {
			break
		}
	}
	if text != fakeText(0, 50) {
		t.Fatalf("text %q", text)
	}
	e := proc.Stop(waitLimit)
	if e.Code != 0 || !e.Intended {
		t.Fatalf("exit %+v", e)
	}
	if len(e.Stderr) != 40 {
		t.Fatalf("stderr tail holds %d lines, want the last 40", len(e.Stderr))
	}
	for _, l := range e.Stderr {
		if len(l) > maxLine {
			t.Fatalf("tail line of %d bytes, limit %d", len(l), maxLine)
		}
	}
	if !hasLine(e.Stderr, "shutdown received") || hasLine(e.Stderr, "noise 0:") {
		t.Errorf("stderr tail is not the last lines: %q", e.Stderr)
	}
	assertGone(t, proc.PID)
}

func TestTailWriterSplitsLongLines(t *testing.T) {
	tw := newTailWriter(testLog(), 3)
	_, _ = tw.Write([]byte("a\r\n\nb"))
	_, _ = tw.Write([]byte("c\n" + strings.Repeat("x", maxLine+5)))
	tw.flush()
	got := tw.lines()
	want := []string{"bc", strings.Repeat("x", maxLine), "xxxxx"}
	if len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("lines %q", got)
	}
}

func TestProcessStartFailure(t *testing.T) {
	_, err := Start(3, Command{Path: "/nonexistent/krserve-python"}, testLog(), func(*ipc.Message) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "start /nonexistent/krserve-python") {
		t.Fatalf("err %v", err)
	}
}

// A frame larger than the pipe's buffer: Send's direct write takes what the
// pipe holds, the writer goroutine the rest, and frames sent meanwhile queue
// behind it. The worker sees every byte, in order.
func TestProcessSendLargerThanPipe(t *testing.T) {
	proc, msgs := startFake(t, "ok")
	recv(t, msgs, ipc.THello)
	big := strings.Repeat("abcdefghij", 30000) // 300 kB: several pipe buffers
	send(t, proc, &ipc.Message{T: ipc.TGen, ID: 20, MaxTokens: 1, Text: big})
	send(t, proc, &ipc.Message{T: ipc.TGen, ID: 21, MaxTokens: 1, Text: "ok"})
	send(t, proc, &ipc.Message{T: ipc.TPing, Seq: 9})
	// The fake tokenizes a byte per token and numbers the first output token
	// after the prompt's first id; each gen runs on its own goroutine, so the
	// two answers may interleave.
	first, ptoks := map[uint64]int32{}, map[uint64]int{}
	pong := false
	for len(ptoks) < 2 || !pong {
		select {
		case m := <-msgs:
			switch m.T {
			case ipc.TTok:
				first[m.ID] = m.IDs[0]
			case ipc.TDone:
				ptoks[m.ID] = m.PToks
			case ipc.TPong:
				pong = m.Seq == 9
			default:
				t.Fatalf("unexpected frame %+v", m)
			}
		case <-time.After(waitLimit):
			t.Fatalf("answers so far: first tokens %v, prompt tokens %v, pong %v", first, ptoks, pong)
		}
	}
	if first[20] != 'a' || ptoks[20] != len(big) || first[21] != 'o' || ptoks[21] != 2 {
		t.Fatalf("first tokens %v, prompt tokens %v; want 'a' after %d and 'o' after 2", first, ptoks, len(big))
	}
}

func TestTellingLine(t *testing.T) {
	for _, tc := range []struct {
		lines []string
		want  string
	}{
		{nil, ""},
		{[]string{"loading", "ready"}, "ready"},
		{[]string{"Fatal Python error: Segmentation fault", "", "Current thread 0x1 (most recent call first):",
			`  File "x.py", line 1 in f`, "Extension modules: msgpack._cmsgpack (total: 1)"}, "Fatal Python error: Segmentation fault"},
		{[]string{"krserve_worker: fault injection: segv-on-prompt: request 7: segmentation fault", "Fatal Python error: Segmentation fault",
			"Extension modules: numpy (total: 1)"}, "Fatal Python error: Segmentation fault"},
		{[]string{"Traceback (most recent call last):", `  File "w.py", line 3`, "ValueError: bad", "krserve_worker: bye"}, "ValueError: bad"},
		{[]string{"Extension modules: a (total: 1)"}, ""},
	} {
		if got := tellingLine(tc.lines); got != tc.want {
			t.Errorf("tellingLine(%q) = %q, want %q", tc.lines, got, tc.want)
		}
	}
}
