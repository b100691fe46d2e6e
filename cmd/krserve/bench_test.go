package main

import (
	"strings"
	"testing"
)

func TestResponseFormatFlag(t *testing.T) {
	for _, c := range []struct {
		flag, want, err string
	}{
		{"", "", ""},
		{`{"type":"json_object"}`, `{"type":"json_object"}`, ""},
		{`"json_object"`, "", "must be a JSON object"},
		{`{"type":`, "", "must be a JSON object"},
	} {
		got, err := responseFormat(c.flag)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: error %v, want %q", c.flag, err, c.err)
			}
			continue
		}
		if err != nil || string(got) != c.want {
			t.Errorf("%q: %q, %v; want %q", c.flag, got, err, c.want)
		}
	}
	// Checked before any request is sent, whichever the scenario.
	err := runBench(nil, benchFlags{scenario: "multi-turn", responseFormat: "[]"}, false, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "--response-format") {
		t.Errorf("multi-turn with a bad --response-format: %v", err)
	}
}
