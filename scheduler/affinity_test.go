package scheduler

import (
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/krserve/krserve/ipc"
)

func TestBlockHashesArePrefixHashes(t *testing.T) {
	a := strings.Repeat("the system prompt, long enough to fill blocks. ", 6) // 288 bytes: 4 full blocks
	b := a + strings.Repeat("and a user turn. ", 8)
	ha, hb := blockHashes(a), blockHashes(b)
	if len(ha) != 4 || len(hb) != len(b)/blockBytes {
		t.Fatalf("%d and %d blocks", len(ha), len(hb))
	}
	if !slices.Equal(ha, hb[:4]) {
		t.Error("a shared prefix does not give shared leading hashes")
	}
	c := "X" + a[1:]
	if hc := blockHashes(c); slices.ContainsFunc(hc, func(h uint64) bool { return slices.Contains(ha, h) }) {
		t.Error("a different first block must change every chained hash")
	}
	if blockHashes(a[:blockBytes-1]) != nil {
		t.Error("a partial block is hashed")
	}
}

// The next turn of a conversation (history + the reply + a new message)
// renders to a text that extends the previous request's rendering with its
// reply: that is what lets the index predict the worker's cache hit.
func TestCanonicalNextTurnExtendsThePrevious(t *testing.T) {
	turn1 := Input{Messages: []ipc.ChatMessage{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "Hi"}}}
	turn2 := Input{Messages: append(slices.Clone(turn1.Messages),
		ipc.ChatMessage{Role: "assistant", Content: "Hello!"}, ipc.ChatMessage{Role: "user", Content: "Bye"})}
	if got, next := canonical(&turn1, "Hello!"), canonical(&turn2, ""); !strings.HasPrefix(next, got) {
		t.Errorf("%q is not a prefix of %q", got, next)
	}
	if got := canonical(&turn1, ""); !strings.HasPrefix(canonical(&turn1, "Hello!"), got) {
		t.Error("the reply does not extend the prompt")
	}
	text := Input{Text: "Once upon"}
	if !strings.HasPrefix(canonical(&Input{Text: "Once upon a time"}, ""), canonical(&text, " a")) {
		t.Error("completion text plus reply is not a prefix of the continued text")
	}
}

func TestPrefixIndexLRUAndShrink(t *testing.T) {
	ix := newPrefixIndex(4)
	ix.insert([]uint64{1, 2, 3})
	if got := ix.match([]uint64{1, 2, 9, 3}); got != 2 {
		t.Errorf("match = %d, want the 2 leading blocks", got)
	}
	ix.insert([]uint64{4, 5}) // 5 blocks > 4: the oldest goes, the tail of 1, 2, 3 (3)
	if ix.match([]uint64{1, 2}) != 2 || ix.match([]uint64{3}) != 0 || ix.match([]uint64{4, 5}) != 2 {
		t.Errorf("after eviction: %v", ix.blocks)
	}
	ix.insert([]uint64{1})    // touch 1
	ix.insert([]uint64{6, 7}) // evicts 5 then 2: the tail of 4, 5 first
	if ix.match([]uint64{1}) != 1 || ix.match([]uint64{4}) != 1 || ix.match([]uint64{5}) != 0 || ix.match([]uint64{2}) != 0 {
		t.Errorf("after a second eviction: %v", ix.blocks)
	}

	big := newPrefixIndex(100)
	var hs []uint64
	for i := range 40 {
		hs = append(hs, uint64(100+i))
	}
	big.insert(hs)
	big.shrink() // 40 blocks -> 30: the text's tail goes, its head stays
	if len(big.blocks) != 30 || big.max != 30 || big.match(hs) != 30 {
		t.Errorf("after shrink: max %d, %d blocks, match %d", big.max, len(big.blocks), big.match(hs))
	}
	big.insert([]uint64{1})
	if len(big.blocks) != 30 {
		t.Errorf("the shrunk bound is kept: %d blocks", len(big.blocks))
	}
	big.grow(100)
	if big.max != 34 {
		t.Errorf("grow: max %d, want 34", big.max)
	}
	small := newPrefixIndex(100)
	small.insert(hs[:10])
	if small.shrink(); small.max != minIndexBlocks {
		t.Errorf("shrink below the floor: max %d", small.max)
	}
}

