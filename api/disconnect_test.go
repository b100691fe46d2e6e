package api

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"runtime"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// TestClientsDisconnectMidStream: 200 streaming clients read a few chunks and
// hang up. Afterwards no request is queued or running, every request was
// cancelled in its worker exactly once, the workers hold nothing, and the
// goroutine count is back to its baseline.
func TestClientsDisconnectMidStream(t *testing.T) {
	t.Run("mid-stream", func(t *testing.T) { testDisconnects(t, func(int) bool { return false }) })
	// Every third client hangs up as soon as it has the response headers:
	// some of those requests are still queued (32 slots for 200).
	t.Run("some at once", func(t *testing.T) { testDisconnects(t, func(i int) bool { return i%3 == 0 }) })
}

func testDisconnects(t *testing.T, early func(i int) bool) {
	const clients = 200
	const workers = 4
	h := newHarness(t, func(c *harnessConfig) {
		c.hello = &supervisor.Hello{Model: "/m/tiny", Context: 1 << 20, Vocab: 1000, EOS: []int32{2}}
		c.api.MaxTokens = 100000
		c.api.KeepAlive = 10 * time.Millisecond // keep-alives run too
		c.sched.Tune.Initial, c.sched.Tune.Max = 8, 8
		c.workers = nil
		for range workers {
			// Three tokens, then silence until the cancel: no request can
			// end by itself.
			c.workers = append(c.workers, workerConfig{stallAfter: 3})
		}
	})
	// A transport of its own, so that its connections can be accounted for.
	tr := &http.Transport{MaxIdleConnsPerHost: clients}
	client := &http.Client{Transport: tr}

	runtime.GC()
	baseline := runtime.NumGoroutine()

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			path, body := chatPath, fmt.Sprintf(`{"model":"t","stream":true,"max_tokens":100000,"messages":[{"role":"user","content":"client %d"}]}`, i)
			want := 3 // the role chunk and two tokens
			if i%2 == 1 {
				path, body, want = cmplPath, fmt.Sprintf(`{"model":"t","stream":true,"max_tokens":100000,"prompt":"client %d"}`, i), 2
			}
			resp, err := client.Do(h.newRequest(ctx, "POST", path, body))
			if err != nil {
				errs <- fmt.Errorf("client %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				errs <- fmt.Errorf("client %d: status %d", i, resp.StatusCode)
				return
			}
			if early(i) {
				return // hang up (the deferred cancel) before any token
			}
			sse := newSSEReader(t, resp.Body)
			for got := 0; got < want; {
				ev, err := sse.next()
				if err != nil {
					errs <- fmt.Errorf("client %d after %d chunks: %v", i, got, err)
					return
				}
				if ev.comment == "" {
					if ev.data == "[DONE]" {
						errs <- fmt.Errorf("client %d: stream ended early", i)
						return
					}
					got++
				}
			}
			cancel() // hang up mid-stream
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}

	// Everything drains: nothing queued or running, the workers hold nothing.
	if err := h.idle(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	gens, cancels := map[uint64]int{}, map[uint64]int{}
	for _, w := range h.workers {
		_, g, c, _ := w.snapshot()
		for id, n := range g {
			gens[id] += n
		}
		for id, n := range c {
			cancels[id] += n
		}
	}
	nEarly := 0
	for i := range clients {
		if early(i) {
			nEarly++
		}
	}
	if len(gens) < clients-nEarly || len(gens) > clients {
		t.Errorf("%d requests reached a worker, want %d..%d", len(gens), clients-nEarly, clients)
	}
	t.Logf("%d of %d requests reached a worker", len(gens), clients)
	for id, n := range gens {
		if n != 1 || cancels[id] != 1 {
			t.Errorf("request %d: %d gen frames, %d cancel frames; want 1 and 1", id, n, cancels[id])
		}
	}
	for id := range cancels {
		if gens[id] == 0 {
			t.Errorf("cancel for request %d, which no worker ran", id)
		}
	}
	if got := testutil.ToFloat64(h.m.RequestFailure.WithLabelValues(scheduler.ReasonCancelled)); got != clients {
		t.Errorf("cancelled requests counted: %v, want %d", got, clients)
	}
	if got := testutil.ToFloat64(h.m.ClientDisconnects); got != clients {
		t.Errorf("client disconnects counted: %v, want %d", got, clients)
	}
	if got := testutil.ToFloat64(h.m.NumRequestsRunning) + testutil.ToFloat64(h.m.NumRequestsWaiting); got != 0 {
		t.Errorf("running+waiting gauges %v, want 0", got)
	}
	// The handlers return (and leave the concurrency count) just after
	// their request ended in the scheduler.
	if err := h.handlersDone(30 * time.Second); err != nil {
		t.Error(err)
	}

	// No goroutine left behind: handlers, connections, keep-alive tickers.
	tr.CloseIdleConnections()
	h.srv.CloseClientConnections()
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= baseline {
			break
		}
		if time.Now().After(deadline) {
			var buf bytes.Buffer
			_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Fatalf("%d goroutines, baseline %d:\n%s", n, baseline, buf.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestClientDisconnectNotStreamed: a client that hangs up while waiting for a
// non-streamed answer gets its request cancelled in the worker.
func TestClientDisconnectNotStreamed(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	gen := make(chan struct{}, 1)
	h := newHarness(t, func(c *harnessConfig) {
		c.workers = []workerConfig{{hold: hold, onGen: func(*ipc.Message) { gen <- struct{}{} }}}
	})
	for _, path := range []string{chatPath, cmplPath} {
		ctx, cancel := context.WithCancel(context.Background())
		body := chatJSON(``)
		if path == cmplPath {
			body = cmplJSON(``)
		}
		errc := make(chan error, 1)
		go func() {
			resp, err := h.client.Do(h.newRequest(ctx, "POST", path, body))
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		<-gen
		cancel()
		if err := <-errc; err == nil {
			t.Errorf("%s: request succeeded after the client hung up", path)
		}
	}
	if err := h.idle(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	_, gens, cancels, _ := h.workers[0].snapshot()
	if len(gens) != 2 || len(cancels) != 2 {
		t.Errorf("worker saw %d gens and %d cancels, want 2 and 2", len(gens), len(cancels))
	}
	for id := range gens {
		if cancels[id] != 1 {
			t.Errorf("request %d: %d cancels", id, cancels[id])
		}
	}
	if err := h.handlersDone(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(h.m.ClientDisconnects); got != 2 {
		t.Errorf("client disconnects counted: %v, want 2", got)
	}
}
