package main

import (
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"
)

// fakeDrainer records the calls of the stop sequence in order.
type fakeDrainer struct {
	calls *[]string
	idle  chan struct{}
}

func (f *fakeDrainer) Drain() <-chan struct{} { *f.calls = append(*f.calls, "drain"); return f.idle }
func (f *fakeDrainer) Abort(string)           { *f.calls = append(*f.calls, "abort") }

// fakeAfter is an injected clock: each call registers a timer that fires
// only when the test says so.
type fakeAfter struct {
	calls  *[]string
	timers map[time.Duration]chan time.Time
}

func (f *fakeAfter) after(d time.Duration) <-chan time.Time {
	*f.calls = append(*f.calls, "wait "+d.String())
	c := make(chan time.Time, 1)
	f.timers[d] = c
	return c
}

func TestDrainAfterSignal(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	boom := errors.New("pool failed")
	for _, tc := range []struct {
		name    string
		plan    stopPlan
		fire    []time.Duration // timers that fire, in order, as soon as registered
		idle    bool            // the scheduler drains at once
		failure error           // sent on errs during the delay
		want    []string
	}{
		{name: "no delay, drains in time", plan: stopPlan{Timeout: time.Minute}, idle: true,
			want: []string{"not ready", "drain", "wait 1m0s"}},
		{name: "delay first, then drain", plan: stopPlan{Delay: 5 * time.Second, Timeout: time.Minute},
			fire: []time.Duration{5 * time.Second}, idle: true,
			want: []string{"not ready", "wait 5s", "drain", "wait 1m0s"}},
		{name: "drain timeout aborts", plan: stopPlan{Delay: 5 * time.Second, Timeout: time.Minute},
			fire: []time.Duration{5 * time.Second, time.Minute},
			want: []string{"not ready", "wait 5s", "drain", "wait 1m0s", "abort"}},
		{name: "a failure ends the delay", plan: stopPlan{Delay: time.Hour, Timeout: time.Minute}, idle: true, failure: boom,
			want: []string{"not ready", "wait 1h0m0s", "drain", "wait 1m0s"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls []string
			d := &fakeDrainer{calls: &calls, idle: make(chan struct{})}
			if tc.idle {
				close(d.idle)
			}
			clock := &fakeAfter{calls: &calls, timers: map[time.Duration]chan time.Time{}}
			after := func(dur time.Duration) <-chan time.Time {
				c := clock.after(dur)
				for _, f := range tc.fire {
					if f == dur {
						clock.timers[dur] <- time.Time{}
					}
				}
				return c
			}
			errs := make(chan error, 1)
			if tc.failure != nil {
				errs <- tc.failure
			}
			notReady := func() {
				// Nothing may be refused before /ready says so.
				if len(calls) != 0 {
					t.Errorf("not ready after %v", calls)
				}
				calls = append(calls, "not ready")
			}
			got := drainAfterSignal(tc.plan, notReady, d, errs, after, quiet)
			if !errors.Is(got, tc.failure) || (tc.failure == nil && got != nil) {
				t.Errorf("returned %v, want %v", got, tc.failure)
			}
			if len(calls) != len(tc.want) {
				t.Fatalf("calls %q, want %q", calls, tc.want)
			}
			for i := range calls {
				if calls[i] != tc.want[i] {
					t.Fatalf("calls %q, want %q", calls, tc.want)
				}
			}
		})
	}
}
