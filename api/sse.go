package api

import (
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// chunkEncoder writes the SSE events of one streamed response without
// reflection: the chunks every streamed token produces (content, and the
// role and finish chunks around them) are appended by hand to one reused
// buffer, byte for byte what json.Marshal writes for the same chatResponse or
// completionResponse (sse_test.go checks that, and fuzzes it). Chunks with
// logprobs, usage or errors, which are rare, still go through json.Marshal.
type chunkEncoder struct {
	chat bool
	head []byte // `data: {"id":...,"choices":[`, the same for every chunk
	buf  []byte
}

func newChunkEncoder(chat bool, id string, created int64, model string) *chunkEncoder {
	e := &chunkEncoder{chat: chat, buf: make([]byte, 0, 512)}
	object := "text_completion"
	if chat {
		object = "chat.completion.chunk"
	}
	h := append(make([]byte, 0, 160), `data: {"id":`...)
	h = appendJSONString(h, id)
	h = append(h, `,"object":`...)
	h = appendJSONString(h, object)
	h = append(h, `,"created":`...)
	h = strconv.AppendInt(h, created, 10)
	h = append(h, `,"model":`...)
	h = appendJSONString(h, model)
	h = append(h, `,"system_fingerprint":"krserve","choices":[`...)
	e.head = h
	return e
}

// content returns the event of a chunk that carries text (no logprobs).
// The slice is valid until the next call.
func (e *chunkEncoder) content(text string) []byte {
	b := append(e.buf[:0], e.head...)
	if e.chat {
		b = append(b, `{"index":0,"delta":{"content":`...)
		b = appendJSONString(b, text)
		b = append(b, `},"logprobs":null,"finish_reason":null}]}`...)
	} else {
		b = append(b, `{"index":0,"text":`...)
		b = appendJSONString(b, text)
		b = append(b, `,"logprobs":null,"finish_reason":null}]}`...)
	}
	e.buf = append(b, "\n\n"...)
	return e.buf
}

// role returns a chat stream's first event: the assistant role and empty content.
func (e *chunkEncoder) role() []byte {
	b := append(e.buf[:0], e.head...)
	b = append(b, `{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}`+"\n\n"...)
	e.buf = b
	return b
}

// finish returns the event that carries the finish reason.
func (e *chunkEncoder) finish(reason string) []byte {
	b := append(e.buf[:0], e.head...)
	if e.chat {
		b = append(b, `{"index":0,"delta":{},"logprobs":null,"finish_reason":`...)
	} else {
		b = append(b, `{"index":0,"text":"","logprobs":null,"finish_reason":`...)
	}
	b = appendJSONString(b, reason)
	e.buf = append(b, "}]}\n\n"...)
	return e.buf
}

// usage returns the include_usage event: no choices, the token counts
// (cached: of the prompt tokens, those taken from the prompt cache).
func (e *chunkEncoder) usage(prompt, completion, cached int) []byte {
	b := append(e.buf[:0], e.head...)
	b = append(b, `],"usage":{"prompt_tokens":`...)
	b = strconv.AppendInt(b, int64(prompt), 10)
	b = append(b, `,"completion_tokens":`...)
	b = strconv.AppendInt(b, int64(completion), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendInt(b, int64(prompt+completion), 10)
	b = append(b, `,"prompt_tokens_details":{"cached_tokens":`...)
	b = strconv.AppendInt(b, int64(cached), 10)
	e.buf = append(b, "}}}\n\n"...)
	return e.buf
}

// event returns v, marshalled with encoding/json, as an SSE event.
func (e *chunkEncoder) event(v any) []byte {
	j, err := json.Marshal(v)
	if err != nil {
		j = []byte(`{"error":{"message":"encoding a chunk failed","type":"server_error","param":null,"code":null}}`)
	}
	b := append(e.buf[:0], "data: "...)
	b = append(b, j...)
	e.buf = append(b, "\n\n"...)
	return e.buf
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string exactly as encoding/json
// writes it: HTML-safe (<, > and & escaped), invalid UTF-8 as U+FFFD, and
// U+2028 and U+2029 escaped.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
