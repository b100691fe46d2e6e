package supervisor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/kballard/go-shellquote"
)

func TestHostLocal(t *testing.T) {
	for name, want := range map[string]bool{"127.0.0.1": true, "localhost": true, "::1": true,
		"mac2": false, "10.0.0.2": false, "user@mac2": false, "127.0.0.2": false, "": false} {
		if got := (Host{SSH: name}).Local(); got != want {
			t.Errorf("Host{SSH: %q}.Local() = %v, want %v", name, got, want)
		}
	}
}

// The ring's addresses follow mlx.launch: consecutive ports in rank and
// address order; rank 0's control link takes the block's last port on its
// first IP.
func TestRingLayout(t *testing.T) {
	hs := &Hosts{Hosts: []Host{{SSH: "a", IPs: []string{"10.0.0.1", "10.0.1.1"}}, {SSH: "b", IPs: []string{"10.0.0.2"}}, {SSH: "c", IPs: []string{"fe80::2"}}}}
	if n := hs.PortsPerGroup(); n != 5 {
		t.Fatalf("PortsPerGroup = %d, want 5 (4 addresses + control)", n)
	}
	ring, control := hs.ring(40000)
	want := [][]string{{"10.0.0.1:40000", "10.0.1.1:40001"}, {"10.0.0.2:40002"}, {"[fe80::2]:40003"}}
	if !slices.EqualFunc(ring, want, slices.Equal) || control != "10.0.0.1:40004" {
		t.Fatalf("ring %v control %s; want %v and 10.0.0.1:40004", ring, control, want)
	}
}

func testHosts() *Hosts {
	return &Hosts{
		Hosts:  []Host{{SSH: "127.0.0.1", IPs: []string{"10.0.0.1"}}, {SSH: "alice@mac2", IPs: []string{"10.0.0.2"}}},
		SSH:    []string{"/usr/bin/ssh", "-i", "/keys/id ed", "-o", "BatchMode=no"},
		SSHEnv: []string{"HOME=/home/me", "SSH_AUTH_SOCK=/tmp/agent"},
		Env:    []string{"MLX_METAL_FAST_SYNCH=1", "NOTE=it's a \"test\" $HOME"},
		Python: "/opt/krserve/.venv/bin/python", IdleExit: 10 * time.Second, Grace: 1500 * time.Millisecond,
	}
}