func TestRoutePolicy(t *testing.T) {
	cfg := DefaultRoutingConfig()
	cfg.BalanceAbs = 8 // rel 1.5, threshold 0.3
	for _, tc := range []struct {
		name    string
		cands   []routeCandidate
		nblocks int
		policy  string
		want    int
		why     string
	}{
		{"longest match wins", []routeCandidate{{id: 1, load: 2, free: 6, match: 1}, {id: 2, load: 4, free: 4, match: 9}}, 10, "", 2, routeCache},
		{"a match below the threshold does not decide", []routeCandidate{{id: 1, load: 1, free: 7}, {id: 2, load: 3, free: 5, match: 2}}, 10, "", 1, routeLoad},
		{"equal matches: the least loaded", []routeCandidate{{id: 1, load: 5, free: 3, match: 4}, {id: 2, load: 2, free: 6, match: 4}}, 10, "", 2, routeCache},
		{"imbalance overrides the match", []routeCandidate{{id: 1, load: 1, free: 31}, {id: 2, load: 12, free: 20, match: 10}}, 10, "", 1, routeBalance},
		{"imbalance needs the absolute gap too", []routeCandidate{{id: 1, load: 0, free: 32}, {id: 2, load: 6, free: 26, match: 10}}, 10, "", 2, routeCache},
		{"imbalance needs the ratio too", []routeCandidate{{id: 1, load: 20, free: 12}, {id: 2, load: 29, free: 3, match: 10}}, 10, "", 2, routeCache},
		{"no prompt text: the most free, first on ties", []routeCandidate{{id: 3, load: 1, free: 7}, {id: 1, load: 1, free: 7}}, 0, "", 3, routeLoad},
		{"least-loaded ignores matches", []routeCandidate{{id: 1, load: 2, free: 6}, {id: 2, load: 3, free: 5, match: 10}}, 10, RoutingLeastLoaded, 1, routeLoad},
		{"one candidate", []routeCandidate{{id: 7, load: 3, free: 1}}, 10, "", 7, routeLoad},
		{"default gap of 2: a burst leaves the holder of a shared prefix", []routeCandidate{{id: 1, load: 3, free: 5, match: 8}, {id: 2, load: 0, free: 8}}, 10, "abs2", 2, routeBalance},
		{"one candidate holding the prompt", []routeCandidate{{id: 7, load: 3, free: 1, match: 9}}, 10, "", 7, routeCache},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			switch tc.policy {
			case "":
			case "abs2":
				c = DefaultRoutingConfig()
			default:
				c.Policy = tc.policy
			}
			i, why := route(tc.cands, tc.nblocks, c)
			if tc.cands[i].id != tc.want || why != tc.why {
				t.Errorf("route = worker %d (%s), want %d (%s)", tc.cands[i].id, why, tc.want, tc.why)
			}
		})
	}
}

// chat builds an Input request of a conversation: a long shared system
// prompt, a per-conversation first message, then the turns so far.
func (h *harness) chat(conv int, turns ...string) *Request {
	h.nextID++
	msgs := []ipc.ChatMessage{
		{Role: "system", Content: strings.Repeat("You are a helpful assistant. ", 20)},
		{Role: "user", Content: strings.Repeat("conversation "+string(rune('A'+conv))+" ", 20)},
	}
	for i, t := range turns {
		role := "assistant"
		if i%2 == 1 {
			role = "user"
		}
		msgs = append(msgs, ipc.ChatMessage{Role: role, Content: t})
	}
	return NewInputRequest(h.nextID, Input{Messages: msgs}, Params{MaxTokens: 16})
}

// finish streams reply for r from worker wid and ends it.
func (h *harness) finish(wid int, r *Request, reply string, ptoks int) {
	h.t.Helper()
	h.deliver(wid, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{1}, Text: reply})
	h.deliver(wid, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "stop", PToks: ptoks, CToks: 1})
}

