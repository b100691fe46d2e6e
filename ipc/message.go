package ipc

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// Version is the protocol version this supervisor speaks. Version 4: a tok's
// calls are entries of calls in fragments (index; name when the entry begins
// a call; a piece of its arguments), so a call's arguments can stream as they
// are generated, and a resume carries the bytes of the last begun call's
// arguments delivered (sent_args); a done may say that the output ended inside
// a call that is not whole (cut_call, optional). Version 3: a gen
// may carry a JSON schema to constrain its output (schema), tools for the chat
// template and a tool choice (tools, tool_choice, tool_name, one_call,
// sent_calls), chat messages with tool calls and tool results; a tok may carry
// the tool calls the worker parsed (calls); the worker's prompt cache
// (done.cached, hello.cache_bytes, pong.cache and pong.evicted). Version 2: a
// gen carries the prompt as text or chat messages, which the worker tokenizes
// (version 1 had a separate tokenize round trip).
const Version = 4

// Message types (the "t" key).
const (
	TGen      = "gen"
	TCancel   = "cancel"
	TPing     = "ping"
	TShutdown = "shutdown"
	THello    = "hello"
	TTok      = "tok"
	TDone     = "done"
	TError    = "error"
	TPong     = "pong"
)

// ChatMessage is one entry of a gen's messages. Role and content are always
// on the wire; an assistant message's tool calls and a tool message's
// tool_call_id only when set.
type ChatMessage struct {
	Role       string     `msgpack:"role"`
	Content    string     `msgpack:"content"`
	ToolCalls  []ToolCall `msgpack:"tool_calls,omitempty"`
	ToolCallID string     `msgpack:"tool_call_id,omitempty"`
}

// ToolCall is one function call in a gen's assistant message (with the id
// the client gave it, Name and the JSON text of the arguments object), or an
// entry of a tok's or done's calls (without id: the supervisor names the
// call): an entry with Name begins call Index (the request's calls are
// numbered from 0), one without appends Arguments to call Index's arguments.
// A whole call is one entry with both.
type ToolCall struct {
	ID        string `msgpack:"id,omitempty"`
	Index     int    `msgpack:"index,omitempty"`
	Name      string `msgpack:"name,omitempty"`
	Arguments string `msgpack:"arguments"`
}

// Message is the union of every frame body. Only the fields that
// docs/protocol.md lists for T are meaningful; zero values are omitted on the
// wire. Field order here is wire order.
type Message struct {
	T string `msgpack:"t"`

	// hello
	V        int               `msgpack:"v,omitempty"`
	PID      int               `msgpack:"pid,omitempty"`
	Model    string            `msgpack:"model,omitempty"`
	Ctx      int               `msgpack:"ctx,omitempty"`
	Vocab    int               `msgpack:"vocab,omitempty"`
	EOS      []int32           `msgpack:"eos,omitempty"`
	Caps     []string          `msgpack:"caps,omitempty"`
	Versions map[string]string `msgpack:"versions,omitempty"`
	// CacheBytes is the worker's prompt cache budget in bytes (0: off).
	CacheBytes int64 `msgpack:"cache_bytes,omitempty"`

	ID  uint64 `msgpack:"id,omitempty"`
	Seq uint64 `msgpack:"seq,omitempty"`

	// gen
	Prompt            []int32           `msgpack:"prompt,omitempty"`
	MaxTokens         int               `msgpack:"max_tokens,omitempty"`
	Temperature       float64           `msgpack:"temperature,omitempty"`
	TopP              float64           `msgpack:"top_p,omitempty"`
	TopK              int               `msgpack:"top_k,omitempty"`
	MinP              float64           `msgpack:"min_p,omitempty"`
	Seed              int64             `msgpack:"seed,omitempty"`
	HasSeed           bool              `msgpack:"has_seed,omitempty"`
	RepetitionPenalty float64           `msgpack:"repetition_penalty,omitempty"`
	PresencePenalty   float64           `msgpack:"presence_penalty,omitempty"`
	FrequencyPenalty  float64           `msgpack:"frequency_penalty,omitempty"`
	LogitBias         map[int32]float64 `msgpack:"logit_bias,omitempty"`
	Stop              []string          `msgpack:"stop,omitempty"`
	Resume            []int32           `msgpack:"resume,omitempty"`
	Sent              int               `msgpack:"sent,omitempty"`
	Logprobs          bool              `msgpack:"logprobs,omitempty"`
	TopLogprobs       int               `msgpack:"top_logprobs,omitempty"`

	// gen: a prompt for the worker to tokenize instead of prompt ids; also
	// tok and done: output text
	Text     string        `msgpack:"text,omitempty"`
	Messages []ChatMessage `msgpack:"messages,omitempty"`
	Special  bool          `msgpack:"special,omitempty"`

	// gen: structured output and tools (protocol v3). Schema is the JSON
	// Schema text the output must match (grammar-constrained); Tools the JSON
	// text of the request's tools array (OpenAI shape), rendered by the chat
	// template; ToolChoice "auto", "none" or "required", or "function" with
	// ToolName; OneCall: at most one call (parallel_tool_calls false);
	// SentCalls: on a resume, the calls begun (their first entry delivered);
	// SentArgs (v4): of the last of them, the bytes of arguments delivered.
	Schema     string `msgpack:"schema,omitempty"`
	Tools      string `msgpack:"tools,omitempty"`
	ToolChoice string `msgpack:"tool_choice,omitempty"`
	ToolName   string `msgpack:"tool_name,omitempty"`
	OneCall    bool   `msgpack:"one_call,omitempty"`
	SentCalls  int    `msgpack:"sent_calls,omitempty"`
	SentArgs   int    `msgpack:"sent_args,omitempty"`

	// tok
	IDs []int32 `msgpack:"ids,omitempty"`

	// tok, with gen's logprobs: one entry per id, in the same order
	LPs     []float64   `msgpack:"lps,omitempty"`      // the chosen token's logprob
	Toks    []string    `msgpack:"toks,omitempty"`     // the chosen token's text
	TopLPs  [][]float64 `msgpack:"top_lps,omitempty"`  // the top_logprobs best logprobs, best first
	TopToks [][]string  `msgpack:"top_toks,omitempty"` // their tokens' text

	// done
	Reason string `msgpack:"reason,omitempty"`
	PToks  int    `msgpack:"ptoks,omitempty"`
	CToks  int    `msgpack:"ctoks,omitempty"`
	Cached int    `msgpack:"cached,omitempty"` // of ptoks, taken from the prompt cache

	// tok, done: tool call entries since the last event (gen with tools)
	Calls []ToolCall `msgpack:"calls,omitempty"`
	// done: the output ended inside a tool call that is not whole (a stop
	// string or max_tokens cut it before its end): the request's finish
	// reason stays its reason, not tool_calls. Added to version 4 without a
	// version change: a worker that never sends it gets the behaviour from
	// before, every call taken as whole.
	CutCall bool `msgpack:"cut_call,omitempty"`

	// error
	Code string `msgpack:"code,omitempty"`
	Msg  string `msgpack:"msg,omitempty"`

	// pong
	Active    int   `msgpack:"active,omitempty"`
	MemActive int64 `msgpack:"mem_active,omitempty"`
	MemPeak   int64 `msgpack:"mem_peak,omitempty"`
	RSS       int64 `msgpack:"rss,omitempty"`
	Cache     int64 `msgpack:"cache,omitempty"`   // bytes the prompt cache holds
	Evicted   int64 `msgpack:"evicted,omitempty"` // prompt cache entries evicted since the worker started
}

