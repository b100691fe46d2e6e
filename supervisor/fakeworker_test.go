package supervisor

// A fake worker for the supervisor's tests: the test binary re-executes itself
// (hashicorp/go-plugin's TestHelperProcess pattern) and, when fakeEnv is set,
// speaks the real protocol (docs/protocol.md) with the ipc package instead of
// running tests.
//
// fakeEnv holds "mode[,key=value...]". Modes:
//
//	ok                 well behaved: hello, pong, a deterministic gen stream,
//	                   cancel, exits on shutdown or stdin EOF
//	crash-on-start     Python traceback on stderr, exit 1 before hello
//	fatal-error        error frame with id 0 ("model failed to load"), exit 1
//	bad-version        hello with v=1 (the supervisor speaks 2)
//	slow-start         hello only after delay (default 1 h)
//	crash-mid-stream   after k tokens (default 3) kill itself with sig (default SEGV)
//	hang               after hello: no pong, no token, ignores shutdown/EOF
//	stall              answers pings, never produces a token
//	garbage-oversize   at the trigger: a length prefix of 0xffffffff
//	garbage-body       at the trigger: a frame whose body is not msgpack
//	garbage-tok        at the trigger: a tok for an id nobody gave it
//	ignore-shutdown    serves, but ignores shutdown, stdin EOF and SIGTERM
//	term-only          serves, ignores shutdown and EOF; SIGTERM kills it
//	noisy-stderr       serves while writing many stderr lines (and one huge one)
//	exit-after-hello   hello, then exit 0 at once
//	die                before hello: exit with code, or kill itself with sig
//	orphan             starts a grandchild holding its stderr (mode linger), then exit 1
//	linger             sleeps 20 s (a grandchild that outlives the worker)
//	no-read            hello, then never reads stdin again
//	close-stdin        hello, closes stdin, pong (seq 1), exits with code 5 after delay (default 1 s)
//	ssh                stands for ssh and the remote wrapper of a follower:
//	                   prints a login banner, then the wrapper's marker; writes
//	                   its arguments and the preamble to the file named by
//	                   KRSERVE_FAKE_SSH_LOG; exits 42 after k (default 3)
//	                   keep-alive frames, 43 on anything else on stdin
//
// Options: k, sig (SEGV, ABRT, KILL, BUS), code, delay, tokdelay (between
// tokens), on (ping or gen: what triggers a garbage mode), rss (pong rss),
// cache (pong cache), evict (pong evicted grows by this much a ping),
// budget (hello cache_bytes: the prompt cache budget; 0, the default: off),
// follower (speak or fatal: what a group's follower does, see runFake).
//
// The gen stream is deterministic: token i of a request with prompt p has id
// p[0]+i and text "t<i> ". A gen with text or messages instead of prompt ids
// is tokenized here as a byte per token (text, then "role:content\n" for
// each message). Like a streaming detokenizer, each tok event holds
// back the text of its own token and carries the previous token's text; done
// flushes the rest. A resumed gen replays resume (checking the ids) and skips
// the first sent bytes of its text, so concatenating every text of a request
// across workers always gives fakeText(0, max_tokens).

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/krserve/krserve/ipc"
)

const fakeEnv = "KRSERVE_FAKE_WORKER"

func TestMain(m *testing.M) {
	if spec, ok := os.LookupEnv(fakeEnv); ok {
		os.Exit(runFake(spec))
	}
	os.Exit(m.Run())
}

// fakeTokText is the text of token i.
func fakeTokText(i int) string { return "t" + strconv.Itoa(i) + " " }

// fakeText is the text of tokens [from, to).
func fakeText(from, to int) string {
	var b strings.Builder
	for i := from; i < to; i++ {
		b.WriteString(fakeTokText(i))
	}
	return b.String()
}

type fakeWorker struct {
	mode string
	opt  map[string]string

	wmu sync.Mutex
	out *os.File

	mu      sync.Mutex
	cancels map[uint64]chan struct{}
	emitted int // tokens emitted by this process, all requests
}

func parseSpec(spec string) (string, map[string]string) {
	parts := strings.Split(spec, ",")
	opt := map[string]string{}
	for _, kv := range parts[1:] {
		k, v, _ := strings.Cut(kv, "=")
		opt[k] = v
	}
	return parts[0], opt
}

func (f *fakeWorker) optInt(k string, def int) int {
	if v, ok := f.opt[k]; ok {
		n, err := strconv.Atoi(v)
		if err == nil {
			return n
		}
	}
	return def
}

