package ipc

// Hand-rolled msgpack for the hot path. The reflection-based codec in
// message.go (encodeGeneric, decodeGeneric) defines the wire format; the code
// here must agree with it byte for byte (fast_test.go checks the shared
// vectors, every field of Message, and fuzzes both directions).
//
// Encoding covers every field of Message in field order, zero values omitted,
// as encodeGeneric writes them: compact ints, float64, str (never bin).
// map[int32]float64 (logit_bias) is the one exception: the generic encoder
// writes it in Go's random map order, appendBody sorts its keys by their
// decimal text, as encoding/json does, so a frame's bytes are deterministic.
//
// Decoding handles the scalar and list fields (everything a worker sends at
// run time: tok with or without logprobs, done, error, pong; and gen,
// cancel, ping without logit_bias). A frame with any other key (versions,
// logit_bias, messages, a key this version does not know) goes to
// decodeGeneric, after validate has walked it: the generic decoder trusts
// array lengths (a 16-byte frame can make it allocate gigabytes) and recurses
// without a depth limit. A known key with a value of another type (nil, bin, a
// float for an int, an int out of range) is a protocol error, as are
// truncation and trailing bytes.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
)

// appendBody appends the msgpack body of m to b.
func appendBody(b []byte, m *Message) []byte {
	// Room for the usual frame in one allocation: ids take 1 to 5 bytes.
	b = slices.Grow(b, 64+len(m.Text)+5*(len(m.Prompt)+len(m.Resume)+len(m.IDs)))
	start := len(b)
	e := encoder{b: append(b, 0x80)} // fixmap header, fixed up by finish
	e.key("t")
	e.b = appendStr(e.b, m.T) // the one field without omitempty
	e.int("v", int64(m.V))
	e.int("pid", int64(m.PID))
	e.str("model", m.Model)
	e.int("ctx", int64(m.Ctx))
	e.int("vocab", int64(m.Vocab))
	e.int32s("eos", m.EOS)
	e.strs("caps", m.Caps)
	if len(m.Versions) > 0 {
		e.key("versions")
		e.b = appendMapLen(e.b, len(m.Versions))
		for _, k := range slices.Sorted(maps.Keys(m.Versions)) {
			e.b = appendStr(appendStr(e.b, k), m.Versions[k])
		}
	}
	e.int("cache_bytes", m.CacheBytes)
	e.uint("id", m.ID)
	e.uint("seq", m.Seq)
	e.int32s("prompt", m.Prompt)
	e.int("max_tokens", int64(m.MaxTokens))
	e.float("temperature", m.Temperature)
	e.float("top_p", m.TopP)
	e.int("top_k", int64(m.TopK))
	e.float("min_p", m.MinP)
	e.int("seed", m.Seed)
	e.bool("has_seed", m.HasSeed)
	e.float("repetition_penalty", m.RepetitionPenalty)
	e.float("presence_penalty", m.PresencePenalty)
	e.float("frequency_penalty", m.FrequencyPenalty)
	if len(m.LogitBias) > 0 {
		e.key("logit_bias")
		e.b = appendMapLen(e.b, len(m.LogitBias))
		for _, k := range slices.SortedFunc(maps.Keys(m.LogitBias), compareDecimal) {
			e.b = appendFloat(appendInt(e.b, int64(k)), m.LogitBias[k])
		}
	}
	e.strs("stop", m.Stop)
	e.int32s("resume", m.Resume)
	e.int("sent", int64(m.Sent))
	e.bool("logprobs", m.Logprobs)
	e.int("top_logprobs", int64(m.TopLogprobs))
	e.str("text", m.Text)
	if len(m.Messages) > 0 {
		e.key("messages")
		e.b = appendArrayLen(e.b, len(m.Messages))
		for _, cm := range m.Messages { // role and content always; the rest when set
			n := 2
			if len(cm.ToolCalls) > 0 {
				n++
			}
			if cm.ToolCallID != "" {
				n++
			}
			e.b = append(e.b, 0x80|byte(n))
			e.b = appendStr(appendStr(e.b, "role"), cm.Role)
			e.b = appendStr(appendStr(e.b, "content"), cm.Content)
			if len(cm.ToolCalls) > 0 {
				e.b = appendToolCalls(appendStr(e.b, "tool_calls"), cm.ToolCalls)
			}
			if cm.ToolCallID != "" {
				e.b = appendStr(appendStr(e.b, "tool_call_id"), cm.ToolCallID)
			}
		}
	}
	e.bool("special", m.Special)
	e.str("schema", m.Schema)
	e.str("tools", m.Tools)
	e.str("tool_choice", m.ToolChoice)
	e.str("tool_name", m.ToolName)
	e.bool("one_call", m.OneCall)
	e.int("sent_calls", int64(m.SentCalls))
	e.int("sent_args", int64(m.SentArgs))
	e.int32s("ids", m.IDs)
	e.floats("lps", m.LPs)
	e.strs("toks", m.Toks)
	if len(m.TopLPs) > 0 {
		e.key("top_lps")
		e.b = appendArrayLen(e.b, len(m.TopLPs))
		for _, s := range m.TopLPs {
			e.b = appendArrayLen(e.b, len(s))
			for _, x := range s {
				e.b = appendFloat(e.b, x)
			}
		}
	}
	if len(m.TopToks) > 0 {
		e.key("top_toks")
		e.b = appendArrayLen(e.b, len(m.TopToks))
		for _, s := range m.TopToks {
			e.b = appendArrayLen(e.b, len(s))
			for _, x := range s {
				e.b = appendStr(e.b, x)
			}
		}
	}
	e.str("reason", m.Reason)
	e.int("ptoks", int64(m.PToks))
	e.int("ctoks", int64(m.CToks))
	e.int("cached", int64(m.Cached))
	if len(m.Calls) > 0 {
		e.b = appendToolCalls(appendStr(e.b, "calls"), m.Calls)
		e.n++
	}
	e.bool("cut_call", m.CutCall)
	e.str("code", m.Code)
	e.str("msg", m.Msg)
	e.int("active", int64(m.Active))
	e.int("mem_active", m.MemActive)
	e.int("mem_peak", m.MemPeak)
	e.int("rss", m.RSS)
	e.int("cache", m.Cache)
	e.int("evicted", m.Evicted)

	b = e.b
	if e.n < 16 {
		b[start] = 0x80 | byte(e.n)
		return b
	}
	// map16: two more header bytes (Message has fewer than 65536 fields).
	b = append(b, 0, 0)
	copy(b[start+3:], b[start+1:len(b)-2])
	b[start] = 0xde
	binary.BigEndian.PutUint16(b[start+1:], uint16(e.n))
	return b
}

