package supervisor

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
)

// startFakeGroup starts a group of size fake workers: rank 0 in mode spec,
// the followers waiting to be killed (see runFake).
func startFakeGroup(t *testing.T, size int, spec string) (*Group, chan *ipc.Message, chan string) {
	t.Helper()
	return startFakeGroupOn(t, size, nil, spec)
}

// startFakeGroupOn is startFakeGroup with the ranks on hosts (nil: here).
func startFakeGroupOn(t *testing.T, size int, hosts *Hosts, spec string) (*Group, chan *ipc.Message, chan string) {
	t.Helper()
	frames := make(chan *ipc.Message, 64)
	fatals := make(chan string, 8)
	g, err := StartGroup(0, size, hosts, fakeCommand(t, spec), testLog(), func(m *ipc.Message) error {
		c := *m
		frames <- &c
		return nil
	}, func(rank int, msg string) { fatals <- fmt.Sprintf("%d: %s", rank, msg) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Kill(errors.New("test over")); <-g.Done() })
	return g, frames, fatals
}

func waitGroup(t *testing.T, g *Group) *Exit {
	t.Helper()
	select {
	case <-g.Done():
		return g.Exit()
	case <-time.After(waitLimit):
		t.Fatalf("group of leader %d: not reaped within %s", g.PID, waitLimit)
		return nil
	}
}

func waitHello(t *testing.T, frames chan *ipc.Message) {
	t.Helper()
	select {
	case m := <-frames:
		if m.T != ipc.THello {
			t.Fatalf("first frame %q, want hello", m.T)
		}
	case <-time.After(waitLimit):
		t.Fatal("no hello from rank 0")
	}
}

func TestGroupOfOneIsTheProcess(t *testing.T) {
	g, frames, _ := startFakeGroup(t, 1, "ok")
	waitHello(t, frames)
	if g.Ranks() != 1 || g.PID != g.Leader().PID || g.Done() != g.Leader().Done() {
		t.Fatalf("a group of one is not its one process: %d ranks", g.Ranks())
	}
	if env := g.Leader().cmd.Env; strings.Contains(strings.Join(env, " "), "MLX_RANK") {
		t.Errorf("a group of one got group environment: %v", env)
	}
	e := g.Stop(waitLimit)
	if !e.Intended || e.GroupSize != 0 || strings.Contains(e.String(), "rank ") {
		t.Errorf("exit %q: intended %v, group size %d, err %v", e, e.Intended, e.GroupSize, e.Err)
	}
}

func TestGroupEnvironmentAndHostfile(t *testing.T) {
	g, frames, _ := startFakeGroup(t, 3, "ok")
	waitHello(t, frames)
	b, err := os.ReadFile(g.tempDir + "/hostfile.json")
	if err != nil {
		t.Fatal(err)
	}
	var hosts [][]string
	if err := json.Unmarshal(b, &hosts); err != nil || len(hosts) != 3 {
		t.Fatalf("host file %s: %v", b, err)
	}
	seen := map[string]bool{}
	for _, h := range hosts {
		if len(h) != 1 || !strings.HasPrefix(h[0], "127.0.0.1:") || seen[h[0]] {
			t.Fatalf("host file %s: want one distinct loopback address per rank", b)
		}
		seen[h[0]] = true
	}
	for r, p := range g.ranks {
		env := strings.Join(p.cmd.Env, "\n")
		for _, want := range []string{fmt.Sprintf("MLX_RANK=%d", r), "MLX_HOSTFILE=" + g.tempDir + "/hostfile.json", "KRSERVE_GROUP_ADDR=127.0.0.1:", "KRSERVE_GROUP_TOKEN="} {
			if !strings.Contains(env, want) {
				t.Errorf("rank %d env lacks %q", r, want)
			}
		}
	}
	st := g.RankStatus()
	if len(st) != 3 || !st[2].Alive || st[2].PID != g.ranks[2].PID || st[2].State == "" {
		t.Fatalf("rank status %+v", st)
	}
	g.Stop(200 * time.Millisecond)
	if _, err := os.Stat(g.tempDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("host file directory left behind: %v", err)
	}
}

