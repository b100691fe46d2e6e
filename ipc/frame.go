// Package ipc implements the supervisor side of the worker protocol: length-prefixed
// msgpack frames on a pipe (docs/protocol.md).
package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxFrameSize is the largest body either side accepts, checked before allocating.
const MaxFrameSize = 16 << 20

// ErrProtocol marks a malformed frame: the peer is broken and must be replaced.
var ErrProtocol = errors.New("protocol error")

// ReadFrame reads one frame body. It returns io.EOF only on a clean end of stream
// between frames; any other malformation wraps ErrProtocol.
func ReadFrame(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("%w: truncated frame header: %w", ErrProtocol, err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > MaxFrameSize {
		return nil, fmt.Errorf("%w: frame length %d outside 1..%d", ErrProtocol, n, MaxFrameSize)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("%w: truncated frame body (%d bytes announced): %w", ErrProtocol, n, err)
	}
	return buf, nil
}

// AppendFrame appends the length prefix and body to dst.
func AppendFrame(dst, body []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(body)))
	return append(dst, body...)
}