// A conversation's next turn goes to the worker that served the previous
// one, though another worker is less loaded; another conversation with the
// same system prompt only is routed by load. When that worker dies, its
// index goes with it: the next turn goes by load, and sticks to its new
// worker from then on.
func TestConversationFollowsItsWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, nil)
		w1, w2 := h.addWorker(1), h.addWorker(2)
		owner := func(r *Request) int {
			for id, w := range map[int]*fakeWorker{1: w1, 2: w2} {
				if slices.Contains(w.genIDs(), r.ID) {
					return id
				}
			}
			if w3 := h.workers[3]; w3 != nil && slices.Contains(w3.genIDs(), r.ID) {
				return 3
			}
			return 0
		}
		a1 := h.chat(0)
		h.mustSubmit(a1)
		wa := owner(a1)
		if wa == 0 {
			t.Fatal("turn 1 not dispatched")
		}
		h.finish(wa, a1, "Hello from A.", 300)
		// Load the conversation's worker a little more than the other.
		// Two other conversations, one on each worker; the one on the other
		// worker ends, so the conversation's worker is the busier one.
		x, y := h.chat(1), h.chat(2)
		h.mustSubmit(x)
		h.mustSubmit(y)
		h.advance(2 * time.Millisecond)
		busy := x
		if owner(x) != wa {
			busy = y
		}
		for _, r := range []*Request{x, y} {
			if r != busy {
				h.finish(owner(r), r, "ok", 300)
			}
		}
		if owner(busy) != wa {
			t.Fatalf("setup: %d and %d on workers %d and %d", x.ID, y.ID, owner(x), owner(y))
		}
		a2 := h.chat(0, "Hello from A.", "Tell me more.")
		h.mustSubmit(a2)
		h.advance(2 * time.Millisecond)
		if got := owner(a2); got != wa {
			t.Fatalf("turn 2 went to worker %d, want %d, which holds turn 1", got, wa)
		}
		if v := counter(t, h.m.RoutingDecisions.WithLabelValues(routeCache)); v < 1 {
			t.Errorf("cache decisions = %v", v)
		}
		h.finish(wa, a2, "More from A.", 400)
		h.finish(wa, busy, "ok", 300)

		h.crash(wa)
		h.addWorker(3)
		h.advance(2 * time.Millisecond)
		a3 := h.chat(0, "Hello from A.", "Tell me more.", "More from A.", "And then?")
		h.mustSubmit(a3)
		h.advance(2 * time.Millisecond)
		first := owner(a3)
		if first == 0 || first == wa {
			t.Fatalf("turn 3 went to %d", first)
		}
		h.finish(first, a3, "Then B.", 500)
		a4 := h.chat(0, "Hello from A.", "Tell me more.", "More from A.", "And then?", "Then B.", "Fine.")
		h.mustSubmit(a4)
		h.advance(2 * time.Millisecond)
		if got := owner(a4); got != first {
			t.Fatalf("turn 4 went to %d, want %d: the affinity moved with turn 3", got, first)
		}
	})
}

// With --routing least-loaded the history does not matter.
func TestLeastLoadedIgnoresHistory(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, func(c *Config) { c.Routing.Policy = RoutingLeastLoaded })
		w1, _ := h.addWorker(1), h.addWorker(2)
		a1 := h.chat(0)
		h.mustSubmit(a1) // round robin starts at worker 1
		if !slices.Contains(w1.genIDs(), a1.ID) {
			t.Fatalf("worker 1 got %v", w1.genIDs())
		}
		h.finish(1, a1, "Hi.", 300)
		x := h.chat(1)
		h.mustSubmit(x) // worker 2 (round robin)
		y := h.chat(2)
		h.mustSubmit(y) // worker 1
		a2 := h.chat(0, "Hi.", "More.")
		h.mustSubmit(a2)
		h.advance(2 * time.Millisecond)
		if v := counter(t, h.m.RoutingDecisions.WithLabelValues(routeCache)); v != 0 {
			t.Errorf("cache decisions = %v under least-loaded", v)
		}
	})
}

