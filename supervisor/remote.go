package supervisor

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// A Host is where one rank of a group runs (one entry of mlx's host file):
// SSH is how to reach it, IPs are its addresses for the ring backend.
type Host struct {
	SSH string
	IPs []string
}

// Local reports whether the host is this machine, which mlx.launch decides
// the same way: its ssh name is a loopback one. Its rank is then started
// directly, as with --group-size, but with the host file's addresses.
func (h Host) Local() bool {
	switch h.SSH {
	case "127.0.0.1", "localhost", "::1":
		return true
	}
	return false
}

// Hosts places every group's ranks on the machines of a host file (krserve
// up --hostfile): rank r runs on Hosts[r], over ssh unless that host is
// Local. A remote rank's one reaper is its local ssh process's; on the host,
// python -m krserve_worker.remote runs the worker in a process group of its
// own and SIGKILLs that group when the ssh session ends (after Grace), or
// when nothing has come from the supervisor for IdleExit (a cut network), so
// killing the ssh process kills what it started.
type Hosts struct {
	Hosts []Host
	// SSH is the ssh program and the user's options (--ssh); krserve adds -T
	// (no terminal: the protocol is binary) and -o BatchMode=yes (never a
	// password or host-key prompt), which the user's own -o options override.
	SSH    []string
	SSHEnv []string // ssh's own environment
	// Env is KEY=VALUE for every rank (the host file's "envs").
	Env []string
	// Python runs the wrapper on every remote host (the workers' own
	// interpreter: the same path on every host).
	Python string
	Ports  *PortBlocks
	// Keepalive: how often the supervisor writes to each remote rank (rank 0
	// also hears its heartbeats). IdleExit: how long a remote rank's wrapper
	// waits for a byte before it ends the rank. Grace: how long after its
	// session ends it waits for the worker to exit before SIGKILL.
	Keepalive, IdleExit, Grace time.Duration
}

// Remote reports whether any rank runs on another host.
func (hs *Hosts) Remote() bool {
	for _, h := range hs.Hosts {
		if !h.Local() {
			return true
		}
	}
	return false
}

// PortsPerGroup is how many ports a group takes: one per address of every rank
// (the ring backend listens on each, as mlx.launch allots them) and one for
// rank 0's control link.
func (hs *Hosts) PortsPerGroup() int {
	n := 1
	for _, h := range hs.Hosts {
		n += len(h.IPs)
	}
	return n
}

// ring is the ring backend's host file for a group whose ports start at
// first: per rank, "ip:port" for each of its addresses, ports consecutive in
// rank and address order (mlx.launch's layout), and rank 0's control address
// (its first IP, the block's last port).
func (hs *Hosts) ring(first int) (ring [][]string, control string) {
	port := first
	for _, h := range hs.Hosts {
		var addrs []string
		for _, ip := range h.IPs {
			addrs = append(addrs, net.JoinHostPort(ip, strconv.Itoa(port)))
			port++
		}
		ring = append(ring, addrs)
	}
	return ring, net.JoinHostPort(hs.Hosts[0].IPs[0], strconv.Itoa(port))
}

// localOnly are variables of the supervisor's machine that a remote rank
// takes from its own login instead.
var localOnly = map[string]bool{"PATH": true, "HOME": true, "USER": true, "LOGNAME": true, "SHELL": true,
	"TMPDIR": true, "TZ": true, "LANG": true, "LD_LIBRARY_PATH": true, "DYLD_LIBRARY_PATH": true}

// remoteMarker is what the wrapper writes on stdout before anything else;
// the supervisor skips what comes before it (a login shell's chatter).
var remoteMarker = []byte("\x00krserve-remote\x00\n")

// keepaliveFrame is a frame of length 0: the wrapper drops it (no protocol
// frame is empty) and notes that the supervisor is still there.
var keepaliveFrame = []byte{0, 0, 0, 0}

