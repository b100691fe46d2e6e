package supervisor

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
)

// countFDs counts this process's open file descriptors.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// countChildren counts processes (zombies included) whose parent is this
// process.
func countChildren(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	me, n := os.Getpid(), 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 {
			if ppid, _ := strconv.Atoi(f[1]); ppid == me {
				n++
			}
		}
	}
	return n
}

// shellHello is a worker that says hello and exits: sh's printf with the
// frame as octal escapes.
func shellHello() (Command, error) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		return Command{}, err
	}
	frame, err := ipc.AppendMessage(nil, &ipc.Message{T: ipc.THello, V: ipc.Version, PID: 1, Model: "sh"})
	if err != nil {
		return Command{}, err
	}
	var esc strings.Builder
	for _, b := range frame {
		fmt.Fprintf(&esc, "\\%03o", b)
	}
	return Command{Path: "/bin/sh", Args: []string{"-c", "printf '" + esc.String() + "'"}, Env: []string{}}, nil
}

type usage struct{ fds, goroutines, children int }

func (u usage) String() string {
	return fmt.Sprintf("%d fds, %d goroutines, %d children", u.fds, u.goroutines, u.children)
}

func measure(t testing.TB) usage {
	return usage{countFDs(t), runtime.NumGoroutine(), countChildren(t)}
}

// settle polls until usage is back to base (goroutines and processes take a
// moment to wind down after their last event) and fails with the difference
// if it is not within the deadline.
func settle(t testing.TB, base usage) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		u := measure(t)
		if u.fds <= base.fds && u.goroutines <= base.goroutines && u.children == 0 {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("leak: before %s, after %s\n%s", base, u, buf)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestNoLeaksAcrossRestarts (after node_exporter's TestFileDescriptorLeak):
// 100 worker restarts through the pool, then Start/Stop and Start/Kill
// cycles, leave no file descriptor, goroutine or child process behind.
func TestNoLeaksAcrossRestarts(t *testing.T) {
	// Warm up: the first child creates the runtime's poller and probes pidfd
	// support; those fds live for the whole process.
	proc, err := Start(0, fakeCommand(t, "ok"), testLog(), func(*ipc.Message) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	proc.Stop(waitLimit)
	base := measure(t)
	if base.children != 0 {
		t.Fatalf("%d children before the test", base.children)
	}

	// 100 restarts of a worker that exits right after hello. The fake here
	// is sh's printf writing the hello frame: a race-built test binary takes
	// tens of ms to start, and the supervisor's side is the same.
	pl := newPlan(t, "exit-after-hello")
	cfg := testConfig(pl)
	if sh, err := shellHello(); err == nil {
		cfg.Command = func(slot int) Command {
			pl.command(slot) // count it
			return sh
		}
	} else {
		t.Logf("no /bin/sh (%v): restarting the Go fake worker", err)
	}
	r := newFakeRouter()
	p := newTestPool(t, cfg, r)
	began := time.Now()
	stop := runPool(t, p)
	deadline := time.After(4 * waitLimit)
	for i := 0; i < 100; i++ {
		select {
		case <-pl.started:
		case <-deadline:
			t.Fatalf("only %d starts within %s", i, 4*waitLimit)
		}
	}
	stop()
	t.Logf("100 restarts in %s", time.Since(began).Round(time.Millisecond))
	if st := slot0(p); st.Starts < 100 || st.State != StateStopped {
		t.Fatalf("status %+v", st)
	}
	if n := count(r.wait(t, "-", func([]routerEvent) bool { return true }), "add"); n == 0 {
		t.Fatal("no worker ever registered")
	}
	settle(t, base)

	for i := range 20 {
		proc, err := Start(i, fakeCommand(t, "ok"), testLog(), func(*ipc.Message) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			proc.Stop(waitLimit)
		} else {
			proc.Kill(errors.New("leak test"))
			<-proc.Done()
		}
	}
	// A start that fails must not leak its pipes either.
	for range 20 {
		if _, err := Start(0, Command{Path: "/nonexistent/python"}, testLog(), nil); err == nil {
			t.Fatal("started a nonexistent program")
		}
	}
	settle(t, base)
}
