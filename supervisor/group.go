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

	where     []string      // per rank: the host it was started on over ssh, "" for this machine
	release   func()        // gives back the group's ports (hosts)
	quit      chan struct{} // closed by join: keepalive ends
	keptAlive chan struct{} // closed when keepalive has ended
}

// StartGroup starts size ranks of cmd (size 1 without hosts: the plain
// worker, nothing added). For more, it lays out the ring backend's host file
// (free loopback ports, or with hosts each host's IPs and a block of
// hosts.Ports) and gives each rank MLX_RANK, MLX_HOSTFILE, KRSERVE_GROUP_ADDR
// (the leader's control address, where followers take each step's work) and
// KRSERVE_GROUP_TOKEN (a fresh secret the followers show it). A rank on a
// remote host is started over ssh (Hosts). onMsg hears the leader's frames;
// a follower that writes a frame is broken, except a fatal error report (id
// 0), which onFatal hears.
func StartGroup(id, size int, hosts *Hosts, cmd Command, log *slog.Logger, onMsg func(*ipc.Message) error, onFatal func(rank int, msg string)) (*Group, error) {
	if hosts != nil && len(hosts.Hosts) != size {
		return nil, fmt.Errorf("worker %d: a group of %d ranks on %d hosts", id, size, len(hosts.Hosts))
	}
	if size <= 1 && hosts == nil {
		p, err := Start(id, cmd, log, onMsg)
		if err != nil {
			return nil, err
		}
		return &Group{PID: p.PID, ranks: []*Process{p}, first: -1, done: p.done}, nil
	}
	g := &Group{first: -1, done: make(chan struct{})}
	var ring [][]string
	var control string
	if hosts == nil {
		ports, err := freePorts(size + 1)
		if err != nil {
			return nil, fmt.Errorf("worker %d: ports for a group of %d: %w", id, size, err)
		}
		for r := range size {
			ring = append(ring, []string{net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[r]))})
		}
		control = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[size]))
	} else {
		first, release, err := hosts.Ports.Acquire()
		if err != nil {
			return nil, fmt.Errorf("worker %d: %w", id, err)
		}
		g.release = release
		ring, control = hosts.ring(first)
	}
	ringJSON, _ := json.Marshal(ring)
	var hostfile string
	if hosts == nil || !allRemote(hosts.Hosts) { // a rank on this machine reads it
		var err error
		if g.tempDir, err = os.MkdirTemp("", "krserve-group-"); err != nil {
			g.cleanup()
			return nil, fmt.Errorf("worker %d: host file: %w", id, err)
		}
		hostfile = filepath.Join(g.tempDir, "hostfile.json")
		if err := os.WriteFile(hostfile, ringJSON, 0o600); err != nil {
			g.cleanup()
			return nil, fmt.Errorf("worker %d: host file: %w", id, err)
		}
	}
	var secret [16]byte
	if _, err := rand.Read(secret[:]); err != nil {
		g.cleanup()
		return nil, fmt.Errorf("worker %d: group token: %w", id, err)
	}
	token := "KRSERVE_GROUP_TOKEN=" + hex.EncodeToString(secret[:])
	for r := range size {
		vars := []string{"MLX_RANK=" + strconv.Itoa(r), "KRSERVE_GROUP_ADDR=" + control}
		c := cmd
		where := ""
		if hosts == nil || hosts.Hosts[r].Local() {
			var extra []string
			if hosts != nil {
				extra = append(extra, hosts.Env...)
			}
			extra = append(append(extra, vars...), "MLX_HOSTFILE="+hostfile, token)
			c.Env = withEnv(cmd.Env, extra...)
		} else {
			where = hosts.Hosts[r].SSH
			var err error
			if c, err = hosts.remoteCommand(r, hosts.Hosts[r], cmd, append(vars, "KRSERVE_RING_HOSTS="+string(ringJSON)), []string{token}); err != nil {
				g.abort(fmt.Errorf("rank %d of its group failed to start", r))
				return nil, fmt.Errorf("rank %d: %w", r, err)
			}
		}
		on := onMsg
		if r > 0 {
			on = followerFrames(r, onFatal)
		}
		rlog := log.With("rank", r)
		if where != "" {
			rlog = rlog.With("host", where)
		}
		p, err := Start(id, c, rlog, on)
		if err != nil {
			g.abort(fmt.Errorf("rank %d of its group failed to start", r))
			return nil, fmt.Errorf("rank %d: %w", r, err)
		}
		g.ranks = append(g.ranks, p)
		g.where = append(g.where, where)
	}
	g.PID = g.ranks[0].PID
	if hosts != nil && hosts.Remote() && hosts.Keepalive > 0 {
		g.quit, g.keptAlive = make(chan struct{}), make(chan struct{})
		go g.keepalive(hosts.Keepalive)
	}
	go g.join()
	return g, nil
}

func allRemote(hs []Host) bool {
	for _, h := range hs {
		if h.Local() {
			return false
		}
	}
	return true
}

// abort ends a group whose start failed part way: it kills and reaps the
// ranks started so far and gives back what the group held.
func (g *Group) abort(why error) {
	for _, q := range g.ranks {
		q.Kill(why)
		<-q.Done()
	}
	g.cleanup()
}

// cleanup removes the group's host file and gives back its ports.
func (g *Group) cleanup() {
	if g.tempDir != "" {
		os.RemoveAll(g.tempDir)
	}
	if g.release != nil {
		g.release()
	}
}