func (f *fakeWorker) optDur(k string, def time.Duration) time.Duration {
	if v, ok := f.opt[k]; ok {
		d, err := time.ParseDuration(v)
		if err == nil {
			return d
		}
	}
	return def
}

func (f *fakeWorker) sig() syscall.Signal {
	switch f.opt["sig"] {
	case "ABRT":
		return syscall.SIGABRT
	case "KILL":
		return syscall.SIGKILL
	case "BUS":
		return syscall.SIGBUS
	default:
		return syscall.SIGSEGV
	}
}

func (f *fakeWorker) send(m *ipc.Message) {
	b, err := ipc.AppendMessage(nil, m)
	if err != nil {
		panic(err)
	}
	f.raw(b)
}

// raw writes bytes to the protocol channel in one Write, under the lock.
func (f *fakeWorker) raw(b []byte) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	if _, err := f.out.Write(b); err != nil {
		os.Exit(4) // the supervisor is gone
	}
}

// sleepForever blocks without tripping the runtime's deadlock detector.
func sleepForever() {
	for {
		time.Sleep(time.Hour)
	}
}

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

// die ends the process with sig the way a crashing CPython does: the
// faulthandler dump on stderr, then the signal's default action (the Go
// runtime's handler is taken off first so the exit status really is the
// signal). No core file is written.
func die(sig syscall.Signal) {
	switch sig {
	case syscall.SIGSEGV:
		logf("Fatal Python error: Segmentation fault")
	case syscall.SIGABRT:
		logf("Fatal Python error: Aborted")
	case syscall.SIGBUS:
		logf("Fatal Python error: Bus error")
	}
	if sig != syscall.SIGKILL {
		logf("")
		logf("Current thread 0x00007f0000000000 (most recent call first):")
		logf(`  File "/krserve/worker-py/krserve_worker/worker.py", line 212 in step`)
	}
	const prSetDumpable = 4
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetDumpable, 0, 0)
	var dfl [4]uint64 // struct sigaction with sa_handler = SIG_DFL, no flags
	_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&dfl)), 0, 8, 0, 0)
	_ = syscall.Kill(os.Getpid(), sig)
	time.Sleep(10 * time.Second)
	os.Exit(99) // not reached
}