// A worker that reports fewer cached tokens than its index predicted has
// evicted text the index still lists: the index shrinks, and the miss is
// counted. A worker that reports the hit leaves it alone.
func TestMispredictionShrinksTheIndex(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, nil)
		h.addWorker(1)
		a1 := h.chat(0)
		h.mustSubmit(a1)
		h.finish(1, a1, "Hello from A.", 300)
		blocks := len(h.s.slots[1].index.blocks) // turn 1's prompt and reply

		a2 := h.chat(0, "Hello from A.", strings.Repeat("Tell me more. ", 10))
		h.mustSubmit(a2)
		if a2.predicted == 0 {
			t.Fatal("turn 2 predicted no hit")
		}
		// The worker found the whole previous turn: no correction.
		h.deliver(1, &ipc.Message{T: ipc.TDone, ID: a2.ID, Reason: "stop", PToks: 400, CToks: 1, Cached: 300})
		if v := counter(t, h.m.RoutingMispredictions); v != 0 {
			t.Fatalf("mispredictions after a hit = %v", v)
		}
		grown := len(h.s.slots[1].index.blocks)
		if grown <= blocks || h.s.slots[1].index.max != h.s.cfg.Routing.IndexBlocks {
			t.Fatalf("index %d blocks (bound %d) after turn 2, %d before", grown, h.s.slots[1].index.max, blocks)
		}

		a3 := h.chat(0, "Hello from A.", strings.Repeat("Tell me more. ", 10), "", "Again?")
		h.mustSubmit(a3)
		h.deliver(1, &ipc.Message{T: ipc.TDone, ID: a3.ID, Reason: "stop", PToks: 420, CToks: 1, Cached: 0})
		if v := counter(t, h.m.RoutingMispredictions); v != 1 {
			t.Fatalf("mispredictions after a miss = %v", v)
		}
		if ix := h.s.slots[1].index; ix.max >= h.s.cfg.Routing.IndexBlocks || ix.max > grown {
			t.Errorf("index bound %d after a miss (had %d blocks)", ix.max, grown)
		}
	})
}

// A worker whose hello advertised no prompt cache (its default budget came
// out 0, say) is never indexed: a conversation it served has no affinity to
// it, so the next turn goes by load, to the other worker; a worker with a
// cache beside it is indexed as before.
func TestWorkerWithoutCacheIsNotIndexed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 8, nil)
		w1 := h.addWorkerInfo(1, WorkerInfo{PromptCache: false})
		if st := h.s.State(); st.Routing != RoutingCacheAware || st.RoutingByCache {
			t.Fatalf("no worker with a cache: routing %q by cache %v", st.Routing, st.RoutingByCache)
		}
		w2 := h.addWorker(2)
		if st := h.s.State(); !st.RoutingByCache {
			t.Fatalf("a worker with a cache: routing %q by cache %v", st.Routing, st.RoutingByCache)
		}
		on := func(w *fakeWorker, r *Request) bool { return slices.Contains(w.genIDs(), r.ID) }
		a1 := h.chat(0)
		h.mustSubmit(a1) // round robin starts at worker 1
		if !on(w1, a1) {
			t.Fatalf("turn 1: worker 1 got %v, worker 2 %v", w1.genIDs(), w2.genIDs())
		}
		h.finish(1, a1, "Hello from A.", 300)
		if n := len(h.s.slots[1].index.blocks); n != 0 {
			t.Fatalf("worker 1 has no cache but %d blocks indexed", n)
		}
		// Make worker 1 the busier: one token-id request on each, the one
		// on worker 2 ends.
		x, y := h.req(10, 4), h.req(10, 4)
		h.mustSubmit(x)
		h.mustSubmit(y)
		h.advance(2 * time.Millisecond)
		busy, idle := x, y
		if on(w2, x) {
			busy, idle = y, x
		}
		if !on(w1, busy) || !on(w2, idle) {
			t.Fatalf("setup: worker 1 got %v, worker 2 %v", w1.genIDs(), w2.genIDs())
		}
		h.finish(2, idle, "ok", 10)
		a2 := h.chat(0, "Hello from A.", "Tell me more.")
		h.mustSubmit(a2)
		h.advance(2 * time.Millisecond)
		if !on(w2, a2) {
			t.Fatalf("turn 2 went to worker 1, which has no cache, though worker 2 was less loaded")
		}
		if a2.predicted != 0 {
			t.Errorf("turn 2 predicted %d cached blocks", a2.predicted)
		}
		if v := counter(t, h.m.RoutingDecisions.WithLabelValues(routeCache)); v != 0 {
			t.Errorf("cache decisions = %v", v)
		}
		h.finish(2, a2, "More from A.", 400)
		if len(h.s.slots[2].index.blocks) == 0 {
			t.Errorf("worker 2 has a cache but nothing indexed")
		}
		if n := len(h.s.slots[1].index.blocks); n != 0 {
			t.Errorf("worker 1 has %d blocks indexed", n)
		}
	})
}