func TestRemoteCommand(t *testing.T) {
	hs := testHosts()
	worker := Command{Path: "/opt/krserve/.venv/bin/python", Args: []string{"-m", "krserve_worker", "--model", "/models/my model", "--group-size", "2"},
		Env: []string{"PATH=/usr/bin", "HOME=/home/me", "TMPDIR=/var/folders/x", "LC_ALL=C", "LANG=C", "PYTHONPATH=/opt/krserve/worker-py",
			"HF_HUB_OFFLINE=1", "OPENBLAS_NUM_THREADS=1", "NOTE=from the worker env"}}
	c, err := hs.remoteCommand(1, hs.Hosts[1], worker,
		[]string{"MLX_RANK=1", "KRSERVE_GROUP_ADDR=10.0.0.1:40002", `KRSERVE_RING_HOSTS=[["10.0.0.1:40000"],["10.0.0.2:40001"]]`},
		[]string{"KRSERVE_GROUP_TOKEN=0123abcd"})
	if err != nil {
		t.Fatal(err)
	}
	// ssh, the user's options first (ssh keeps the first value of an option),
	// then krserve's, the destination and one command line.
	wantHead := []string{"-i", "/keys/id ed", "-o", "BatchMode=no", "-T", "-o", "BatchMode=yes", "alice@mac2"}
	if c.Path != "/usr/bin/ssh" || len(c.Args) != len(wantHead)+1 || !slices.Equal(c.Args[:len(wantHead)], wantHead) {
		t.Fatalf("ssh command %s %q", c.Path, c.Args)
	}
	if !slices.Equal(c.Env, hs.SSHEnv) || c.Host != "alice@mac2" || !bytes.Equal(c.StdoutMarker, remoteMarker) {
		t.Errorf("env %q host %q marker %q", c.Env, c.Host, c.StdoutMarker)
	}
	line := c.Args[len(c.Args)-1]
	if strings.Contains(strings.Join(c.Args, " "), "0123abcd") {
		t.Errorf("the group token is on the ssh command line: %s", line)
	}
	words, err := shellquote.Split(line)
	if err != nil {
		t.Fatalf("the remote line does not parse: %v: %s", err, line)
	}
	i := slices.Index(words, hs.Python)
	if i < 0 || words[0] != "exec" || words[1] != "env" {
		t.Fatalf("remote line %q: want exec env VARS... python ...", words)
	}
	vars, run := words[2:i], words[i:]
	wantVars := []string{"PYTHONPATH=/opt/krserve/worker-py", "HF_HUB_OFFLINE=1", "OPENBLAS_NUM_THREADS=1",
		"MLX_METAL_FAST_SYNCH=1", `NOTE=it's a "test" $HOME`, // the host file's envs win over the worker's
		"MLX_RANK=1", "KRSERVE_GROUP_ADDR=10.0.0.1:40002", `KRSERVE_RING_HOSTS=[["10.0.0.1:40000"],["10.0.0.2:40001"]]`}
	if !slices.Equal(vars, wantVars) {
		t.Errorf("remote environment\n got %q\nwant %q (PATH, HOME, TMPDIR, LANG, LC_* are the remote login's own)", vars, wantVars)
	}
	wantRun := append([]string{hs.Python, "-m", "krserve_worker.remote", "--rank", "1", "--idle-exit", "10", "--grace", "1.5", "--", worker.Path}, worker.Args...)
	if !slices.Equal(run, wantRun) {
		t.Errorf("remote command\n got %q\nwant %q", run, wantRun)
	}
	// The preamble: one frame of JSON with the secret.
	if len(c.Preamble) < 4 || int(binary.BigEndian.Uint32(c.Preamble)) != len(c.Preamble)-4 {
		t.Fatalf("preamble %q is not one frame", c.Preamble)
	}
	var pre struct{ Env map[string]string }
	if err := json.Unmarshal(c.Preamble[4:], &pre); err != nil || pre.Env["KRSERVE_GROUP_TOKEN"] != "0123abcd" || len(pre.Env) != 1 {
		t.Errorf("preamble %s: %v", c.Preamble[4:], err)
	}
}

