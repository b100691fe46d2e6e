package loadgen

import (
	"bufio"
	"bytes"
	"io"
)

// sseReader reads Server-Sent Events (text/event-stream) and returns the data
// of each event.
//
// It follows the WHATWG event-stream rules that matter for OpenAI-style
// streams and is lenient where servers differ:
//   - lines end in "\n", "\r\n" or a lone "\r";
//   - a line starting with ':' is a comment (keep-alive) and is ignored;
//   - "data:" lines (one optional space after the colon) are joined with "\n";
//   - an empty line dispatches the event; an event without data lines
//     (e.g. only "event:" or "id:") is skipped;
//   - other fields (event, id, retry) are ignored;
//   - at end of stream, pending data is dispatched even without the final
//     empty line.
type sseReader struct {
	r        *bufio.Reader
	data     []byte
	hasData  bool
	comments int // comment lines seen (keep-alives)
	pendCR   bool
}

func newSSEReader(r io.Reader) *sseReader {
	return &sseReader{r: bufio.NewReaderSize(r, 64<<10)}
}

// readLine returns one line without its terminator. It returns io.EOF only
// when no bytes at all were read.
func (s *sseReader) readLine() ([]byte, error) {
	var line []byte
	for {
		b, err := s.r.ReadByte()
		if err != nil {
			if len(line) > 0 && err == io.EOF {
				return line, nil
			}
			return line, err
		}
		if s.pendCR {
			s.pendCR = false
			if b == '\n' {
				continue // second half of "\r\n"
			}
		}
		switch b {
		case '\n':
			return line, nil
		case '\r':
			s.pendCR = true
			return line, nil
		}
		line = append(line, b)
		// Fast path: copy the rest of the line up to '\n' or '\r' at once.
		if buf, _ := s.r.Peek(s.r.Buffered()); len(buf) > 0 {
			if i := bytes.IndexAny(buf, "\r\n"); i > 0 {
				line = append(line, buf[:i]...)
				_, _ = s.r.Discard(i)
			} else if i < 0 {
				line = append(line, buf...)
				_, _ = s.r.Discard(len(buf))
			}
		}
	}
}

// Next returns the data of the next event. It returns io.EOF at the end of
// the stream, or the read error.
func (s *sseReader) Next() ([]byte, error) {
	for {
		line, err := s.readLine()
		if err != nil {
			if s.hasData {
				return s.dispatch(), nil
			}
			return nil, err
		}
		if len(line) == 0 {
			if s.hasData {
				return s.dispatch(), nil
			}
			continue
		}
		if line[0] == ':' {
			s.comments++
			continue
		}
		field, value := line, []byte(nil)
		if i := bytes.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], line[i+1:]
			if len(value) > 0 && value[0] == ' ' {
				value = value[1:]
			}
		}
		if string(field) != "data" {
			continue
		}
		if s.hasData {
			s.data = append(s.data, '\n')
		}
		s.data = append(s.data, value...)
		s.hasData = true
	}
}

func (s *sseReader) dispatch() []byte {
	d := s.data
	s.data = nil
	s.hasData = false
	return d
}
