package ipc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

func TestReadFrameErrors(t *testing.T) {
	good, err := AppendMessage(nil, &Message{T: TPing, Seq: 1})
	if err != nil {
		t.Fatal(err)
	}
	huge := binary.BigEndian.AppendUint32(nil, MaxFrameSize+1)
	cases := []struct {
		name string
		in   []byte
		eof  bool
	}{
		{"empty stream is clean EOF", nil, true},
		{"short header", []byte{0, 0}, false},
		{"zero length", []byte{0, 0, 0, 0}, false},
		{"oversized length refused before allocating", huge, false},
		{"truncated body", good[:len(good)-1], false},
	}
	for _, c := range cases {
		_, err := ReadFrame(bytes.NewReader(c.in), nil)
		if c.eof {
			if err != io.EOF {
				t.Errorf("%s: got %v, want io.EOF", c.name, err)
			}
			continue
		}
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", c.name, err)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	trailing, _ := Encode(&Message{T: TPing, Seq: 1})
	trailing = append(trailing, 0x01)
	cases := map[string][]byte{
		"ascii text (stray print)": []byte("hello\n"),
		"array not map":            {0x91, 0x01},
		"map without t":            {0x81, 0xa2, 'i', 'd', 0x01},
		"t not a string":           {0x81, 0xa1, 't', 0x05},
		"truncated map":            {0x82, 0xa1, 't', 0xa4, 'p', 'i', 'n', 'g'},
		"trailing bytes":           trailing,
	}
	for name, body := range cases {
		var m Message
		if err := Decode(body, &m); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", name, err)
		}
	}
}

func TestRoundTripStream(t *testing.T) {
	var buf []byte
	msgs := canonical()
	for _, c := range msgs {
		var err error
		buf, err = AppendMessage(buf, &c.Msg)
		if err != nil {
			t.Fatal(err)
		}
	}
	r := bytes.NewReader(buf)
	var scratch []byte
	for _, c := range msgs {
		body, err := ReadFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		var m Message
		if err := Decode(body, &m); err != nil {
			t.Fatal(err)
		}
		if m.T != c.Msg.T || m.ID != c.Msg.ID {
			t.Fatalf("got %s/%d, want %s/%d", m.T, m.ID, c.Msg.T, c.Msg.ID)
		}
	}
	if _, err := ReadFrame(r, nil); err != io.EOF {
		t.Fatalf("after last frame: %v, want io.EOF", err)
	}
}
