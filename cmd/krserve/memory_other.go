//go:build !linux && !darwin

package main

// physicalMemory is unknown here: the prompt cache default is left to the
// workers.
func physicalMemory() int64 { return 0 }