// encoder appends map entries, omitting zero values, and counts them.
type encoder struct {
	b []byte
	n int
}

func (e *encoder) key(k string) {
	e.n++
	e.b = appendStr(e.b, k)
}

func (e *encoder) str(k, v string) {
	if v != "" {
		e.key(k)
		e.b = appendStr(e.b, v)
	}
}

func (e *encoder) int(k string, v int64) {
	if v != 0 {
		e.key(k)
		e.b = appendInt(e.b, v)
	}
}

func (e *encoder) uint(k string, v uint64) {
	if v != 0 {
		e.key(k)
		e.b = appendUint(e.b, v)
	}
}

func (e *encoder) float(k string, v float64) {
	if v != 0 { // -0.0 too; NaN is not zero
		e.key(k)
		e.b = appendFloat(e.b, v)
	}
}

func (e *encoder) bool(k string, v bool) {
	if v {
		e.key(k)
		e.b = append(e.b, 0xc3)
	}
}

func (e *encoder) int32s(k string, v []int32) {
	if len(v) > 0 {
		e.key(k)
		b := appendArrayLen(e.b, len(v))
		for _, x := range v {
			switch { // token ids: the common cases of appendInt, inlined
			case uint32(x) <= math.MaxInt8:
				b = append(b, byte(x))
			case uint32(x) <= math.MaxUint8:
				b = append(b, 0xcc, byte(x))
			case uint32(x) <= math.MaxUint16:
				b = append(b, 0xcd, byte(x>>8), byte(x))
			default:
				b = appendInt(b, int64(x))
			}
		}
		e.b = b
	}
}

func (e *encoder) floats(k string, v []float64) {
	if len(v) > 0 {
		e.key(k)
		e.b = appendArrayLen(e.b, len(v))
		for _, x := range v {
			e.b = appendFloat(e.b, x)
		}
	}
}