// What a POSIX shell on the remote host makes of the line: every word and
// variable exactly as meant, whatever quotes, spaces and dollars they hold.
func TestRemoteLineThroughAShell(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	dump := filepath.Join(t.TempDir(), "python")
	if err := os.WriteFile(dump, []byte("#!/bin/sh\nfor a in \"$@\"; do printf 'arg:%s\\n' \"$a\"; done\nenv | sed 's/^/env:/'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	hs := testHosts()
	hs.Python = dump
	worker := Command{Path: "/py thon", Args: []string{"--model", "/m/it's $HOME", "a;b", "`x`", ""}, Env: []string{"PYTHONPATH=/a b"}}
	c, err := hs.remoteCommand(1, hs.Hosts[1], worker, []string{"MLX_RANK=1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sh, "-c", c.Args[len(c.Args)-1]).Output()
	if err != nil {
		t.Fatalf("sh -c: %v", err)
	}
	var args []string
	env := map[string]string{}
	for _, l := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
		if a, ok := strings.CutPrefix(l, "arg:"); ok {
			args = append(args, a)
		} else if kv, ok := strings.CutPrefix(l, "env:"); ok {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
	}
	want := append([]string{"-m", "krserve_worker.remote", "--rank", "1", "--idle-exit", "10", "--grace", "1.5", "--", "/py thon"}, worker.Args...)
	if !slices.Equal(args, want) {
		t.Errorf("args through sh\n got %q\nwant %q", args, want)
	}
	for k, v := range map[string]string{"PYTHONPATH": "/a b", "NOTE": `it's a "test" $HOME`, "MLX_RANK": "1", "MLX_METAL_FAST_SYNCH": "1"} {
		if env[k] != v {
			t.Errorf("%s through sh = %q, want %q", k, env[k], v)
		}
	}
}

func TestPortBlocks(t *testing.T) {
	b, err := NewPortBlocks(40000, 3, 3)
	if err != nil {
		t.Fatal(err)
	}
	p0, rel0, _ := b.Acquire()
	p1, rel1, _ := b.Acquire()
	if p0 != 40000 || p1 != 40003 {
		t.Fatalf("first blocks at %d, %d; want 40000, 40003", p0, p1)
	}
	rel0()
	rel0() // twice is once
	p2, _, _ := b.Acquire()
	p3, rel3, _ := b.Acquire() // in turn: block 0 again, only after block 2
	if p2 != 40006 || p3 != 40000 {
		t.Fatalf("next blocks at %d, %d; want 40006 then 40000 (a restart takes the next block)", p2, p3)
	}
	if _, _, err := b.Acquire(); err == nil {
		t.Fatal("a fourth block out of three")
	}
	rel1()
	rel3()
	if p, _, err := b.Acquire(); err != nil || p != 40003 {
		t.Fatalf("after release: %d, %v; want 40003 (block 0 is next after it)", p, err)
	}
	for _, bad := range [][3]int{{0, 3, 1}, {65535, 2, 1}, {65000, 10, 54}, {1000, 0, 1}, {1000, 1, 0}} {
		if _, err := NewPortBlocks(bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("NewPortBlocks%v accepted", bad)
		}
	}
}

func TestSkipToMarker(t *testing.T) {
	frames := []byte{0, 0, 0, 2, 0x81, 0xa1}
	for _, tc := range []struct {
		name, junk string
		in         []byte
	}{
		{"nothing before", "", append(append([]byte{}, remoteMarker...), frames...)},
		{"a login script's echo", "Welcome!\nlast login\n", append(append([]byte("Welcome!\nlast login\n"), remoteMarker...), frames...)},
		{"a partial marker first", "\x00krserve-rem\n", append(append([]byte("\x00krserve-rem\n"), remoteMarker...), frames...)},
	} {
		var junk []byte
		r := skipToMarker(iotest.OneByteReader(bytes.NewReader(tc.in)), remoteMarker, func(b []byte) { junk = append(junk, b...) })
		rest, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(rest, frames) || string(junk) != tc.junk {
			t.Errorf("%s: rest %q (%v), junk %q; want %q, junk %q", tc.name, rest, err, junk, frames, tc.junk)
		}
	}
	r := skipToMarker(strings.NewReader("ssh: connect to host mac2 port 22: Connection refused\n"), remoteMarker, nil)
	if b, err := io.ReadAll(r); len(b) != 0 || err != nil {
		t.Errorf("no marker: read %q, %v; want nothing", b, err)
	}
}

func TestStartGroupHostsMustMatchSize(t *testing.T) {
	hs := testHosts()
	if _, err := StartGroup(0, 3, hs, fakeCommand(t, "ok"), testLog(), nil, nil); err == nil || !strings.Contains(err.Error(), "3 ranks on 2 hosts") {
		t.Fatalf("StartGroup of 3 on 2 hosts: %v", err)
	}
}

// Ranks whose host is this machine start directly, with the host file's
// addresses, its variables and a block of ports, given back at the end.
func TestGroupOnLocalHosts(t *testing.T) {
	ports, err := NewPortBlocks(41000, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	hs := &Hosts{Hosts: []Host{{SSH: "127.0.0.1", IPs: []string{"127.0.0.1"}}, {SSH: "localhost", IPs: []string{"127.0.0.1"}}},
		Env: []string{"MLX_METAL_FAST_SYNCH=1"}, Ports: ports, Keepalive: time.Millisecond}
	g, frames, _ := startFakeGroupOn(t, 2, hs, "ok")
	waitHello(t, frames)
	b, err := os.ReadFile(filepath.Join(g.tempDir, "hostfile.json"))
	if err != nil || string(b) != `[["127.0.0.1:41000"],["127.0.0.1:41001"]]` {
		t.Fatalf("host file %s, %v", b, err)
	}
	for r, p := range g.ranks {
		env := strings.Join(p.cmd.Env, "\n")
		for _, want := range []string{"MLX_RANK=" + string(rune('0'+r)), "KRSERVE_GROUP_ADDR=127.0.0.1:41002", "MLX_METAL_FAST_SYNCH=1", "KRSERVE_GROUP_TOKEN="} {
			if !strings.Contains(env, want) {
				t.Errorf("rank %d env lacks %q", r, want)
			}
		}
		if p.cmd.Path == "ssh" || g.where[r] != "" {
			t.Errorf("rank %d of a local host went through ssh", r)
		}
	}
	if g.quit != nil {
		t.Error("keep-alives for a group with no remote rank")
	}
	for _, st := range g.RankStatus() {
		if st.Host != "" || st.RSS == 0 {
			t.Errorf("local rank status %+v: want no host and its RSS", st)
		}
	}
	g.Stop(200 * time.Millisecond)
	p0, _, _ := ports.Acquire()
	p1, _, err := ports.Acquire()
	if err != nil || p0 != 41003 || p1 != 41000 {
		t.Errorf("after the group: blocks %d, %d (%v); want its block back", p0, p1, err)
	}
}

// A rank on another host: started through ssh with the remote line, its
// secret in the preamble, a login banner before the wrapper's marker
// skipped, and keep-alives on its stdin.
func TestGroupWithARemoteRank(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(t.TempDir(), "ssh.json")
	ports, _ := NewPortBlocks(42000, 3, 1)
	hs := &Hosts{Hosts: []Host{{SSH: "127.0.0.1", IPs: []string{"10.9.0.1"}}, {SSH: "mac2", IPs: []string{"10.9.0.2"}}},
		SSH: []string{exe, "-o", "ConnectTimeout=5"}, SSHEnv: []string{fakeEnv + "=ssh,k=3", "GORACE=atexit_sleep_ms=0", "KRSERVE_FAKE_SSH_LOG=" + log},
		Python: "/venv/bin/python", Ports: ports, Keepalive: 5 * time.Millisecond, IdleExit: time.Second, Grace: time.Second}
	g, frames, _ := startFakeGroupOn(t, 2, hs, "ok")
	waitHello(t, frames)
	e := waitGroup(t, g)
	if e.Rank != 1 || e.Code != 42 || e.Host != "mac2" || !strings.Contains(e.String(), "rank 1 of 2 (on mac2, over ssh) exited with status 42") {
		t.Fatalf("group exit %q (rank %d, code %d, host %q): want the remote rank's exit 42 after its keep-alives", e, e.Rank, e.Code, e.Host)
	}
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Args     []string
		Preamble string
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Args) != 7 || got.Args[0] != "-o" || got.Args[5] != "mac2" {
		t.Fatalf("ssh args %q", got.Args)
	}
	for _, want := range []string{"MLX_RANK=1", "KRSERVE_GROUP_ADDR=10.9.0.1:42002", `'KRSERVE_RING_HOSTS=[["10.9.0.1:42000"],["10.9.0.2:42001"]]'`, "/venv/bin/python -m krserve_worker.remote --rank 1"} {
		if !strings.Contains(got.Args[6], want) {
			t.Errorf("remote line lacks %q: %s", want, got.Args[6])
		}
	}
	token := ""
	for _, kv := range g.ranks[0].cmd.Env {
		if v, ok := strings.CutPrefix(kv, "KRSERVE_GROUP_TOKEN="); ok {
			token = v
		}
	}
	if token == "" || got.Preamble != `{"env":{"KRSERVE_GROUP_TOKEN":"`+token+`"}}` {
		t.Errorf("preamble %s; want rank 0's token %s", got.Preamble, token)
	}
	st := g.RankStatus()
	if st[1].Host != "mac2" || st[1].RSS != 0 || st[0].Host != "" {
		t.Errorf("rank status %+v", st)
	}
}
