package supervisor

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/krserve/krserve/ipc"
)

// A Group is one worker slot's processes: rank 0, the leader, which speaks
// the protocol, and GroupSize-1 followers, which load their shard of the
// model and mirror the leader's steps (worker-py/krserve_worker/ranks.py).
// With one rank a Group is exactly the one Process.
//
// The group is one crash domain. A rank that dies leaves the others blocked
// inside a collective for ever, so when any rank exits on its own the group
// kills every other rank (SIGKILL to each process group) and the group's exit
// is that rank's. Each rank is a Process: its own process group, the
// parent-death signal, exactly one reaper. The group's join point is one
// goroutine that waits for the first rank to end and then for all of them;
// Done closes after it, once every rank is reaped and drained.
type Group struct {
	PID   int // the leader's
	ranks []*Process

	mu      sync.Mutex
	killing bool  // the supervisor ended the group (Kill or Stop): the leader's exit says why
	first   int   // the rank that ended first, on its own (-1: none)
	exit    *Exit // set before done closes
	done    chan struct{}
	tempDir string // the host file's directory, removed at the end
}

// StartGroup starts size ranks of cmd (size 1: the plain worker, nothing
// added). For more, it writes a ring host file of free loopback ports and
// gives each rank MLX_RANK, MLX_HOSTFILE, KRSERVE_GROUP_ADDR (the leader's
// control address, where followers take each step's work) and
// KRSERVE_GROUP_TOKEN (a fresh secret the followers show it). onMsg hears
// the leader's frames; a follower that writes a frame is broken, except a
// fatal error report (id 0), which onFatal hears.
func StartGroup(id, size int, cmd Command, log *slog.Logger, onMsg func(*ipc.Message) error, onFatal func(rank int, msg string)) (*Group, error) {
	if size <= 1 {
		p, err := Start(id, cmd, log, onMsg)
		if err != nil {
			return nil, err
		}
		return &Group{PID: p.PID, ranks: []*Process{p}, first: -1, done: p.done}, nil
	}
	g := &Group{first: -1, done: make(chan struct{})}
	ports, err := freePorts(size + 1)
	if err != nil {
		return nil, fmt.Errorf("worker %d: ports for a group of %d: %w", id, size, err)
	}
	hosts := make([][]string, size)
	for r := range size {
		hosts[r] = []string{net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[r]))}
	}
	if g.tempDir, err = os.MkdirTemp("", "krserve-group-"); err != nil {
		return nil, fmt.Errorf("worker %d: host file: %w", id, err)
	}
	hostfile := filepath.Join(g.tempDir, "hostfile.json")
	b, _ := json.Marshal(hosts)
	if err := os.WriteFile(hostfile, b, 0o600); err != nil {
		os.RemoveAll(g.tempDir)
		return nil, fmt.Errorf("worker %d: host file: %w", id, err)
	}
	control := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[size]))
	var secret [16]byte
	if _, err := rand.Read(secret[:]); err != nil {
		os.RemoveAll(g.tempDir)
		return nil, fmt.Errorf("worker %d: group token: %w", id, err)
	}
	token := hex.EncodeToString(secret[:])
	for r := range size {
		c := cmd
		c.Env = withEnv(cmd.Env, "MLX_RANK="+strconv.Itoa(r), "MLX_HOSTFILE="+hostfile, "KRSERVE_GROUP_ADDR="+control, "KRSERVE_GROUP_TOKEN="+token)
		on := onMsg
		if r > 0 {
			on = followerFrames(r, onFatal)
		}
		p, err := Start(id, c, log.With("rank", r), on)
		if err != nil {
			for _, q := range g.ranks {
				q.Kill(fmt.Errorf("rank %d of its group failed to start", r))
				<-q.Done()
			}
			os.RemoveAll(g.tempDir)
			return nil, fmt.Errorf("rank %d: %w", r, err)
		}
		g.ranks = append(g.ranks, p)
	}
	g.PID = g.ranks[0].PID
	go g.join()
	return g, nil
}

// followerFrames is a follower's frame handler: it must say nothing but a
// fatal error before it exits.
func followerFrames(rank int, onFatal func(rank int, msg string)) func(*ipc.Message) error {
	return func(m *ipc.Message) error {
		if m.T == ipc.TError && m.ID == 0 {
			if onFatal != nil {
				onFatal(rank, m.Msg)
			}
			return nil
		}
		return fmt.Errorf("%w: rank %d sent a %q frame; only rank 0 speaks the protocol", ipc.ErrProtocol, rank, m.T)
	}
}

