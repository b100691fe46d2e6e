package scheduler

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/krserve/krserve/ipc"
)

// Failure reasons carried by Error.Reason; they match the metric label values.
const (
	ReasonOverloaded  = "overloaded"
	ReasonInvalid     = "invalid"
	ReasonWorkerCrash = "worker_crash"
	ReasonTimeout     = "timeout"
	ReasonCancelled   = "cancelled"
	ReasonInternal    = "internal"
	ReasonDraining    = "draining"
)

// Error is a request failure the front door turns into an HTTP status.
type Error struct {
	Reason     string
	Msg        string
	RetryAfter time.Duration // set for overloaded and draining refusals
}

func (e *Error) Error() string { return e.Reason + ": " + e.Msg }

// ErrClosed is returned by Submit after Close.
var ErrClosed = errors.New("scheduler closed")

// Params are the sampling parameters of a request, as sent to the worker.
type Params struct {
	MaxTokens         int
	Temperature       float64
	TopP              float64
	TopK              int
	MinP              float64
	Seed              *int64
	RepetitionPenalty float64
	PresencePenalty   float64
	FrequencyPenalty  float64
	LogitBias         map[int32]float64
	Stop              []string
}

// Event is one step of a request's output, in order.
type Event struct {
	Text   string // output text to append (may be empty)
	Tokens int    // tokens this event accounts for

	Done             bool
	FinishReason     string // "stop" or "length", with Done
	PromptTokens     int    // with Done
	CompletionTokens int    // with Done: all tokens generated, across resumes
	Err              error  // with Done: the request failed (*Error)
}

// Request is one generation request. Create it with NewRequest, hand it to
// Scheduler.Submit, then read its events with Next until Done.
type Request struct {
	ID       uint64
	Prompt   []int32
	Params   Params
	Deadline time.Time // zero: none
	Enqueued time.Time

	// Owned by the scheduler (under its mutex).
	generated  []int32
	sentBytes  int
	crashes    int
	slot       int // -1 while queued
	cancelled  bool
	finished   bool
	dispatched time.Time
	firstToken time.Time
	lastToken  time.Time
	ptoks      int

	out stream
}

// NewRequest builds a request; id must be unique for the life of the process.
func NewRequest(id uint64, prompt []int32, p Params) *Request {
	return &Request{ID: id, Prompt: prompt, Params: p, slot: -1, out: newStream()}
}

// Next blocks until the next event or ctx is done.
func (r *Request) Next(ctx context.Context) (Event, error) { return r.out.next(ctx) }

// Poll returns the next event if there is one.
func (r *Request) Poll() (Event, bool) { return r.out.poll() }

// Ready receives a value after new events arrive; pair it with Poll.
func (r *Request) Ready() <-chan struct{} { return r.out.notify }

func (r *Request) genMessage() *ipc.Message {
	p := r.Params
	m := &ipc.Message{
		T:                 ipc.TGen,
		ID:                r.ID,
		Prompt:            r.Prompt,
		MaxTokens:         p.MaxTokens - len(r.generated),
		Temperature:       p.Temperature,
		TopP:              p.TopP,
		TopK:              p.TopK,
		MinP:              p.MinP,
		RepetitionPenalty: p.RepetitionPenalty,
		PresencePenalty:   p.PresencePenalty,
		FrequencyPenalty:  p.FrequencyPenalty,
		LogitBias:         p.LogitBias,
		Stop:              p.Stop,
		Resume:            r.generated,
		Sent:              r.sentBytes,
	}
	if p.Seed != nil {
		m.Seed, m.HasSeed = *p.Seed, true
	}
	return m
}

// stream is an unbounded, single-consumer event queue: the scheduler never
// blocks on a slow client.
type stream struct {
	mu     sync.Mutex
	events []Event // events[head:] are pending
	head   int
	notify chan struct{}
}

func newStream() stream { return stream{notify: make(chan struct{}, 1)} }

func (s *stream) push(e Event) {
	s.mu.Lock()
	if s.head > 0 && len(s.events) == cap(s.events) {
		// Reuse the consumed front instead of growing.
		n := copy(s.events, s.events[s.head:])
		clear(s.events[n:])
		s.events, s.head = s.events[:n], 0
	}
	s.events = append(s.events, e)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *stream) poll() (Event, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.head == len(s.events) {
		return Event{}, false
	}
	e := s.events[s.head]
	s.events[s.head] = Event{}
	s.head++
	if s.head == len(s.events) { // drained: keep the backing array
		s.events, s.head = s.events[:0], 0
	}
	return e, true
}

func (s *stream) next(ctx context.Context) (Event, error) {
	for {
		if e, ok := s.poll(); ok {
			return e, nil
		}
		select {
		case <-s.notify:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}