// keepalive writes an empty frame to every remote rank's ssh at each tick,
// until join closes quit: the rank's wrapper ends the rank when nothing comes
// for its idle limit, which is how a rank learns that the network to the
// supervisor is cut.
func (g *Group) keepalive(every time.Duration) {
	defer close(g.keptAlive)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-g.quit:
			return
		case <-t.C:
			for r, p := range g.ranks {
				if g.where[r] != "" {
					_ = p.Send(keepaliveFrame) // a rank that is gone: its exit says why
				}
			}
		}
	}
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
	if !killing && g.mayBeConsequence(r) {
		// A rank that exited with an ordinary error may only have seen a
		// peer vanish; a remote peer's own report (its status, its wrapper's
		// stderr) comes through ssh a moment later. Give it peerGrace before
		// the group's kill would overwrite it (blame reads it).
		select {
		case <-ended:
		case <-time.After(peerGrace):
		}
	}
	if !killing {
		why := fmt.Errorf("%w: rank %d %s", errPeerDied, r, g.ranks[r].Exit())
		for q, p := range g.ranks {
			if q != r {
				p.Kill(why)
			}
		}
	}
	wg.Wait()
	if g.quit != nil {
		close(g.quit)
		<-g.keptAlive
	}
	g.exit = g.groupExit()
	g.cleanup()
	close(g.done)
}

// peerGrace is how long a group waits, after a rank's ordinary error exit,
// for a remote rank to report its own death before killing it.
const peerGrace = 500 * time.Millisecond

// mayBeConsequence: rank r's exit (an ordinary error status) may be the
// effect of a remote peer's death whose report is still on its way.
func (g *Group) mayBeConsequence(r int) bool {
	e := g.ranks[r].Exit()
	if e == nil || e.Signal != 0 || e.Code <= 0 || e.Code > 128 {
		return false
	}
	for q, host := range g.where {
		if q != r && host != "" {
			return true
		}
	}
	return false
}

// errPeerDied marks the ranks the group killed because another one died.
var errPeerDied = errors.New("killed with its group")

// groupExit is the exit that stands for the group: the rank that ended on
// its own first (or the one blame picks instead), else the leader's (the
// supervisor's Kill or Stop).
func (g *Group) groupExit() *Exit {
	r := 0
	if g.first >= 0 {
		exits := make([]*Exit, len(g.ranks))
		for q, p := range g.ranks {
			exits[q] = p.Exit()
		}
		r = blame(g.first, exits)
	}
	e := *g.ranks[r].Exit()
	e.Rank, e.GroupSize = r, len(g.ranks)
	if r != g.first && errors.Is(e.Err, errPeerDied) {
		e.Err = nil // it had died before the group's kill reached it
	}
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

// blame picks the rank whose exit explains a group's end. The first rank to
// end is usually the cause, but not when it only exited because a peer
// vanished (mlx's ring: "connection to a peer was lost") and the killed peer's
// exit arrives a moment later: a rank over ssh reports its worker's death
// through ssh's exit status, after the leader has already seen the broken
// link. So a first exit with an ordinary error status yields to a rank that
// was killed by a signal nobody in the group sent: a remote rank whose status
// is 128+N (the wrapper's report of signal N; the group's own kill of ssh is a
// local signal, not a status) or whose wrapper reported that signal on stderr
// before the group's kill of its ssh overtook the status, or a local rank
// signalled before the group killed it. exits[first] is the first rank's
// exit; every exit is final.
func blame(first int, exits []*Exit) int {
	f := exits[first]
	if f.Signal != 0 || f.Code == 0 || f.Code > 128 {
		return first // killed, clean, or a signal's status: it is the cause
	}
	for q, e := range exits {
		if q == first || e == nil {
			continue
		}
		remoteSignal := e.Host != "" && (e.Signal == 0 && e.Code > 128 || wrapperSawSignal(e))
		localSignal := e.Host == "" && e.Signal != 0 && !errors.Is(e.Err, errPeerDied)
		if remoteSignal || localSignal {
			return q
		}
	}
	return first
}

// wrapperSawSignal: a remote rank's wrapper (krserve_worker.remote) wrote
// that its worker was killed by a signal. Once the group has killed the ssh
// session nothing more arrives from that host, so the line came first.
func wrapperSawSignal(e *Exit) bool {
	for _, l := range e.Stderr {
		if strings.Contains(l, "krserve-remote: ") && strings.Contains(l, " was killed by SIG") {
			return true
		}
	}
	return false
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
	// Host: a rank started over ssh on this host. Its PID and State are its
	// local ssh process's, and its memory (on that host) is not measured.
	Host string `json:"host,omitempty"`
}

// RankStatus reports every rank: alive until reaped, and where /proc
// exists its scheduler state and resident memory (a remote rank's ssh
// process: its state only).
func (g *Group) RankStatus() []RankStatus {
	out := make([]RankStatus, len(g.ranks))
	for r, p := range g.ranks {
		st := RankStatus{Rank: r, PID: p.PID, Alive: true}
		if g.where != nil {
			st.Host = g.where[r]
		}
		select {
		case <-p.exited:
			st.Alive, st.State = false, "exited"
		default:
			st.State, st.RSS = procState(p.PID)
			if st.Host != "" {
				st.RSS = 0
			}
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