// join is the group's join point: the first rank to end takes the others
// down, then it waits for every rank.
func (g *Group) join() {
	ended := make(chan int, len(g.ranks))
	var wg sync.WaitGroup
	for r, p := range g.ranks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-p.Done()
			ended <- r
		}()
	}
	r := <-ended
	g.mu.Lock()
	killing := g.killing
	if !killing {
		g.first = r
	}
	g.mu.Unlock()
	if !killing {
		why := fmt.Errorf("%w: rank %d %s", errPeerDied, r, g.ranks[r].Exit())
		for q, p := range g.ranks {
			if q != r {
				p.Kill(why)
			}
		}
	}
	wg.Wait()
	g.exit = g.groupExit()
	os.RemoveAll(g.tempDir)
	close(g.done)
}

// errPeerDied marks the ranks the group killed because another one died.
var errPeerDied = errors.New("killed with its group")

// groupExit is the exit that stands for the group: the rank that ended on
// its own first, else the leader's (the supervisor's Kill or Stop).
func (g *Group) groupExit() *Exit {
	r := 0
	if g.first >= 0 {
		r = g.first
	}
	e := *g.ranks[r].Exit()
	e.Rank, e.GroupSize = r, len(g.ranks)
	if g.first < 0 {
		// The leader may have exited cleanly (a recycle, a shutdown) while a
		// follower needed its SIGKILL: the leader speaks for the group.
		return &e
	}
	if r != 0 && e.Err == nil && e.Code == 0 && e.Signal == 0 {
		e.Err = errors.New("a follower exited on its own")
	}
	return &e
}

// Ranks is how many processes the group has.
func (g *Group) Ranks() int { return len(g.ranks) }

// Leader is rank 0, the process that speaks the protocol.
func (g *Group) Leader() *Process { return g.ranks[0] }

// Done is closed once every rank has exited and its pipes are drained.
func (g *Group) Done() <-chan struct{} { return g.done }

// Exit is valid after Done is closed.
func (g *Group) Exit() *Exit {
	if len(g.ranks) == 1 {
		return g.ranks[0].Exit()
	}
	return g.exit
}

// Kill marks the group broken for reason err and kills every rank at once;
// the leader's exit carries err.
func (g *Group) Kill(err error) {
	g.mu.Lock()
	if g.first < 0 {
		g.killing = true
	}
	g.mu.Unlock()
	g.ranks[0].Kill(err)
	for _, p := range g.ranks[1:] {
		p.Kill(fmt.Errorf("%w: %v", errPeerDied, err))
	}
}

// Stop stops every rank (staged, Process.Stop): the leader's shutdown frame
// reaches the followers through its broadcast, so they normally exit at once.
// It returns once every rank is reaped.
func (g *Group) Stop(grace time.Duration) *Exit {
	if len(g.ranks) == 1 {
		return g.ranks[0].Stop(grace)
	}
	g.mu.Lock()
	if g.first < 0 {
		g.killing = true
	}
	g.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range g.ranks {
		wg.Add(1)
		go func() { defer wg.Done(); p.Stop(grace) }()
	}
	wg.Wait()
	<-g.done
	return g.exit
}

// RankStatus is one rank of a slot's group, for /stats.
type RankStatus struct {
	Rank  int    `json:"rank"`
	PID   int    `json:"pid"`
	Alive bool   `json:"alive"`
	State string `json:"state"` // running, sleeping, stopped (SIGSTOP), zombie, exited; "" where unknown
	RSS   int64  `json:"rss_bytes,omitempty"`
}

// RankStatus reports every rank: alive until reaped, and where /proc
// exists its scheduler state and resident memory.
func (g *Group) RankStatus() []RankStatus {
	out := make([]RankStatus, len(g.ranks))
	for r, p := range g.ranks {
		st := RankStatus{Rank: r, PID: p.PID, Alive: true}
		select {
		case <-p.exited:
			st.Alive, st.State = false, "exited"
		default:
			st.State, st.RSS = procState(p.PID)
		}
		out[r] = st
	}
	return out
}

// procState reads a live process's state letter and resident set from
// /proc (Linux); "" and 0 elsewhere.
func procState(pid int) (string, int64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return "", 0
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 22 {
		return "", 0
	}
	state := map[string]string{"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "stopped", "Z": "zombie"}[f[0]]
	if state == "" {
		state = f[0]
	}
	rssPages, _ := strconv.ParseInt(f[21], 10, 64) // field 24: rss in pages
	return state, rssPages * int64(os.Getpagesize())
}

// freePorts finds n distinct free loopback TCP ports (held open together so
// they differ; a port may still be taken by someone else before the ranks
// bind it, in which case the group fails to start and is restarted).
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// withEnv returns env with vars (KEY=VALUE) set, replacing earlier values.
func withEnv(env []string, vars ...string) []string {
	out := make([]string, 0, len(env)+len(vars))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		keep := true
		for _, v := range vars {
			if vk, _, _ := strings.Cut(v, "="); vk == k {
				keep = false
				break
			}
		}
		if keep {
			out = append(out, kv)
		}
	}
	return append(out, vars...)
}
