package models

import (
	"slices"
	"testing"
	"time"
)

func TestChooseVictims(t *testing.T) {
	t0 := time.Unix(1000, 0)
	now := t0.Add(time.Hour)
	ready := func(name string, bytes int64, idle bool, lastUsed time.Duration) Resident {
		return Resident{Name: name, Bytes: bytes, State: StateReady, Idle: idle, LoadedAt: t0, LastUsed: t0.Add(lastUsed)}
	}
	pinned := ready("p", 50, true, 0)
	pinned.Pinned = true
	young := ready("young", 50, true, 0)
	young.LoadedAt = now.Add(-time.Second)
	loading := Resident{Name: "l", Bytes: 50, State: StateLoading}
	draining := Resident{Name: "d", Bytes: 50, State: StateDraining}
	room := Room{Budget: 100, MinResidency: 10 * time.Second}
	cases := []struct {
		name    string
		res     []Resident
		need    int64
		room    Room
		force   bool
		victims []string
		ok      bool
	}{
		{"empty server", nil, 100, room, false, nil, true},
		{"fits beside", []Resident{ready("a", 40, true, 0)}, 60, room, false, nil, true},
		{"LRU idle first", []Resident{ready("a", 50, true, 2), ready("b", 50, true, 1)}, 50, room, false, []string{"b"}, true},
		{"as many as needed, LRU order", []Resident{ready("a", 30, true, 3), ready("b", 30, true, 1), ready("c", 30, true, 2)}, 70, room, false, []string{"b", "c"}, true},
		{"busy is not a victim", []Resident{ready("a", 60, false, 0)}, 50, room, false, nil, false},
		{"busy skipped, idle taken", []Resident{ready("a", 50, false, 0), ready("b", 50, true, 5)}, 50, room, false, []string{"b"}, true},
		{"pinned never", []Resident{pinned}, 60, room, false, nil, false},
		{"pinned never, even forced", []Resident{pinned}, 60, room, true, nil, false},
		{"younger than min residency", []Resident{young}, 60, room, false, nil, false},
		{"forced: young one goes", []Resident{young}, 60, room, true, []string{"young"}, true},
		{"forced: idle before busy", []Resident{ready("busy", 50, false, 0), ready("idle", 50, true, 9)}, 50, room, true, []string{"idle"}, true},
		{"forced: busy when nothing else", []Resident{ready("busy", 60, false, 0)}, 50, room, true, []string{"busy"}, true},
		{"loading is not a victim", []Resident{loading}, 60, room, true, nil, false},
		{"draining counts as free", []Resident{draining}, 60, room, false, nil, true},
		{"not enough even with all", []Resident{ready("a", 10, true, 0), pinned}, 60, room, false, nil, false},
		{"count limit", []Resident{ready("a", 1, true, 2), ready("b", 1, true, 1)}, 1, Room{MaxLoaded: 2}, false, []string{"b"}, true},
		{"count limit 1", []Resident{ready("a", 1, true, 0)}, 1, Room{MaxLoaded: 1}, false, []string{"a"}, true},
		{"count and memory", []Resident{ready("a", 10, true, 1), ready("b", 80, true, 2)}, 50, Room{Budget: 100, MaxLoaded: 3}, false, []string{"a", "b"}, true},
		{"no limits", []Resident{ready("a", 1<<40, false, 0)}, 1 << 40, Room{}, false, nil, true},
		{"ties by name", []Resident{ready("b", 50, true, 0), ready("a", 50, true, 0)}, 50, room, false, []string{"a"}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v, ok := ChooseVictims(c.res, c.need, c.room, now, c.force)
			if ok != c.ok || !slices.Equal(v, c.victims) {
				t.Fatalf("ChooseVictims = %v, %v; want %v, %v", v, ok, c.victims, c.ok)
			}
		})
	}
}

func TestFitsNow(t *testing.T) {
	res := []Resident{{Name: "a", Bytes: 50, State: StateReady}, {Name: "d", Bytes: 40, State: StateDraining}}
	if FitsNow(res, 20, Room{Budget: 100}) {
		t.Fatal("a draining model still holds its memory")
	}
	if !FitsNow(res, 10, Room{Budget: 100}) {
		t.Fatal("100 of 100 fits")
	}
	if FitsNow(res, 1, Room{MaxLoaded: 2}) {
		t.Fatal("a draining model still counts as loaded")
	}
}
