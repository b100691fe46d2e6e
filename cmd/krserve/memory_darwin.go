package main

import (
	"encoding/binary"
	"syscall"
)

// physicalMemory is the machine's RAM in bytes (0 if it cannot be read).
func physicalMemory() int64 {
	s, err := syscall.Sysctl("hw.memsize")
	if err != nil {
		return 0
	}
	b := []byte(s)
	for len(b) < 8 { // Sysctl drops trailing zero bytes
		b = append(b, 0)
	}
	return int64(binary.LittleEndian.Uint64(b[:8]))
}
