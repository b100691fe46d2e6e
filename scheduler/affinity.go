package scheduler

import (
	"container/list"
	"encoding/binary"
	"hash/maphash"
	"strings"
)

// Cache-aware routing: each worker process keeps a prompt cache (the
// worker's LRUPromptCache), and a conversation's next turn is cheap only on
// the worker that holds its history. The supervisor does not tokenize, so it
// keeps, per worker process, an approximate index of the text that worker
// has seen: chained hashes of fixed-size blocks of each request's canonical
// rendering (as llm-d's approximate prefix scorer does), LRU-bounded, updated
// when a request is dispatched and with the reply on done, shrunk when the
// worker's reported cache hits show it holds less than the index believes,
// and dropped with the process. route picks among workers with free slots
// (SGLang's cache-aware policy): the least loaded if load is clearly
// imbalanced, else the longest match above a threshold, else the least
// loaded.

// Routing policies (--routing).
const (
	RoutingCacheAware  = "cache-aware"
	RoutingLeastLoaded = "least-loaded"
)

// blockBytes is the size of one hashed block of canonical text: about 16
// tokens of English.
const blockBytes = 64

// RoutingConfig holds the routing policy's settings.
type RoutingConfig struct {
	Policy string // RoutingCacheAware or RoutingLeastLoaded
	// Load is imbalanced when max - min > BalanceAbs and max > BalanceRel *
	// min (requests in flight); then the least loaded worker wins.
	BalanceAbs int
	BalanceRel float64
	// CacheThreshold is the fraction of a prompt's blocks a worker must hold
	// for the match to decide.
	CacheThreshold float64
	// IndexBlocks bounds each worker's index (blocks of text).
	IndexBlocks int
}

// DefaultRoutingConfig returns the documented defaults.
func DefaultRoutingConfig() RoutingConfig {
	// BalanceAbs 2, not SGLang's 64 (its router fronts engines with hundreds
	// of sequences each): a shared system prompt matches on the one worker
	// that has seen it, and with a larger gap a burst of new conversations
	// all went there while the other worker idled (docs/benchmarks.md,
	// "Cache-aware routing with two workers").
	return RoutingConfig{Policy: RoutingCacheAware, BalanceAbs: 2, BalanceRel: 1.5, CacheThreshold: 0.3, IndexBlocks: 1 << 16}
}

var blockSeed = maphash.MakeSeed()

// blockHashes returns the chained hash of every full block of text: hash i
// covers text[:64*(i+1)], so equal hashes mean equal prefixes.
func blockHashes(text string) []uint64 {
	n := len(text) / blockBytes
	if n == 0 {
		return nil
	}
	hs := make([]uint64, n)
	var h maphash.Hash
	h.SetSeed(blockSeed)
	var prev [8]byte
	for i := range n {
		h.Reset()
		h.Write(prev[:])
		h.WriteString(text[i*blockBytes : (i+1)*blockBytes])
		hs[i] = h.Sum64()
		binary.LittleEndian.PutUint64(prev[:], hs[i])
	}
	return hs
}

// canonical renders a prompt the way the worker's cache sees it, up to
// tokenization: each chat message's role and content in order (so the next
// turn, which appends the reply and a new message, extends this text), or
// the completion text. reply, when set, is appended as the assistant's
// answer (or the completion's continuation).
func canonical(in *Input, reply string) string {
	var b strings.Builder
	if len(in.Messages) == 0 {
		b.WriteString("\x02text\x1f")
		b.WriteString(in.Text)
		b.WriteString(reply)
		return b.String()
	}
	for _, m := range in.Messages {
		writeMessage(&b, m.Role, m.Content)
	}
	if reply != "" {
		writeMessage(&b, "assistant", reply)
	}
	return b.String()
}

func writeMessage(b *strings.Builder, role, content string) {
	b.WriteString("\x02")
	b.WriteString(role)
	b.WriteString("\x1f")
	b.WriteString(content)
	b.WriteString("\x1e")
}

// prefixIndex is one worker process's approximate record of the text its
// prompt cache holds, as an LRU set of block hashes.
type prefixIndex struct {
	max    int
	blocks map[uint64]*list.Element
	lru    list.List // front: most recently used; values are uint64 hashes
}

func newPrefixIndex(max int) *prefixIndex {
	return &prefixIndex{max: max, blocks: map[uint64]*list.Element{}}
}

// match counts the leading blocks of hs the index holds.
func (ix *prefixIndex) match(hs []uint64) int {
	for i, h := range hs {
		if _, ok := ix.blocks[h]; !ok {
			return i
		}
	}
	return len(hs)
}

// insert adds hs (or marks them used), evicting the least recently used
// blocks beyond max. A text's blocks are touched last to first, so its head
// is the most recently used: the tail of a long text goes before its head,
// never the other way round (a prefix is worth nothing without its start).
func (ix *prefixIndex) insert(hs []uint64) {
	for i := len(hs) - 1; i >= 0; i-- {
		h := hs[i]
		if e, ok := ix.blocks[h]; ok {
			ix.lru.MoveToFront(e)
			continue
		}
		ix.blocks[h] = ix.lru.PushFront(h)
	}
	ix.evict()
}

func (ix *prefixIndex) evict() {
	for len(ix.blocks) > ix.max {
		e := ix.lru.Back()
		delete(ix.blocks, e.Value.(uint64))
		ix.lru.Remove(e)
	}
}

// minIndexBlocks is the least an index shrinks to (1 KiB of text).
const minIndexBlocks = 16

// shrink is the correction for a miss: the worker held less than the index
// predicted, so it evicted text the index still lists. The index is too
// large for the worker's real cache: cut it by a quarter (oldest first), and
// keep it that size until hits show it may grow again.
func (ix *prefixIndex) shrink() {
	ix.max = max(minIndexBlocks, len(ix.blocks)*3/4)
	ix.evict()
}

// grow is the other half: a prediction the worker confirmed lets a shrunk
// index grow back by an eighth, up to its configured bound.
func (ix *prefixIndex) grow(bound int) {
	ix.max = min(bound, ix.max+ix.max/8+1)
}

// routeCandidate is one worker with a free slot, as route sees it.
type routeCandidate struct {
	id    int
	load  int // requests in flight (and assigned in this round)
	free  int // free slots
	match int // leading blocks of the prompt its index holds
}

// Route reasons (the metric label of krserve_routing_decisions_total).
const (
	routeCache   = "cache"
	routeBalance = "balance"
	routeLoad    = "least_loaded"
)

// route picks a candidate for a prompt of nblocks blocks; cands is in
// round-robin order (ties go to the first). It returns the index in cands
// and why.
func route(cands []routeCandidate, nblocks int, cfg RoutingConfig) (int, string) {
	mostFree := func() int {
		best := 0
		for i, c := range cands {
			if c.free > cands[best].free {
				best = i
			}
		}
		return best
	}
	if cfg.Policy != RoutingCacheAware {
		return mostFree(), routeLoad
	}
	lo, hi := cands[0].load, cands[0].load
	for _, c := range cands[1:] {
		lo, hi = min(lo, c.load), max(hi, c.load)
	}
	if hi-lo > cfg.BalanceAbs && float64(hi) > cfg.BalanceRel*float64(lo) {
		return mostFree(), routeBalance
	}
	best := 0
	for i, c := range cands {
		if c.match > cands[best].match || (c.match == cands[best].match && c.load < cands[best].load) {
			best = i
		}
	}
	if m := cands[best].match; m > 0 && float64(m) >= cfg.CacheThreshold*float64(nblocks) {
		return best, routeCache
	}
	return mostFree(), routeLoad
}