func runFake(spec string) int {
	mode, opt := parseSpec(spec)
	f := &fakeWorker{mode: mode, opt: opt, out: os.Stdout, cancels: map[uint64]chan struct{}{}}
	pid := os.Getpid()

	if mode == "ssh" {
		return fakeSSH(f)
	}
	// A follower of a group (MLX_RANK > 0) never speaks the protocol: it
	// reports its environment on stderr and runs until its stdin closes
	// (the group's stop: a real follower exits on its leader's word), then
	// exits 0 (follower=speak: it sends a pong anyway; follower=fatal: it
	// reports a fatal error and exits 1).
	if r := os.Getenv("MLX_RANK"); r != "" && r != "0" {
		logf("pid=%d rank=%s hostfile=%s addr=%s", pid, r, os.Getenv("MLX_HOSTFILE"), os.Getenv("KRSERVE_GROUP_ADDR"))
		switch opt["follower"] {
		case "speak":
			f.send(&ipc.Message{T: ipc.TPong, Seq: 1})
		case "fatal":
			f.send(&ipc.Message{T: ipc.TError, Code: "internal", Msg: "rank cannot load its shard"})
			return 1
		}
		_, _ = io.Copy(io.Discard, os.Stdin)
		return 0
	}

	switch mode {
	case "linger":
		time.Sleep(20 * time.Second)
		return 0
	case "crash-on-start":
		logf("pid=%d: loading model", pid)
		logf("Traceback (most recent call last):")
		logf(`  File "<frozen runpy>", line 198, in _run_module_as_main`)
		logf(`  File "/krserve/worker-py/krserve_worker/__main__.py", line 4, in <module>`)
		logf("    main()")
		logf(`  File "/krserve/worker-py/krserve_worker/worker.py", line 88, in load`)
		logf("    model, tokenizer = mlx_lm.load(path)")
		logf("FileNotFoundError: [Errno 2] No such file or directory: '/models/missing/config.json'")
		return 1
	case "fatal-error":
		f.send(&ipc.Message{T: ipc.TError, Code: "internal", Msg: "model failed to load: out of memory"})
		logf("RuntimeError: [metal::malloc] Attempting to allocate 99999999999 bytes")
		return 1
	case "die":
		logf("pid=%d: about to die", pid)
		if _, ok := opt["sig"]; ok {
			die(f.sig())
		}
		return f.optInt("code", 1)
	case "orphan":
		self, err := os.Executable()
		if err != nil {
			logf("executable: %v", err)
			return 5
		}
		// Like a Python subprocess: fds 1 and 2 are the worker's stderr
		// (the real worker moves the protocol off fd 1).
		c := exec.Command(self)
		c.Env = []string{fakeEnv + "=linger", "GORACE=atexit_sleep_ms=0"}
		c.Stdout, c.Stderr = os.Stderr, os.Stderr
		if err := c.Start(); err != nil {
			logf("start grandchild: %v", err)
			return 5
		}
		logf("grandchild=%d", c.Process.Pid)
		return 1
	case "slow-start":
		logf("pid=%d: loading model slowly", pid)
		time.Sleep(f.optDur("delay", time.Hour))
	case "noisy-stderr":
		for i := range 2000 {
			logf("noise %d: mlx warning, nothing to see", i)
		}
		fmt.Fprint(os.Stderr, strings.Repeat("x", 3*maxLine+10)+"\n")
	}

	switch mode {
	case "ignore-shutdown":
		c := make(chan os.Signal, 4)
		signal.Notify(c, syscall.SIGTERM)
		go func() {
			for range c {
				logf("ignoring SIGTERM")
			}
		}()
	}

	v := ipc.Version
	if mode == "bad-version" {
		v = 1 // the version before ipc.Version
	}
	f.send(&ipc.Message{T: ipc.THello, V: v, PID: pid, Model: "fake-model", Ctx: 4096, Vocab: 1000,
		EOS: []int32{2}, Caps: []string{"resume", "stop"}, Versions: map[string]string{"krserve_worker": "fake"},
		CacheBytes: int64(f.optInt("budget", 0))})
	switch mode {
	case "exit-after-hello":
		return 0
	case "no-read":
		sleepForever()
	case "close-stdin":
		os.Stdin.Close()
		f.send(&ipc.Message{T: ipc.TPong, Seq: 1})
		time.Sleep(f.optDur("delay", time.Second))
		return 5
	}
	if mode == "noisy-stderr" {
		go func() {
			for i := 0; ; i++ {
				logf("background noise %d", i)
				time.Sleep(time.Millisecond)
			}
		}()
	}

	var buf []byte
	for {
		body, err := ipc.ReadFrame(os.Stdin, buf)
		if err == io.EOF {
			logf("stdin closed")
			return f.exitOnRequest()
		}
		if err != nil {
			logf("protocol error: %v", err)
			return 3
		}
		buf = body[:0]
		var m ipc.Message
		if err := ipc.Decode(body, &m); err != nil {
			logf("protocol error: %v", err)
			return 3
		}
		if f.mode == "hang" {
			continue // reads (so the pipe never fills) and does nothing
		}
		switch m.T {
		case ipc.TPing:
			if f.garbage("ping", m.ID) {
				continue
			}
			f.mu.Lock()
			active := len(f.cancels)
			f.mu.Unlock()
			f.send(&ipc.Message{T: ipc.TPong, Seq: m.Seq, Active: active, RSS: int64(f.optInt("rss", 1<<20)),
				Cache: int64(f.optInt("cache", 0)), Evicted: int64(m.Seq) * int64(f.optInt("evict", 0))})
		case ipc.TCancel:
			f.mu.Lock()
			if c, ok := f.cancels[m.ID]; ok {
				close(c)
				delete(f.cancels, m.ID)
			}
			f.mu.Unlock()
		case ipc.TGen:
			if f.garbage("gen", m.ID) {
				continue
			}
			if f.mode == "stall" {
				continue
			}
			c := make(chan struct{})
			f.mu.Lock()
			f.cancels[m.ID] = c
			f.mu.Unlock()
			go f.gen(m, c)
		case ipc.TShutdown:
			logf("shutdown received")
			if r := f.exitOnRequest(); r >= 0 {
				return r
			}
		}
	}
}

// exitOnRequest is what the worker does on shutdown or EOF: exit 0, or (for
// the modes that misbehave) ignore it.
func (f *fakeWorker) exitOnRequest() int {
	switch f.mode {
	case "ignore-shutdown", "term-only", "hang":
		logf("ignoring the request to exit")
		sleepForever()
	}
	return 0
}

