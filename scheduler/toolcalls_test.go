package scheduler

import (
	"errors"
	"slices"
	"testing"
	"testing/synctest"

	"github.com/krserve/krserve/ipc"
)

func frag(i int, args string) ipc.ToolCall { return ipc.ToolCall{Index: i, Arguments: args} }

func head(i int, name, args string) ipc.ToolCall {
	return ipc.ToolCall{Index: i, Name: name, Arguments: args}
}

// A call streamed in fragments and cut by a crash: the resume gen says how
// many calls were begun and how many bytes of the last one's arguments went
// out, so the next worker sends exactly the rest; the events carry every
// entry in order.
func TestToolCallFragmentsResume(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, 2, func(c *Config) { c.MaxCrashes = 3 })
		h.nextID++
		r := NewInputRequest(h.nextID, Input{Messages: []ipc.ChatMessage{{Role: "user", Content: "Weather?"}},
			Tools: `[{"type":"function","function":{"name":"w"}}]`, ToolChoice: "required"}, Params{MaxTokens: 32})
		h.mustSubmit(r)
		h.addWorker(1)
		h.deliver(1, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{1}, Calls: []ipc.ToolCall{head(0, "w", `{"city":"Pa`), frag(0, `ris"}`)}})
		h.deliver(1, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{2}, Calls: []ipc.ToolCall{head(1, "w", "")}})
		h.deliver(1, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{3}, Calls: []ipc.ToolCall{frag(1, `{"city":"Lyé`)}})
		h.crash(1)
		w2 := h.addWorker(2)
		g := w2.gens()
		if len(g) != 1 || !slices.Equal(g[0].Resume, []int32{1, 2, 3}) || g[0].SentCalls != 2 || g[0].SentArgs != len(`{"city":"Lyé`) {
			t.Fatalf("resumed gen %+v", g)
		}
		// The new worker continues call 1 and begins call 2.
		h.deliver(2, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{4}, Calls: []ipc.ToolCall{frag(1, `on"}`), head(2, "w", `{}`)}})
		h.deliver(2, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "stop", PToks: 10, CToks: 2})
		var got []ipc.ToolCall
		for _, e := range events(r) {
			got = append(got, e.Calls...)
			if e.Done && (e.Err != nil || e.FinishReason != "stop") {
				t.Fatalf("done %+v", e)
			}
		}
		want := []ipc.ToolCall{head(0, "w", `{"city":"Pa`), frag(0, `ris"}`), head(1, "w", ""), frag(1, `{"city":"Lyé`), frag(1, `on"}`), head(2, "w", `{}`)}
		if !slices.Equal(got, want) {
			t.Errorf("entries %+v\nwant %+v", got, want)
		}
	})
}

// Entries out of order would corrupt the calls the client assembles by
// index: each is a protocol error, in a tok or a done.
func TestToolCallEntriesOutOfOrder(t *testing.T) {
	cases := []struct {
		name  string
		calls []ipc.ToolCall
	}{
		{"fragment before any call", []ipc.ToolCall{frag(0, "{")}},
		{"call skips an index", []ipc.ToolCall{head(1, "w", "")}},
		{"call repeats an index", []ipc.ToolCall{head(0, "w", ""), head(0, "w", "")}},
		{"fragment of an earlier call", []ipc.ToolCall{head(0, "w", ""), head(1, "w", ""), frag(0, "}")}},
		{"fragment of a later call", []ipc.ToolCall{head(0, "w", ""), frag(1, "}")}},
		{"negative index", []ipc.ToolCall{head(-1, "w", "")}},
	}
	for _, typ := range []string{ipc.TTok, ipc.TDone} {
		for _, c := range cases {
			synctest.Test(t, func(t *testing.T) {
				h := newHarness(t, 2, nil)
				h.addWorker(1)
				r := h.submit()
				err := h.s.Deliver(1, &ipc.Message{T: typ, ID: r.ID, IDs: []int32{1}, Reason: "stop", Calls: c.calls})
				if !errors.Is(err, ipc.ErrProtocol) {
					t.Errorf("%s in a %s: Deliver = %v, want ErrProtocol", c.name, typ, err)
				}
				synctest.Wait()
				if evs := events(r); len(evs) != 0 {
					t.Errorf("%s in a %s: events %+v", c.name, typ, evs)
				}
			})
		}
	}
}

// A call cut short (a stop string inside its arguments) after a resume: the
// done of the worker that finished the request, which replayed the whole
// output, says so, and the terminal event carries it; a done without
// cut_call (a worker of before) leaves it false.
func TestCutCallAfterResume(t *testing.T) {
	for _, cut := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			h := newHarness(t, 2, func(c *Config) { c.MaxCrashes = 3 })
			h.nextID++
			r := NewInputRequest(h.nextID, Input{Messages: []ipc.ChatMessage{{Role: "user", Content: "Unit?"}},
				Tools: `[{"type":"function","function":{"name":"u"}}]`, ToolChoice: "required"}, Params{MaxTokens: 32, Stop: []string{"celsius"}})
			h.mustSubmit(r)
			h.addWorker(1)
			h.deliver(1, &ipc.Message{T: ipc.TTok, ID: r.ID, IDs: []int32{1}, Calls: []ipc.ToolCall{head(0, "u", `{"un`)}})
			h.crash(1)
			h.addWorker(2)
			h.deliver(2, &ipc.Message{T: ipc.TDone, ID: r.ID, Reason: "stop", PToks: 10, CToks: 2,
				Calls: []ipc.ToolCall{frag(0, `it":"`)}, CutCall: cut})
			evs := events(r)
			last := evs[len(evs)-1]
			if !last.Done || last.Err != nil || last.FinishReason != "stop" || last.CutCall != cut {
				t.Fatalf("cut %v: done %+v", cut, last)
			}
		})
	}
}
