package scheduler

import (
	"fmt"
	"testing"
)

// In the normal case the client keeps up: one event is pushed, then polled.
// That must not allocate per event (it did: poll resliced events[1:], so the
// slice lost its capacity and every push allocated a new backing array, one
// allocation per generated token).
func TestStreamSteadyStateDoesNotAllocate(t *testing.T) {
	s := newStream()
	for range 4 { // warm up
		s.push(Event{Text: "x", Tokens: 1})
		s.poll()
	}
	allocs := testing.AllocsPerRun(1000, func() {
		s.push(Event{Text: "x", Tokens: 1})
		if _, ok := s.poll(); !ok {
			t.Fatal("no event")
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per pushed and polled event, want 0", allocs)
	}
}

// Order is kept across any interleaving of pushes and polls, and a consumer
// that lags behind does not make the buffer grow beyond what it holds.
func TestStreamOrderAndBoundedGrowth(t *testing.T) {
	s := newStream()
	next, want := 0, 0
	push := func(n int) {
		for range n {
			s.push(Event{Text: fmt.Sprint(next)})
			next++
		}
	}
	poll := func(n int) {
		for range n {
			e, ok := s.poll()
			if !ok {
				t.Fatalf("empty with %d events outstanding", next-want)
			}
			if e.Text != fmt.Sprint(want) {
				t.Fatalf("got event %q, want %d", e.Text, want)
			}
			want++
		}
	}
	for i := range 10000 {
		push(3) // always 2 more than polled: the lag grows to ~20000...
		poll(2)
		if i == 5000 {
			poll(next - want) // ...unless it catches up
		}
	}
	poll(next - want)
	if _, ok := s.poll(); ok {
		t.Fatal("event after the last")
	}
	// A lagging consumer: 1000 outstanding at all times.
	s, next, want = newStream(), 0, 0
	push(1000)
	for range 100000 {
		push(1)
		poll(1)
	}
	if c := cap(s.events); c > 3*1000 {
		t.Errorf("buffer capacity %d for 1000 outstanding events", c)
	}
	poll(next - want)
}