// garbage plays a garbage mode if the trigger matches; it reports whether it did.
func (f *fakeWorker) garbage(trigger string, id uint64) bool {
	if !strings.HasPrefix(f.mode, "garbage-") {
		return false
	}
	on := f.opt["on"]
	if on == "" {
		on = "ping"
	}
	if on != trigger {
		return false
	}
	switch f.mode {
	case "garbage-oversize":
		f.raw([]byte{0xff, 0xff, 0xff, 0xff, 'x'})
	case "garbage-body":
		f.raw(ipc.AppendFrame(nil, []byte("Loading weights: 100%|##########|\n")))
	case "garbage-tok":
		f.send(&ipc.Message{T: ipc.TTok, ID: id + 1_000_000, IDs: []int32{7}, Text: "stolen"})
	}
	logf("wrote garbage (%s)", f.mode)
	return true
}

// tokenizeBytes is the fake's tokenizer: a token per byte of the text, then
// of "role:content\n" for each chat message.
func tokenizeBytes(m *ipc.Message) []int32 {
	text := m.Text
	for _, cm := range m.Messages {
		text += cm.Role + ":" + cm.Content + "\n"
	}
	ids := make([]int32, 0, len(text))
	for i := 0; i < len(text); i++ {
		ids = append(ids, int32(text[i]))
	}
	return ids
}

func (f *fakeWorker) gen(m ipc.Message, cancel chan struct{}) {
	defer func() {
		f.mu.Lock()
		delete(f.cancels, m.ID)
		f.mu.Unlock()
	}()
	if len(m.Prompt) == 0 {
		m.Prompt = tokenizeBytes(&m)
	}
	// As krserve_worker/params.py: max_tokens 0 only for a resume, which then
	// just flushes the text the dead worker held back.
	if len(m.Prompt) == 0 || m.MaxTokens < 0 || (m.MaxTokens == 0 && len(m.Resume) == 0) {
		f.send(&ipc.Message{T: ipc.TError, ID: m.ID, Code: "invalid", Msg: "max_tokens must be >= 1 (0 only for a resume) and prompt non-empty"})
		return
	}
	base := m.Prompt[0]
	for i, id := range m.Resume {
		if id != base+int32(i) {
			f.send(&ipc.Message{T: ipc.TError, ID: m.ID, Code: "internal", Msg: fmt.Sprintf("resume[%d]=%d, want %d", i, id, base+int32(i))})
			return
		}
	}
	replay := fakeText(0, len(m.Resume))
	if m.Sent > len(replay) {
		f.send(&ipc.Message{T: ipc.TError, ID: m.ID, Code: "internal", Msg: fmt.Sprintf("sent=%d beyond the %d bytes of resumed text", m.Sent, len(replay))})
		return
	}
	pending := replay[m.Sent:] // text of resumed tokens the client has not seen
	delay := f.optDur("tokdelay", 0)
	for j := 0; j < m.MaxTokens; j++ {
		if delay > 0 {
			select {
			case <-time.After(delay):
			case <-cancel:
			}
		}
		select {
		case <-cancel:
			f.send(&ipc.Message{T: ipc.TDone, ID: m.ID, Reason: "cancelled", PToks: len(m.Prompt) + len(m.Resume), CToks: j})
			return
		default:
		}
		i := len(m.Resume) + j
		text := pending
		pending = fakeTokText(i)
		f.send(&ipc.Message{T: ipc.TTok, ID: m.ID, IDs: []int32{base + int32(i)}, Text: text})
		if f.mode == "crash-mid-stream" {
			f.mu.Lock()
			f.emitted++
			n := f.emitted
			f.mu.Unlock()
			if n == f.optInt("k", 3) {
				die(f.sig())
			}
		}
	}
	f.send(&ipc.Message{T: ipc.TDone, ID: m.ID, Reason: "length", PToks: len(m.Prompt) + len(m.Resume), CToks: m.MaxTokens, Text: pending})
}

// fakeSSH is mode ssh (see the list of modes).
func fakeSSH(f *fakeWorker) int {
	fmt.Print("Last login: yesterday\n")
	os.Stdout.Write(remoteMarker)
	pre, err := ipc.ReadFrame(os.Stdin, nil)
	if err != nil {
		logf("no preamble: %v", err)
		return 44
	}
	doc, _ := json.Marshal(map[string]any{"args": os.Args[1:], "preamble": string(pre)})
	if err := os.WriteFile(os.Getenv("KRSERVE_FAKE_SSH_LOG"), doc, 0o644); err != nil {
		logf("log: %v", err)
		return 45
	}
	var hdr [4]byte
	for n := 0; n < f.optInt("k", 3); n++ {
		if _, err := io.ReadFull(os.Stdin, hdr[:]); err != nil || hdr != [4]byte{} {
			return 43
		}
	}
	return 42
}
