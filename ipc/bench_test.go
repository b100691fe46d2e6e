package ipc

import (
	"fmt"
	"testing"
)

// The generic (reflection) codec against the hand-rolled one, on the frames of
// the hot path: every token of every request is a tok frame the supervisor
// decodes; every request is a gen frame it encodes (its prompt, under the
// scheduler's mutex).
//
//	go test -run '^$' -bench . -count 10 ./ipc | benchstat -col /impl -

func BenchmarkDecode(b *testing.B) {
	frames := map[string]*Message{
		"tok":  {T: TTok, ID: 1 << 40, IDs: []int32{12345}, Text: " word"},
		"done": {T: TDone, ID: 1 << 40, Reason: "length", PToks: 200, CToks: 16, Text: "."},
		"pong": {T: TPong, Seq: 99, Active: 8, MemActive: 123456789, MemPeak: 5000000000, RSS: 300000000},
	}
	for _, name := range []string{"tok", "done", "pong"} {
		body, err := encodeGeneric(frames[name])
		if err != nil {
			b.Fatal(err)
		}
		for _, impl := range []struct {
			name   string
			decode func([]byte, *Message) error
		}{{"generic", decodeGeneric}, {"fast", Decode}} {
			b.Run(fmt.Sprintf("msg=%s/impl=%s", name, impl.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					var m Message
					if err := impl.decode(body, &m); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkEncodeGen(b *testing.B) {
	for _, n := range []int{200, 2000} {
		prompt := make([]int32, n)
		for i := range prompt {
			prompt[i] = int32(i * 31 % 49152)
		}
		m := &Message{T: TGen, ID: 1 << 40, Prompt: prompt, MaxTokens: 256, Temperature: 0.7, TopP: 0.95, Stop: []string{"</s>"}}
		b.Run(fmt.Sprintf("prompt=%d/impl=generic", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				body, err := encodeGeneric(m)
				if err != nil {
					b.Fatal(err)
				}
				_ = AppendFrame(nil, body)
			}
		})
		b.Run(fmt.Sprintf("prompt=%d/impl=fast", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := AppendMessage(nil, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
