package scheduler

import (
	"context"
	"errors"
	"fmt"
	"strings"
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

// Error codes of a worker's refusal of an Input prompt, which it tokenizes
// (the front door checks prompts of token ids itself): the prompt does not
// fit the model's context, or it is otherwise unusable (the chat template
// refused the messages, or nothing is left after tokenization). Both fail the
// request as ReasonInvalid, keeping the code.
const (
	CodeContextLength = "context_length_exceeded"
	CodeInvalidPrompt = "invalid_prompt"
)

// Error is a request failure the front door turns into an HTTP status.
type Error struct {
	Reason     string
	Code       string // the worker's error code, when it names more than Reason (context_length_exceeded)
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
	Logprobs          bool // send each token's logprob (Event.Logprobs)
	TopLogprobs       int  // with Logprobs: this many alternatives per token (0..20)
	// Schema: the JSON Schema text the output must match (grammar-constrained
	// by the worker); "" for free output.
	Schema string
}

// TokenLogprob is one generated token's logprob, as the worker reported it.
type TokenLogprob struct {
	Token   string
	Logprob float64
	Top     []TopLogprob // best first; empty unless Params.TopLogprobs > 0
}

// TopLogprob is one of the most likely tokens at a step.
type TopLogprob struct {
	Token   string
	Logprob float64
}

// Event is one step of a request's output, in order.
type Event struct {
	Text   string // output text to append (may be empty)
	Tokens int    // tokens this event accounts for
	// With Params.Logprobs: one entry per token of this event, in order.
	Logprobs []TokenLogprob
	// Tool call entries the worker parsed out of the output (Input.Tools),
	// in order, without ids: an entry with a Name begins call Index (calls
	// are numbered from 0), one without appends Arguments to call Index's
	// arguments (the scheduler checks the order: ipc.ToolCall).
	Calls []ipc.ToolCall

	Done         bool
	FinishReason string // "stop" or "length", with Done
	// CutCall (with Done): the output ended inside a tool call that is not
	// whole (a stop string or max_tokens cut it), as the last worker, which
	// replayed the whole output, reported it (ipc.Message.CutCall).
	CutCall      bool
	PromptTokens int // with Done
	// CachedTokens (with Done): of PromptTokens, how many the worker took
	// from its prompt cache; after a resume, what the last worker reported
	// (capped at PromptTokens).
	CachedTokens     int
	CompletionTokens int   // with Done: all tokens generated, across resumes
	Err              error // with Done: the request failed (*Error)
}

// Input is a prompt that the worker tokenizes (off its model thread): Text,
// with the tokenizer's special tokens when Special, or chat Messages rendered
// by the model's chat template with the generation prompt appended, and
// with the Tools offered (the JSON text of an OpenAI tools array).
// ToolChoice is auto, none, required, or function (ToolName); OneCall allows
// at most one call.
type Input struct {
	Text       string
	Messages   []ipc.ChatMessage
	Special    bool
	Tools      string
	ToolChoice string
	ToolName   string
	OneCall    bool
}

// Request is one generation request. Create it with NewRequest or
// NewInputRequest, hand it to Scheduler.Submit, then read its events with
// Next until Done.
type Request struct {
	ID       uint64
	Prompt   []int32 // token ids; nil when the worker tokenizes Input
	Input    Input
	Params   Params
	Deadline time.Time // zero: none
	Enqueued time.Time

	// Owned by the scheduler (under its mutex).
	generated    []int32
	sentBytes    int
	sentCalls    int  // tool calls begun: their first entry delivered (a resume skips them)
	sentArgs     int  // bytes of the last begun call's arguments delivered
	crashes      int  // worker crashes lived through
	suspect      bool // in flight during a crash and not yet cleared by probation
	crashAt      int  // tokens generated when its worker last died
	aloneCrashes int  // crashes of a worker that ran it alone (probation)
	slot         int  // -1 while queued
	cancelled    bool
	finished     bool
	dispatched   time.Time
	firstToken   time.Time
	lastToken    time.Time
	ptoks        int // tokens the last worker prefilled (prompt and resumed tokens), from done
	promptToks   int // the prompt's length in tokens, once a worker has told (Input prompts)
	queueCost    int // what the request counts against MaxQueueTokens while queued
	dispatchToks int // tokens received from the current worker
	unsent       int // generated by the worker but not sent (EOS), from done's ctoks
	cached       int // prompt tokens the last worker took from its prompt cache, from done

	// Routing (affinity.go): the prompt's block hashes (computed once), the
	// blocks the chosen worker was predicted to hold, and the reply text.
	blocks    []uint64
	textBytes int // length of the prompt's canonical text
	hashed    bool
	predicted int
	keepReply bool
	reply     strings.Builder

	out stream
}

// NewRequest builds a request for a tokenized prompt; id must be unique for
// the life of the process.
func NewRequest(id uint64, prompt []int32, p Params) *Request {
	return &Request{ID: id, Prompt: prompt, Params: p, slot: -1, queueCost: len(prompt), out: newStream()}
}

// NewInputRequest builds a request whose prompt the worker tokenizes.
func NewInputRequest(id uint64, in Input, p Params) *Request {
	return &Request{ID: id, Input: in, Params: p, slot: -1, queueCost: estimateTokens(&in), out: newStream()}
}

// estimateTokens guesses a prompt's length in tokens before the worker has
// tokenized it, for the queue's token budget: four bytes a token (English
// text under a BPE vocabulary runs at about four) plus a few for each chat
// message's template markup.
func estimateTokens(in *Input) int {
	n := len(in.Text) + len(in.Tools)
	for _, m := range in.Messages {
		n += len(m.Role) + len(m.Content) + 16
		for _, c := range m.ToolCalls {
			n += len(c.Name) + len(c.Arguments) + 16
		}
	}
	return max(1, (n+3)/4)
}

// prefixBlocks returns the block hashes of the prompt's canonical text for
// cache-aware routing (nil for token-id prompts or another policy), and from
// then on keeps the reply text for the index.
func (r *Request) prefixBlocks(policy string) []uint64 {
	if !r.hashed {
		r.hashed = true
		if policy == RoutingCacheAware && r.Prompt == nil {
			text := canonical(&r.Input, "")
			r.textBytes = len(text)
			r.blocks = blockHashes(text)
			r.keepReply = true
		}
	}
	return r.blocks
}

// promptTokens is the prompt's length in tokens: known from the start for
// token ids, from the worker's done for an Input (0 before it).
// cachedTokens is what the last worker took from its prompt cache, at most
// the prompt (a resumed request's worker may also have found resumed tokens).
func (r *Request) cachedTokens() int { return min(r.cached, r.promptTokens()) }

func (r *Request) promptTokens() int {
	if r.Prompt != nil {
		return len(r.Prompt)
	}
	return r.promptToks
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
		Text:              r.Input.Text,
		Messages:          r.Input.Messages,
		Special:           r.Input.Special,
		Schema:            p.Schema,
		Tools:             r.Input.Tools,
		ToolChoice:        r.Input.ToolChoice,
		ToolName:          r.Input.ToolName,
		OneCall:           r.Input.OneCall,
		Resume:            r.generated,
		Sent:              r.sentBytes,
		SentCalls:         r.sentCalls,
		SentArgs:          r.sentArgs,
		Logprobs:          p.Logprobs,
		TopLogprobs:       p.TopLogprobs,
	}
	if p.Seed != nil {
		m.Seed, m.HasSeed = *p.Seed, true
	}
	return m
}