func (e *encoder) strs(k string, v []string) {
	if len(v) > 0 {
		e.key(k)
		e.b = appendArrayLen(e.b, len(v))
		for _, s := range v {
			e.b = appendStr(e.b, s)
		}
	}
}

// appendToolCalls appends calls as the generic encoder writes []ToolCall:
// id, index and name when set, then arguments, always.
func appendToolCalls(b []byte, calls []ToolCall) []byte {
	b = appendArrayLen(b, len(calls))
	for _, c := range calls {
		n := byte(1)
		for _, set := range []bool{c.ID != "", c.Index != 0, c.Name != ""} {
			if set {
				n++
			}
		}
		b = append(b, 0x80|n)
		if c.ID != "" {
			b = appendStr(appendStr(b, "id"), c.ID)
		}
		if c.Index != 0 {
			b = appendInt(appendStr(b, "index"), int64(c.Index))
		}
		if c.Name != "" {
			b = appendStr(appendStr(b, "name"), c.Name)
		}
		b = appendStr(appendStr(b, "arguments"), c.Arguments)
	}
	return b
}

// compareDecimal orders ints as their decimal text ("17" < "2").
func compareDecimal(a, b int32) int {
	var x, y [12]byte
	return bytes.Compare(strconv.AppendInt(x[:0], int64(a), 10), strconv.AppendInt(y[:0], int64(b), 10))
}

func appendUint(b []byte, v uint64) []byte {
	switch {
	case v <= math.MaxInt8:
		return append(b, byte(v))
	case v <= math.MaxUint8:
		return append(b, 0xcc, byte(v))
	case v <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 0xcd), uint16(v))
	case v <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, 0xce), uint32(v))
	}
	return binary.BigEndian.AppendUint64(append(b, 0xcf), v)
}

func appendInt(b []byte, v int64) []byte {
	switch {
	case v >= 0:
		return appendUint(b, uint64(v))
	case v >= -32:
		return append(b, byte(v))
	case v >= math.MinInt8:
		return append(b, 0xd0, byte(v))
	case v >= math.MinInt16:
		return binary.BigEndian.AppendUint16(append(b, 0xd1), uint16(v))
	case v >= math.MinInt32:
		return binary.BigEndian.AppendUint32(append(b, 0xd2), uint32(v))
	}
	return binary.BigEndian.AppendUint64(append(b, 0xd3), uint64(v))
}

func appendFloat(b []byte, v float64) []byte {
	return binary.BigEndian.AppendUint64(append(b, 0xcb), math.Float64bits(v))
}

func appendStr(b []byte, s string) []byte {
	switch n := len(s); {
	case n < 32:
		b = append(b, 0xa0|byte(n))
	case n <= math.MaxUint8:
		b = append(b, 0xd9, byte(n))
	case n <= math.MaxUint16:
		b = binary.BigEndian.AppendUint16(append(b, 0xda), uint16(n))
	default:
		b = binary.BigEndian.AppendUint32(append(b, 0xdb), uint32(n))
	}
	return append(b, s...)
}

func appendArrayLen(b []byte, n int) []byte {
	switch {
	case n < 16:
		return append(b, 0x90|byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 0xdc), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, 0xdd), uint32(n))
}

func appendMapLen(b []byte, n int) []byte {
	switch {
	case n < 16:
		return append(b, 0x80|byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 0xde), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, 0xdf), uint32(n))
}

// errGeneric: the frame has a key that decodeFast leaves to decodeGeneric.
var errGeneric = errors.New("not for the fast decoder")

// decodeFast is Decode: see the comment at the top of this file.
func decodeFast(body []byte, m *Message) error {
	*m = Message{}
	if len(body) == 0 || !isMap(body[0]) {
		return fmt.Errorf("%w: frame body is not a msgpack map", ErrProtocol)
	}
	d := decoder{b: body}
	err := d.message(m)
	if err == errGeneric {
		if err := validate(body); err != nil {
			return fmt.Errorf("%w: undecodable frame: %w", ErrProtocol, err)
		}
		return decodeGeneric(body, m)
	}
	if err != nil {
		return fmt.Errorf("%w: undecodable frame: %w", ErrProtocol, err)
	}
	if d.rest() != 0 {
		return fmt.Errorf("%w: %d trailing bytes after frame map", ErrProtocol, d.rest())
	}
	if m.T == "" {
		return fmt.Errorf("%w: frame without message type", ErrProtocol)
	}
	return nil
}

