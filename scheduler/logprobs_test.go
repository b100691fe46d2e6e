package scheduler

import (
	"errors"
	"reflect"
	"testing"

	"github.com/krserve/krserve/ipc"
)

func TestTokLogprobs(t *testing.T) {
	m := &ipc.Message{T: ipc.TTok, ID: 1, IDs: []int32{5, 6}, LPs: []float64{-0.5, -1},
		Toks: []string{"a", "b"}, TopLPs: [][]float64{{-0.5, -2}, {-1, -1.5}}, TopToks: [][]string{{"a", "x"}, {"b", "y"}}}
	if err := checkLogprobs(m); err != nil {
		t.Fatal(err)
	}
	want := []TokenLogprob{
		{Token: "a", Logprob: -0.5, Top: []TopLogprob{{"a", -0.5}, {"x", -2}}},
		{Token: "b", Logprob: -1, Top: []TopLogprob{{"b", -1}, {"y", -1.5}}},
	}
	if got := logprobs(m); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	noTop := &ipc.Message{T: ipc.TTok, ID: 1, IDs: []int32{5}, LPs: []float64{-0.5}, Toks: []string{"a"}}
	if err := checkLogprobs(noTop); err != nil {
		t.Fatal(err)
	}
	if got := logprobs(noTop); !reflect.DeepEqual(got, []TokenLogprob{{Token: "a", Logprob: -0.5}}) {
		t.Fatalf("got %+v", got)
	}
	if logprobs(&ipc.Message{T: ipc.TTok, IDs: []int32{5}}) != nil {
		t.Fatal("logprobs without lps")
	}
	// Lists that do not match the ids are a protocol error, never a panic.
	for _, bad := range []*ipc.Message{
		{IDs: []int32{5, 6}, LPs: []float64{-0.5}, Toks: []string{"a"}},
		{IDs: []int32{5}, LPs: []float64{-0.5}},
		{IDs: []int32{5}, Toks: []string{"a"}},
		{IDs: []int32{5}, LPs: []float64{-0.5}, Toks: []string{"a"}, TopLPs: [][]float64{{-1}}},
		{IDs: []int32{5}, LPs: []float64{-0.5}, Toks: []string{"a"}, TopLPs: [][]float64{{-1}}, TopToks: [][]string{{"a", "b"}}},
		{IDs: []int32{5}, LPs: []float64{-0.5}, Toks: []string{"a"}, TopLPs: [][]float64{{-1}, {-2}}, TopToks: [][]string{{"a"}, {"b"}}},
	} {
		if err := checkLogprobs(bad); !errors.Is(err, ipc.ErrProtocol) {
			t.Errorf("%+v: %v", bad, err)
		}
	}
}