// logprobs turns a tok frame's per-token data into TokenLogprobs; nil
// without it. The worker sends one entry per id; a shorter list is a protocol
// error (checked by the caller).
func logprobs(m *ipc.Message) []TokenLogprob {
	if len(m.LPs) == 0 {
		return nil
	}
	out := make([]TokenLogprob, len(m.LPs))
	for i, lp := range m.LPs {
		t := TokenLogprob{Token: m.Toks[i], Logprob: lp}
		if i < len(m.TopLPs) {
			top := m.TopLPs[i]
			t.Top = make([]TopLogprob, len(top))
			for j, x := range top {
				t.Top[j] = TopLogprob{Token: m.TopToks[i][j], Logprob: x}
			}
		}
		out[i] = t
	}
	return out
}

// checkLogprobs reports a tok frame whose logprob lists do not match its ids.
func checkLogprobs(m *ipc.Message) error {
	if len(m.LPs) == 0 && len(m.Toks) == 0 && len(m.TopLPs) == 0 && len(m.TopToks) == 0 {
		return nil
	}
	n := len(m.IDs)
	if len(m.LPs) != n || len(m.Toks) != n || (len(m.TopLPs) != 0 && len(m.TopLPs) != n) || len(m.TopToks) != len(m.TopLPs) {
		return fmt.Errorf("%w: tok for request %d: %d ids but %d lps, %d toks, %d top_lps, %d top_toks",
			ipc.ErrProtocol, m.ID, n, len(m.LPs), len(m.Toks), len(m.TopLPs), len(m.TopToks))
	}
	for i := range m.TopLPs {
		if len(m.TopLPs[i]) != len(m.TopToks[i]) {
			return fmt.Errorf("%w: tok for request %d: top_lps[%d] and top_toks[%d] differ in length", ipc.ErrProtocol, m.ID, i, i)
		}
	}
	return nil
}

// checkCalls refuses tool call entries out of order: an entry with a name
// must begin the next call, one without must continue the last call begun
// (the client assembles calls by index, so a gap or a repeat would corrupt
// them). begun is how many calls r's earlier entries began.
func checkCalls(m *ipc.Message, begun int) error {
	for _, c := range m.Calls {
		switch {
		case c.Name != "" && c.Index == begun:
			begun++
		case c.Name == "" && begun > 0 && c.Index == begun-1:
		default:
			return fmt.Errorf("%w: %s for request %d: tool call entry %d (name %q) after %d calls begun",
				ipc.ErrProtocol, m.T, m.ID, c.Index, c.Name, begun)
		}
	}
	return nil
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