// decoder reads msgpack values from b[i:]. The first error sticks: every
// later read returns a zero value. (An index, not a shrinking slice: no
// pointer is written as it advances.)
type decoder struct {
	b   []byte
	i   int
	err error
}

func (d *decoder) rest() int { return len(d.b) - d.i }

var errTruncated = errors.New("truncated")

func (d *decoder) message(m *Message) error {
	n := d.mapLen()
	for i := 0; i < n && d.err == nil; i++ {
		k := d.strBytes()
		if d.err != nil {
			return fmt.Errorf("map key: %w", d.err)
		}
		switch string(k) {
		case "t":
			m.T = d.oneOf(msgTypes)
		case "v":
			m.V = int(d.int())
		case "pid":
			m.PID = int(d.int())
		case "model":
			m.Model = d.str()
		case "ctx":
			m.Ctx = int(d.int())
		case "vocab":
			m.Vocab = int(d.int())
		case "eos":
			m.EOS = d.int32s()
		case "caps":
			m.Caps = d.strs()
		case "cache_bytes":
			m.CacheBytes = d.int()
		case "id":
			m.ID = d.uint()
		case "seq":
			m.Seq = d.uint()
		case "prompt":
			m.Prompt = d.int32s()
		case "max_tokens":
			m.MaxTokens = int(d.int())
		case "temperature":
			m.Temperature = d.float()
		case "top_p":
			m.TopP = d.float()
		case "top_k":
			m.TopK = int(d.int())
		case "min_p":
			m.MinP = d.float()
		case "seed":
			m.Seed = d.int()
		case "has_seed":
			m.HasSeed = d.bool()
		case "repetition_penalty":
			m.RepetitionPenalty = d.float()
		case "presence_penalty":
			m.PresencePenalty = d.float()
		case "frequency_penalty":
			m.FrequencyPenalty = d.float()
		case "stop":
			m.Stop = d.strs()
		case "resume":
			m.Resume = d.int32s()
		case "sent":
			m.Sent = int(d.int())
		case "logprobs":
			m.Logprobs = d.bool()
		case "top_logprobs":
			m.TopLogprobs = int(d.int())
		case "text":
			m.Text = d.str()
		case "special":
			m.Special = d.bool()
		case "schema":
			m.Schema = d.str()
		case "tools":
			m.Tools = d.str()
		case "tool_choice":
			m.ToolChoice = d.str()
		case "tool_name":
			m.ToolName = d.str()
		case "one_call":
			m.OneCall = d.bool()
		case "sent_calls":
			m.SentCalls = int(d.int())
		case "sent_args":
			m.SentArgs = int(d.int())
		case "ids":
			m.IDs = d.int32s()
		case "lps":
			m.LPs = d.floats()
		case "toks":
			m.Toks = d.strs()
		case "top_lps":
			m.TopLPs = d.floatLists()
		case "top_toks":
			m.TopToks = d.strLists()
		case "reason":
			m.Reason = d.oneOf(reasons)
		case "ptoks":
			m.PToks = int(d.int())
		case "ctoks":
			m.CToks = int(d.int())
		case "cached":
			m.Cached = int(d.int())
		case "calls":
			if !d.toolCalls(&m.Calls) {
				return errGeneric
			}
		case "cut_call":
			m.CutCall = d.bool()
		case "code":
			m.Code = d.str()
		case "msg":
			m.Msg = d.str()
		case "active":
			m.Active = int(d.int())
		case "mem_active":
			m.MemActive = d.int()
		case "mem_peak":
			m.MemPeak = d.int()
		case "rss":
			m.RSS = d.int()
		case "cache":
			m.Cache = d.int()
		case "evicted":
			m.Evicted = d.int()
		default:
			return errGeneric
		}
		if d.err != nil {
			return fmt.Errorf("key %q: %w", k, d.err)
		}
	}
	return d.err
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
	d.i = len(d.b)
}

func (d *decoder) failCode(c byte, want string) {
	d.fail(fmt.Errorf("msgpack code 0x%02x where %s was expected", c, want))
}

// next returns the next n bytes.
func (d *decoder) next(n int) []byte {
	if n > d.rest() {
		d.fail(errTruncated)
		return nil
	}
	d.i += n
	return d.b[d.i-n : d.i]
}