// remoteCommand is how rank runs on host h: ssh to it and, there, the
// wrapper (python -m krserve_worker.remote) running the worker's command
// with the worker's environment less what is local to this machine, the host
// file's variables and vars (MLX_RANK, the ring's addresses, rank 0's control
// address). secret variables travel in the preamble, the first frame on ssh's
// stdin, not on a command line anyone on either host can read.
func (hs *Hosts) remoteCommand(rank int, h Host, worker Command, vars, secret []string) (Command, error) {
	var env []string
	for _, kv := range worker.Env {
		k, _, _ := strings.Cut(kv, "=")
		if !localOnly[k] && !strings.HasPrefix(k, "LC_") {
			env = append(env, kv)
		}
	}
	env = withEnv(env, append(append([]string(nil), hs.Env...), vars...)...)
	words := append([]string{"env"}, env...)
	words = append(words, hs.Python, "-m", "krserve_worker.remote", "--rank", strconv.Itoa(rank),
		"--idle-exit", seconds(hs.IdleExit), "--grace", seconds(hs.Grace), "--", worker.Path)
	words = append(words, worker.Args...)
	quoted := make([]string, len(words))
	for i, w := range words {
		quoted[i] = shellQuote(w)
	}
	line := "exec " + strings.Join(quoted, " ")

	pre := map[string]string{}
	for _, kv := range secret {
		k, v, _ := strings.Cut(kv, "=")
		pre[k] = v
	}
	body, err := json.Marshal(map[string]any{"env": pre})
	if err != nil {
		return Command{}, err
	}
	preamble := append([]byte{byte(len(body) >> 24), byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)

	args := append([]string(nil), hs.SSH[1:]...)
	args = append(args, "-T", "-o", "BatchMode=yes", h.SSH, line)
	return Command{Path: hs.SSH[0], Args: args, Env: hs.SSHEnv, Host: h.SSH,
		Preamble: preamble, StdoutMarker: remoteMarker}, nil
}

// shellQuote makes w one word for the remote login shell (sh, bash, zsh: a
// POSIX-like shell, as mlx.launch assumes): as it is when it holds nothing a
// shell treats specially, else in single quotes, which keep everything but a
// single quote (written '\”). go-shellquote's Join would also do, but with
// backslashes a JSON value in the logs becomes hard to read.
func shellQuote(w string) string {
	if w != "" && strings.Trim(w, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return w
	}
	return "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
}

func seconds(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) }

// PortBlocks hands out each group's TCP ports, Size consecutive ones from a
// block among Count starting at Base, in turn and never one a running group
// holds: a restarted group takes the next block, so a rank of the old one
// that lingers on an unreachable host (for up to its wrapper's idle limit)
// cannot bind or pair with the new group's ports. (The ring backend binds
// with SO_REUSEPORT: two ranks could listen on one port at once.)
type PortBlocks struct {
	Base, Size, Count int

	mu   sync.Mutex
	next int
	held map[int]bool
}

// NewPortBlocks checks that count blocks of size ports from base fit below
// 65536.
func NewPortBlocks(base, size, count int) (*PortBlocks, error) {
	if base < 1 || size < 1 || count < 1 || base+size*count-1 > 65535 {
		return nil, fmt.Errorf("ports %d..%d (%d blocks of %d) are not all valid TCP ports", base, base+size*count-1, count, size)
	}
	return &PortBlocks{Base: base, Size: size, Count: count, held: map[int]bool{}}, nil
}

// Acquire returns the first port of a free block and the function that
// gives it back.
func (b *PortBlocks) Acquire() (int, func(), error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for range b.Count {
		i := b.next
		b.next = (b.next + 1) % b.Count
		if !b.held[i] {
			b.held[i] = true
			var once sync.Once
			return b.Base + i*b.Size, func() {
				once.Do(func() {
					b.mu.Lock()
					delete(b.held, i)
					b.mu.Unlock()
				})
			}, nil
		}
	}
	return 0, nil, fmt.Errorf("all %d blocks of ring ports from %d are held by running groups", b.Count, b.Base)
}

// skipToMarker returns a reader of what follows marker in r; junk hears
// whatever came before it (up to 4 KiB of it), once the marker is found.
// If r ends first, the reader ends there too (EOF).
func skipToMarker(r io.Reader, marker []byte, junk func([]byte)) io.Reader {
	br := bufio.NewReader(r)
	var seen bytes.Buffer
	last := marker[len(marker)-1]
	for {
		b, err := br.ReadBytes(last)
		seen.Write(b)
		if bytes.HasSuffix(seen.Bytes(), marker) {
			if before := seen.Len() - len(marker); before > 0 && junk != nil {
				junk(seen.Bytes()[:min(before, 4096)])
			}
			return br
		}
		if seen.Len() > 1<<20 { // keep the tail only: the marker may yet come
			tail := append([]byte(nil), seen.Bytes()[seen.Len()-len(marker):]...)
			seen.Reset()
			seen.Write(tail)
		}
		if err != nil {
			return eofReader{}
		}
	}
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
