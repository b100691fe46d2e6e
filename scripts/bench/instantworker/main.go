// Command instantworker is a krserve worker that answers at once, for
// measuring the supervisor's own cost (docs/benchmarks.md, "Supervisor cost"):
//
//	go build -o bin/instantworker ./scripts/bench/instantworker
//	bin/krserve up --worker-exec bin/instantworker --model /tmp ...
//
// It speaks the protocol (docs/protocol.md) over stdin/stdout like
// krserve_worker and ignores its arguments. A gen's text or chat messages
// count one prompt token per byte of text (of the messages' contents); a gen
// is answered with max_tokens tok frames of one token each (text " tok") and a
// done with reason "length", written together as one step would be; cancel is ignored (every request is
// already done); ping gets a pong; shutdown or EOF ends it. It never runs a
// model, so whatever CPU krserve spends per request is the supervisor's.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/krserve/krserve/ipc"
)

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "instantworker:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, stdout io.Writer) error {
	r := bufio.NewReaderSize(in, 64<<10)
	w := bufio.NewWriterSize(stdout, 64<<10)
	out, err := ipc.AppendMessage(nil, &ipc.Message{T: ipc.THello, V: ipc.Version, PID: os.Getpid(),
		Model: "instantworker", Ctx: 1 << 20, Vocab: 1 << 16, EOS: []int32{0},
		Versions: map[string]string{"instantworker": "1"}})
	if err != nil {
		return err
	}
	var buf []byte
	for {
		if _, err := w.Write(out); err != nil {
			return err
		}
		if err := w.Flush(); err != nil {
			return err
		}
		out = out[:0]
		// Answer every frame already read, then write once, as a worker's
		// step writes all of its frames together.
		for {
			body, err := ipc.ReadFrame(r, buf)
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			buf = body[:0]
			var m ipc.Message
			if err := ipc.Decode(body, &m); err != nil {
				return err
			}
			if m.T == ipc.TShutdown {
				return nil
			}
			if out, err = answer(out, &m); err != nil {
				return err
			}
			if r.Buffered() == 0 {
				break
			}
		}
	}
}

var tokText = " tok"

func answer(out []byte, m *ipc.Message) ([]byte, error) {
	switch m.T {
	case ipc.TPing:
		return ipc.AppendMessage(out, &ipc.Message{T: ipc.TPong, Seq: m.Seq})
	case ipc.TGen:
		var err error
		tok := ipc.Message{T: ipc.TTok, ID: m.ID, IDs: []int32{42}, Text: tokText}
		n := max(m.MaxTokens-len(m.Resume), 0)
		for range n {
			if out, err = ipc.AppendMessage(out, &tok); err != nil {
				return out, err
			}
		}
		return ipc.AppendMessage(out, &ipc.Message{T: ipc.TDone, ID: m.ID, Reason: "length",
			PToks: promptTokens(m) + len(m.Resume), CToks: m.MaxTokens})
	}
	return out, nil // cancel: already done
}

// promptTokens is the prompt's length: its ids, or a token per byte of text.
func promptTokens(m *ipc.Message) int {
	if len(m.Prompt) > 0 {
		return len(m.Prompt)
	}
	n := len(m.Text)
	for _, c := range m.Messages {
		n += len(c.Content)
	}
	return max(n, 1)
}