func (d *decoder) code() byte {
	if d.i >= len(d.b) {
		d.fail(errTruncated)
		return 0xc1 // never used by msgpack
	}
	d.i++
	return d.b[d.i-1]
}

// length reads the big-endian length of size bytes that follows a code.
func (d *decoder) length(size int) int {
	p := d.next(size)
	switch len(p) {
	case 1:
		return int(p[0])
	case 2:
		return int(binary.BigEndian.Uint16(p))
	case 4:
		return int(binary.BigEndian.Uint32(p))
	}
	return 0
}

func (d *decoder) mapLen() int {
	switch c := d.code(); {
	case c&0xf0 == 0x80:
		return int(c & 0x0f)
	case c == 0xde:
		return d.length(2)
	case c == 0xdf:
		return d.length(4)
	default:
		d.failCode(c, "a map")
		return 0
	}
}

// arrayLen returns the length of an array whose every element needs at least
// one byte, so a length beyond the rest of the body is refused before
// anything is allocated for it.
func (d *decoder) arrayLen() int {
	var n int
	switch c := d.code(); {
	case c&0xf0 == 0x90:
		n = int(c & 0x0f)
	case c == 0xdc:
		n = d.length(2)
	case c == 0xdd:
		n = d.length(4)
	default:
		d.failCode(c, "an array")
		return 0
	}
	if n > d.rest() {
		d.fail(errTruncated)
		return 0
	}
	return n
}

// strBytes returns the bytes of a str, which alias the body.
func (d *decoder) strBytes() []byte {
	var n int
	switch c := d.code(); {
	case c&0xe0 == 0xa0:
		n = int(c & 0x1f)
	case c == 0xd9:
		n = d.length(1)
	case c == 0xda:
		n = d.length(2)
	case c == 0xdb:
		n = d.length(4)
	default:
		d.failCode(c, "a string")
		return nil
	}
	return d.next(n)
}

func (d *decoder) str() string { return string(d.strBytes()) }

var (
	msgTypes = []string{TTok, TDone, TPong, TError, THello, TGen, TCancel, TPing, TShutdown}
	reasons  = []string{"stop", "length", "cancelled"}
)

// oneOf is str, without allocating when the string is one of known.
func (d *decoder) oneOf(known []string) string {
	b := d.strBytes()
	for _, s := range known {
		if string(b) == s {
			return s
		}
	}
	return string(b)
}

// int reads any msgpack int that fits an int64.
func (d *decoder) int() int64 {
	c := d.code()
	switch {
	case c <= 0x7f:
		return int64(c)
	case c >= 0xe0:
		return int64(int8(c))
	}
	switch c {
	case 0xcc, 0xcd, 0xce:
		return int64(d.length(1 << (c - 0xcc)))
	case 0xcf:
		if v := d.uint64(); v <= math.MaxInt64 {
			return int64(v)
		}
		d.fail(errors.New("uint64 beyond int64"))
	case 0xd0:
		return int64(int8(d.length(1)))
	case 0xd1:
		return int64(int16(d.length(2)))
	case 0xd2:
		return int64(int32(d.length(4)))
	case 0xd3:
		return int64(d.uint64())
	default:
		d.failCode(c, "an int")
	}
	return 0
}

// uint reads a msgpack int that is not negative.
func (d *decoder) uint() uint64 {
	if d.rest() > 0 && d.b[d.i] == 0xcf {
		d.i++
		return d.uint64()
	}
	v := d.int()
	if v < 0 {
		d.fail(errors.New("negative value for an unsigned field"))
		return 0
	}
	return uint64(v)
}

func (d *decoder) uint64() uint64 {
	p := d.next(8)
	if p == nil {
		return 0
	}
	return binary.BigEndian.Uint64(p)
}

func (d *decoder) float() float64 {
	switch c := d.code(); c {
	case 0xca:
		if p := d.next(4); p != nil {
			return float64(math.Float32frombits(binary.BigEndian.Uint32(p)))
		}
	case 0xcb:
		return math.Float64frombits(d.uint64())
	default:
		d.failCode(c, "a float")
	}
	return 0
}

