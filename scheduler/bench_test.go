package scheduler

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
)

// instantBackend accepts frames at once and tells the benchmark loop.
type instantBackend struct{ sent chan struct{} }

func (b *instantBackend) Send([]byte) error {
	select {
	case b.sent <- struct{}{}:
	default:
	}
	return nil
}

// cpuTime is the CPU (user+system) this process has used, all threads.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkSubmitDeliver is the supervisor's cost of one request end to end:
// Submit, dispatch by Run (fast path, gen frame encoded), n tok frames and a
// done delivered, every event read by the client side. One op is one request.
// "decode" variants also decode each worker frame from its msgpack bytes, as
// the pool's reader does before Deliver. The prompt's length matters: Run
// encodes it into the gen frame (under the scheduler's mutex). cpu-ns/req is the process CPU time
// (every goroutine, GC included) per request.
func BenchmarkSubmitDeliver(b *testing.B) {
	for _, c := range []struct{ prompt, toks int }{{16, 16}, {200, 16}, {200, 256}, {2000, 16}} {
		for _, decode := range []bool{false, true} {
			name := fmt.Sprintf("prompt=%d/tok=%d", c.prompt, c.toks)
			if decode {
				name += "/decode"
			}
			b.Run(name, func(b *testing.B) { benchSubmitDeliver(b, c.prompt, c.toks, decode) })
		}
	}
}

func benchSubmitDeliver(b *testing.B, promptLen, n int, decode bool) {
	cfg := DefaultConfig()
	m := metrics.New(metrics.ModelInfo{Model: "bench"}, metrics.BuildInfo{})
	s := New(cfg, m, metrics.NewStats(time.Now))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Run(ctx) }()
	be := &instantBackend{sent: make(chan struct{}, 1)}
	s.AddWorker(1, be, WorkerInfo{PromptCache: true})

	prompt := make([]int32, promptLen)
	for i := range prompt {
		prompt[i] = int32(i * 31)
	}
	params := Params{MaxTokens: n, Temperature: 0.7, TopP: 0.95, Stop: []string{"</s>"}}
	tokBody, err := ipc.Encode(&ipc.Message{T: ipc.TTok, ID: 1 << 40, IDs: []int32{12345}, Text: " word"})
	if err != nil {
		b.Fatal(err)
	}
	doneBody, err := ipc.Encode(&ipc.Message{T: ipc.TDone, ID: 1 << 40, Reason: "length", PToks: promptLen, CToks: n})
	if err != nil {
		b.Fatal(err)
	}
	var tok, done ipc.Message
	if !decode {
		_ = ipc.Decode(tokBody, &tok)
		_ = ipc.Decode(doneBody, &done)
	}
	deliver := func(id uint64, body []byte, m *ipc.Message) {
		if decode {
			if err := ipc.Decode(body, m); err != nil {
				b.Fatal(err)
			}
		}
		m.ID = id
		if err := s.Deliver(1, m); err != nil {
			b.Fatal(err)
		}
	}

	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	for i := range b.N {
		id := uint64(i + 1)
		r := NewRequest(id, prompt, params)
		if err := s.Submit(r); err != nil {
			b.Fatal(err)
		}
		<-be.sent
		for range n {
			deliver(id, tokBody, &tok)
			for {
				if _, ok := r.Poll(); !ok {
					break
				}
			}
		}
		deliver(id, doneBody, &done)
		e, ok := r.Poll()
		if !ok || !e.Done || e.Err != nil || e.CompletionTokens != n {
			b.Fatalf("final event %+v, %v", e, ok)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/req")
}