// Encode returns the msgpack body of m (no length prefix).
func Encode(m *Message) ([]byte, error) { return appendBody(nil, m), nil }

// encodeGeneric is the reference encoder, which defines the wire format;
// appendBody (fast.go) writes the same bytes.
func encodeGeneric(m *Message) ([]byte, error) {
	var buf bytes.Buffer
	enc := msgpack.GetEncoder()
	defer msgpack.PutEncoder(enc)
	enc.Reset(&buf)
	enc.UseCompactInts(true)
	enc.UseCompactFloats(false)
	enc.SetSortMapKeys(true)
	if err := enc.Encode(m); err != nil {
		return nil, fmt.Errorf("encode %s: %w", m.T, err)
	}
	return buf.Bytes(), nil
}

// AppendMessage encodes m and appends it to dst as a complete frame.
func AppendMessage(dst []byte, m *Message) ([]byte, error) {
	out := appendBody(append(dst, 0, 0, 0, 0), m)
	n := len(out) - len(dst) - 4
	if n > MaxFrameSize {
		return dst, fmt.Errorf("encode %s: body of %d bytes exceeds %d", m.T, n, MaxFrameSize)
	}
	binary.BigEndian.PutUint32(out[len(dst):], uint32(n))
	return out, nil
}

// Decode parses one frame body. Anything but a single msgpack map with a string
// "t" is a protocol error. The hot frames are decoded by hand (fast.go).
func Decode(body []byte, m *Message) error { return decodeFast(body, m) }

// decodeGeneric is the reference decoder. Only for a validated body: it
// allocates whatever array lengths say.
func decodeGeneric(body []byte, m *Message) error {
	*m = Message{}
	if len(body) == 0 || !isMap(body[0]) {
		return fmt.Errorf("%w: frame body is not a msgpack map", ErrProtocol)
	}
	r := bytes.NewReader(body)
	dec := msgpack.GetDecoder()
	defer msgpack.PutDecoder(dec)
	dec.Reset(r)
	if err := dec.Decode(m); err != nil {
		return fmt.Errorf("%w: undecodable frame: %w", ErrProtocol, err)
	}
	if r.Len() != 0 {
		return fmt.Errorf("%w: %d trailing bytes after frame map", ErrProtocol, r.Len())
	}
	if m.T == "" {
		return fmt.Errorf("%w: frame without message type", ErrProtocol)
	}
	return nil
}

func isMap(b byte) bool { return b&0xf0 == 0x80 || b == 0xde || b == 0xdf }
