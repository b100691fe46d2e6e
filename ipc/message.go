package ipc

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// Version is the protocol version this supervisor speaks. Version 3: the
// worker's prompt cache (done.cached, hello.cache_bytes, pong.cache and
// pong.evicted). Version 2: a gen carries the prompt as text or chat
// messages, which the worker tokenizes (version 1 had a separate tokenize
// round trip).
const Version = 3

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

// ChatMessage is one entry of a gen's messages.
type ChatMessage struct {
	Role    string `msgpack:"role"`
	Content string `msgpack:"content"`
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