func (d *decoder) bool() bool {
	switch c := d.code(); c {
	case 0xc2:
		return false
	case 0xc3:
		return true
	default:
		d.failCode(c, "a bool")
		return false
	}
}

func (d *decoder) int32() int32 {
	v := d.int()
	if v < math.MinInt32 || v > math.MaxInt32 {
		d.fail(fmt.Errorf("%d is not an int32", v))
	}
	return int32(v)
}

// The list readers: an empty array gives an empty, non-nil slice, as the
// generic decoder does (arrayLen is 0 after an error).

func (d *decoder) int32s() []int32 {
	s := make([]int32, d.arrayLen())
	for i := range s {
		s[i] = d.int32()
	}
	return s
}

func (d *decoder) strs() []string {
	s := make([]string, d.arrayLen())
	for i := range s {
		s[i] = d.str()
	}
	return s
}

func (d *decoder) floats() []float64 {
	s := make([]float64, d.arrayLen())
	for i := range s {
		s[i] = d.float()
	}
	return s
}

func (d *decoder) strLists() [][]string {
	s := make([][]string, d.arrayLen())
	for i := range s {
		s[i] = d.strs()
	}
	return s
}

// toolCalls reads a tok's or done's calls. It reports false, having read
// nothing into calls, when an entry has a key it does not know (the generic
// decoder then has the frame).
func (d *decoder) toolCalls(calls *[]ToolCall) bool {
	s := make([]ToolCall, d.arrayLen())
	for i := range s {
		n := d.mapLen()
		for j := 0; j < n && d.err == nil; j++ {
			switch string(d.strBytes()) {
			case "id":
				s[i].ID = d.str()
			case "index":
				s[i].Index = int(d.int())
			case "name":
				s[i].Name = d.str()
			case "arguments":
				s[i].Arguments = d.str()
			default:
				if d.err == nil {
					return false
				}
			}
		}
	}
	*calls = s
	return true
}

func (d *decoder) floatLists() [][]float64 {
	s := make([][]float64, d.arrayLen())
	for i := range s {
		s[i] = d.floats()
	}
	return s
}

// maxDepth bounds the nesting validate accepts (a frame nests 3 deep at most).
const maxDepth = 32

// validate checks that body is exactly one well-formed msgpack value, with
// every length inside the body and at most maxDepth levels of nesting.
func validate(body []byte) error {
	d := decoder{b: body}
	d.skip(0)
	if d.err == nil && d.rest() != 0 {
		return fmt.Errorf("%d trailing bytes after frame map", d.rest())
	}
	return d.err
}

func (d *decoder) skip(depth int) {
	if depth > maxDepth {
		d.fail(fmt.Errorf("nested deeper than %d", maxDepth))
		return
	}
	var n int // elements that follow
	switch c := d.code(); {
	case c <= 0x7f, c >= 0xe0, c == 0xc0, c == 0xc2, c == 0xc3: // fixint, nil, bool
	case c&0xe0 == 0xa0: // fixstr
		d.next(int(c & 0x1f))
	case c&0xf0 == 0x80: // fixmap
		n = 2 * int(c&0x0f)
	case c&0xf0 == 0x90: // fixarray
		n = int(c & 0x0f)
	case c == 0xc4, c == 0xd9: // bin8, str8
		d.next(d.length(1))
	case c == 0xc5, c == 0xda:
		d.next(d.length(2))
	case c == 0xc6, c == 0xdb:
		d.next(d.length(4))
	case c == 0xc7, c == 0xc8, c == 0xc9: // ext8/16/32: length, type, data
		d.next(d.length(1<<(c-0xc7)) + 1)
	case c == 0xca:
		d.next(4)
	case c == 0xcb:
		d.next(8)
	case c >= 0xcc && c <= 0xd3: // uint8..64, int8..64
		d.next(1 << ((c - 0xcc) & 3))
	case c >= 0xd4 && c <= 0xd8: // fixext 1..16: type, data
		d.next(1 + 1<<(c-0xd4))
	case c == 0xdc:
		n = d.length(2)
	case c == 0xdd:
		n = d.length(4)
	case c == 0xde:
		n = 2 * d.length(2)
	case c == 0xdf:
		n = 2 * d.length(4)
	default: // 0xc1
		d.failCode(c, "a msgpack value")
	}
	for i := 0; i < n && d.err == nil; i++ {
		d.skip(depth + 1)
	}
}