// A rank that dies takes the whole group down: every other rank is killed
// and reaped, and the group's exit is that rank's.
func TestGroupRankDeathKillsEveryRank(t *testing.T) {
	for _, victim := range []int{0, 2} {
		t.Run(fmt.Sprintf("rank%d", victim), func(t *testing.T) {
			g, frames, _ := startFakeGroup(t, 3, "ok")
			waitHello(t, frames)
			pids := []int{g.ranks[0].PID, g.ranks[1].PID, g.ranks[2].PID}
			if err := syscall.Kill(pids[victim], syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			e := waitGroup(t, g)
			if e.Rank != victim || e.GroupSize != 3 || e.Signal != syscall.SIGKILL || e.Intended {
				t.Fatalf("group exit %+v, want rank %d's SIGKILL", e, victim)
			}
			if want := fmt.Sprintf("rank %d of 3 killed by SIGKILL (out of memory killer or an operator)", victim); !strings.HasPrefix(e.String(), want) {
				t.Errorf("exit %q, want it to start with %q", e, want)
			}
			for r, pid := range pids {
				assertGone(t, pid)
				if r != victim && !errors.Is(g.ranks[r].Exit().Err, errPeerDied) {
					t.Errorf("rank %d exit %v: want killed with its group", r, g.ranks[r].Exit())
				}
			}
			for _, st := range g.RankStatus() {
				if st.Alive {
					t.Errorf("rank %d still alive in the status", st.Rank)
				}
			}
		})
	}
}

// The supervisor's Kill (the watchdog) ends every rank; the leader's exit,
// with the reason, speaks for the group.
func TestGroupKillCarriesTheReason(t *testing.T) {
	g, frames, _ := startFakeGroup(t, 2, "ok")
	waitHello(t, frames)
	g.Kill(fmt.Errorf("%w: no token for 3s", errWedged))
	e := waitGroup(t, g)
	if !errors.Is(e.Err, errWedged) || e.Rank != 0 {
		t.Fatalf("exit %+v, want the leader's wedge", e)
	}
	assertGone(t, g.ranks[0].PID)
	assertGone(t, g.ranks[1].PID)
}

func TestGroupStopIsIntended(t *testing.T) {
	g, frames, _ := startFakeGroup(t, 2, "ok")
	waitHello(t, frames)
	e := g.Stop(waitLimit)
	if !e.Intended || e.Err != nil || e.Rank != 0 {
		t.Fatalf("exit %+v (%s), want the leader's intended exit", e, e)
	}
	assertGone(t, g.ranks[1].PID)
}

func TestGroupFollowerFrames(t *testing.T) {
	t.Run("speak", func(t *testing.T) {
		g, _, _ := startFakeGroup(t, 2, "ok,follower=speak") // the leader may die before its hello
		e := waitGroup(t, g)
		if e.Rank != 1 || !errors.Is(e.Err, ipc.ErrProtocol) || !strings.Contains(e.Err.Error(), "only rank 0 speaks") {
			t.Fatalf("exit %+v (%s), want rank 1's protocol error", e, e)
		}
	})
	t.Run("fatal", func(t *testing.T) {
		g, _, fatals := startFakeGroup(t, 2, "slow-start,follower=fatal")
		e := waitGroup(t, g)
		if e.Rank != 1 || e.Code != 1 {
			t.Fatalf("exit %+v, want rank 1's exit 1", e)
		}
		select {
		case f := <-fatals:
			if f != "1: rank cannot load its shard" {
				t.Errorf("fatal %q", f)
			}
		default:
			t.Error("the follower's fatal error was not reported")
		}
	})
}

// A pool of groups: the slot's status lists each rank, and a follower's
// death restarts the group.
func TestPoolRestartsGroupAfterFollowerDeath(t *testing.T) {
	pl := newPlan(t, "ok")
	cfg := testConfig(pl)
	cfg.GroupSize = 2
	r := newFakeRouter()
	p := NewPool(cfg, r, newMetrics(), testLog())
	stop := runPool(t, p)
	defer stop()
	r.waitCount(t, "add", 1)
	st := slot0(p)
	if len(st.Ranks) != 2 || st.Ranks[0].PID != st.PID || !st.Ranks[1].Alive {
		t.Fatalf("ranks %+v", st.Ranks)
	}
	follower := st.Ranks[1].PID
	if err := syscall.Kill(follower, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.waitCount(t, "add", 2)
	assertGone(t, follower)
	assertGone(t, st.PID)
	st = slot0(p)
	if st.Restarts != 1 || st.LastExit == nil || st.LastExit.Reason != "crash" || st.LastExit.Signal != "SIGKILL" {
		t.Fatalf("after a follower's death: %+v", st)
	}
}

// A follower stopped while the group is idle: nothing waits on it yet, but
// the pool ends the group once it has been stopped for the heartbeat timeout.
func TestPoolKillsGroupWithStoppedFollower(t *testing.T) {
	pl := newPlan(t, "ok")
	cfg := testConfig(pl)
	cfg.GroupSize = 2
	cfg.HeartbeatTimeout = 300 * time.Millisecond
	r := newFakeRouter()
	p := NewPool(cfg, r, newMetrics(), testLog())
	stop := runPool(t, p)
	defer stop()
	r.waitCount(t, "add", 1)
	st := slot0(p)
	follower := st.Ranks[1].PID
	if err := syscall.Kill(follower, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(follower, syscall.SIGCONT) //nolint:errcheck // gone once the test passes
	eventually(t, "a rank shown stopped", func() bool {
		rs := slot0(p).Ranks
		return len(rs) == 2 && rs[1].PID == follower && rs[1].State == "stopped" || slot0(p).Restarts > 0
	})
	r.waitCount(t, "add", 2)
	assertGone(t, follower)
	st = slot0(p)
	if st.LastExit == nil || st.LastExit.Reason != "wedged" || !strings.Contains(st.LastExit.Cause, "rank 1 stopped (SIGSTOP)") {
		t.Fatalf("last exit %+v, want the group wedged by its stopped rank 1", st.LastExit)
	}
}

// A follower that fails to load (its fatal error frame, then exit) fails the
// group's start, with that rank's reason.
func TestPoolGroupStartFailureNamesTheRank(t *testing.T) {
	pl := newPlan(t, "slow-start,follower=fatal")
	cfg := testConfig(pl)
	cfg.GroupSize = 2
	failures := make(chan error, 4)
	cfg.OnStartFailure = func(slot int, err error) {
		select {
		case failures <- err:
		default:
		}
	}
	p := NewPool(cfg, newFakeRouter(), newMetrics(), testLog())
	stop := runPool(t, p)
	defer stop()
	select {
	case err := <-failures:
		want := "worker exited before hello: rank 1: rank cannot load its shard (rank 1 of 2 exited with status 1"
		if !strings.HasPrefix(err.Error(), want) {
			t.Fatalf("start failure %q, want it to start with %q", err, want)
		}
	case <-time.After(waitLimit):
		t.Fatal("no start failure")
	}
}

// TestBlame: the rank that stands for a group's end (a table: exits as the
// group's join sees them once every rank is reaped).
func TestBlame(t *testing.T) {
	peerLost := func() *Exit {
		return &Exit{Code: 1, Signal: 0, Stderr: []string{"RuntimeError: [ring] connection to a peer was lost"}}
	}
	groupKilled := func(host string) *Exit {
		return &Exit{Code: -1, Signal: syscall.SIGKILL, Host: host, Intended: true, Err: fmt.Errorf("%w: rank 0 exited", errPeerDied)}
	}
	for _, tc := range []struct {
		name  string
		first int
		exits []*Exit
		want  int
	}{
		{"remote follower killed, leader saw the lost link first", 0,
			[]*Exit{peerLost(), {Code: 137, Host: "hostB", Err: fmt.Errorf("%w: rank 0 exited", errPeerDied)}}, 1},
		{"local follower killed from outside, leader first", 0,
			[]*Exit{peerLost(), {Code: -1, Signal: syscall.SIGKILL}}, 1},
		{"leader crashed on its own: followers the group killed are not blamed", 0,
			[]*Exit{{Code: 1, Stderr: []string{"ValueError: boom"}}, groupKilled("hostB"), groupKilled("")}, 0},
		{"the first was signalled: it is the cause", 1,
			[]*Exit{{Code: 137, Host: "hostA"}, {Code: -1, Signal: syscall.SIGSEGV}}, 1},
		{"a remote first with a signal's status", 1,
			[]*Exit{{Code: 1}, {Code: 137, Host: "hostB"}}, 1},
		{"a clean first exit stays", 1,
			[]*Exit{{Code: -1, Signal: syscall.SIGKILL}, {Code: 0}}, 1},
		{"remote follower killed; the group's kill of its ssh came before the status", 0,
			[]*Exit{peerLost(), {Code: -1, Signal: syscall.SIGKILL, Host: "hostB", Err: fmt.Errorf("%w: rank 0 exited", errPeerDied),
				Stderr: []string{"krserve-remote: rank 1 on vm: worker pid 31907 was killed by SIGKILL"}}}, 1},
		{"remote rank the group killed (ssh signalled here) is not blamed", 0,
			[]*Exit{peerLost(), groupKilled("hostB")}, 0},
	} {
		if got := blame(tc.first, tc.exits); got != tc.want {
			t.Errorf("%s: blame = rank %d, want %d", tc.name, got, tc.want)
		}
	}
}
