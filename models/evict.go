package models

import (
	"sort"
	"time"
)

// Resident is a model that holds memory, as the eviction policy sees it:
// loading, ready or draining.
type Resident struct {
	Name     string
	Bytes    int64 // measured when known, else the estimate
	State    string
	Idle     bool // no request holds it
	Pinned   bool
	LoadedAt time.Time // when it became ready
	LastUsed time.Time // when its last request ended (or it loaded)
}

// Room is what the server may hold: a memory budget and a number of models
// (0: no limit on either).
type Room struct {
	Budget       int64
	MaxLoaded    int
	MinResidency time.Duration // an idle model younger than this is not chosen unless forced
}

// ChooseVictims picks the models to unload so that one needing need bytes
// fits beside the others. Models already draining are on their way out and
// count as free. Only ready, unpinned models are candidates: idle ones that
// have been resident for at least MinResidency, least recently used first;
// with force (the waiting load passed its age cap) busy ones too, idle
// before busy, so a victim that is serving finishes its requests first.
// ok is false when no choice makes room: the load waits.
func ChooseVictims(res []Resident, need int64, room Room, now time.Time, force bool) (victims []string, ok bool) {
	var used int64
	count := 0
	for _, r := range res {
		if r.State != StateDraining {
			used += r.Bytes
			count++
		}
	}
	fits := func() bool {
		return (room.Budget <= 0 || used+need <= room.Budget) && (room.MaxLoaded <= 0 || count+1 <= room.MaxLoaded)
	}
	if fits() {
		return nil, true
	}
	var cands []Resident
	for _, r := range res {
		if r.State != StateReady || r.Pinned {
			continue
		}
		if !force && (!r.Idle || now.Sub(r.LoadedAt) < room.MinResidency) {
			continue
		}
		cands = append(cands, r)
	}
	sort.Slice(cands, func(i, j int) bool {
		a, b := cands[i], cands[j]
		if a.Idle != b.Idle {
			return a.Idle
		}
		if !a.LastUsed.Equal(b.LastUsed) {
			return a.LastUsed.Before(b.LastUsed)
		}
		return a.Name < b.Name
	})
	for _, c := range cands {
		victims = append(victims, c.Name)
		used -= c.Bytes
		count--
		if fits() {
			return victims, true
		}
	}
	return nil, false
}

// FitsNow reports whether need bytes fit beside every resident model,
// draining ones included: a load starts only once its victims have stopped.
func FitsNow(res []Resident, need int64, room Room) bool {
	var used int64
	for _, r := range res {
		used += r.Bytes
	}
	return (room.Budget <= 0 || used+need <= room.Budget) && (room.MaxLoaded <= 0 || len(res)+1 <= room.MaxLoaded)
}
