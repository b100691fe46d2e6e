package ipc

import (
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"reflect"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/vectors.json from the canonical messages")

// canonical is one message of every kind, with every field its kind uses set.
// testdata/vectors.json is generated from it (go test ./ipc -run Vectors -update).
func canonical() []struct {
	Name string
	Msg  Message
} {
	return []struct {
		Name string
		Msg  Message
	}{
		{"hello", Message{T: THello, V: 4, PID: 4242, Model: "/models/smollm2", Ctx: 8192, Vocab: 49152,
			EOS: []int32{2}, Caps: []string{"resume", "stop", "penalties", "logit_bias", "seed", "prompt_cache"},
			Versions:   map[string]string{"krserve_worker": "0.1.0", "mlx": "0.32.4", "mlx_lm": "0.32.2", "python": "3.11.7"},
			CacheBytes: 3 << 30}},
		{"gen", Message{T: TGen, ID: 7, Prompt: []int32{1, 9690, 198, 300, 70000}, MaxTokens: 64, Temperature: 0.7,
			TopP: 0.95, TopK: 40, MinP: 0.05, Seed: 1234, HasSeed: true, RepetitionPenalty: 1.1, PresencePenalty: 0.5,
			FrequencyPenalty: 0.25, LogitBias: map[int32]float64{2: -100, 17: 1.5}, Stop: []string{"\n\n", "User:"}}},
		{"gen_resume", Message{T: TGen, ID: 8, Prompt: []int32{1, 2, 3}, MaxTokens: 10, Resume: []int32{42, 43}, Sent: 5}},
		{"gen_logprobs", Message{T: TGen, ID: 12, Prompt: []int32{1, 2}, MaxTokens: 4, Logprobs: true, TopLogprobs: 2}},
		{"gen_greedy", Message{T: TGen, ID: 9, Prompt: []int32{5}, MaxTokens: 1}},
		{"cancel", Message{T: TCancel, ID: 7}},
		{"gen_text", Message{T: TGen, ID: 10, MaxTokens: 16, Text: "héllo wörld 🙂", Special: true}},
		{"gen_chat", Message{T: TGen, ID: 11, MaxTokens: 32, Temperature: 0.5, Stop: []string{"\n"},
			Messages: []ChatMessage{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "What is the capital of France?"}}}},
		{"gen_chat_resume", Message{T: TGen, ID: 13, MaxTokens: 30, Resume: []int32{504, 11}, Sent: 6,
			Messages: []ChatMessage{{Role: "user", Content: "Hi"}}}},
		{"gen_schema", Message{T: TGen, ID: 14, MaxTokens: 64, Messages: []ChatMessage{{Role: "user", Content: "A city as JSON"}},
			Schema: `{"type":"object","properties":{"name":{"type":"string"}},"required":["name"],"additionalProperties":false}`}},
		{"gen_tools", Message{T: TGen, ID: 15, MaxTokens: 128, Messages: []ChatMessage{
			{Role: "user", Content: "Weather in Paris?"},
			{Role: "assistant", ToolCalls: []ToolCall{{ID: "call_1", Name: "get_weather", Arguments: `{"city":"Paris"}`}}},
			{Role: "tool", Content: `{"temp":21}`, ToolCallID: "call_1"}},
			Tools:      `[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]`,
			ToolChoice: "function", ToolName: "get_weather", OneCall: true, Resume: []int32{504}, SentCalls: 1, SentArgs: 9}},
		{"ping", Message{T: TPing, Seq: 3}},
		{"shutdown", Message{T: TShutdown}},
		{"tok", Message{T: TTok, ID: 7, IDs: []int32{504, 11}, Text: "Paris é 🙂"}},
		{"tok_logprobs", Message{T: TTok, ID: 12, IDs: []int32{504, 11}, Text: "Paris é", LPs: []float64{-0.25, -1.5},
			Toks: []string{" Paris", " é"}, TopLPs: [][]float64{{-0.25, -2}, {-1.5, -1.75}}, TopToks: [][]string{{" Paris", " Lyon"}, {" é", "\ufffd"}}}},
		{"tok_held", Message{T: TTok, ID: 7, IDs: []int32{216}}},
		{"tok_calls", Message{T: TTok, ID: 15, IDs: []int32{29}, Calls: []ToolCall{{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}},
		{"tok_call_frags", Message{T: TTok, ID: 16, IDs: []int32{1521}, Calls: []ToolCall{{Index: 1, Arguments: `"}`}, {Index: 2, Name: "get_time", Arguments: ``}, {Index: 2, Arguments: `{"zone":"`}}}},
		{"done", Message{T: TDone, ID: 7, Reason: "stop", PToks: 5, CToks: 12, Text: "tail"}},
		{"done_cached", Message{T: TDone, ID: 14, Reason: "stop", PToks: 1500, CToks: 40, Cached: 1399}},
		{"done_length", Message{T: TDone, ID: 8, Reason: "length", PToks: 5, CToks: 10}},
		{"done_call_frag", Message{T: TDone, ID: 16, Reason: "stop", PToks: 120, CToks: 31, Calls: []ToolCall{{Index: 2, Arguments: `UTC"}`}}}},
		{"done_cut_call", Message{T: TDone, ID: 17, Reason: "stop", PToks: 120, CToks: 9, Calls: []ToolCall{{Arguments: `{"unit":"`}}, CutCall: true}},
		{"error", Message{T: TError, ID: 7, Code: "invalid", Msg: "top_p must be in [0, 1]"}},
		{"error_fatal", Message{T: TError, Code: "internal", Msg: "model failed to load"}},
		{"pong", Message{T: TPong, Seq: 3, Active: 4, MemActive: 123456789, MemPeak: 5000000000, RSS: 300000000,
			Cache: 1 << 31, Evicted: 17}},
	}
}

type vector struct {
	Name string `json:"name"`
	Hex  string `json:"hex"`
}

func TestVectors(t *testing.T) {
	const path = "testdata/vectors.json"
	if *update {
		var vs []vector
		for _, c := range canonical() {
			frame, err := AppendMessage(nil, &c.Msg)
			if err != nil {
				t.Fatal(err)
			}
			vs = append(vs, vector{c.Name, hex.EncodeToString(frame)})
		}
		b, _ := json.MarshalIndent(vs, "", "  ")
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(b, &vs); err != nil {
		t.Fatal(err)
	}
	want := canonical()
	if len(vs) != len(want) {
		t.Fatalf("%d vectors, want %d", len(vs), len(want))
	}
	for i, v := range vs {
		frame, err := hex.DecodeString(v.Hex)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		body, err := ReadFrame(bytesReader(frame), nil)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		var m Message
		if err := Decode(body, &m); err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if !reflect.DeepEqual(m, want[i].Msg) {
			t.Errorf("%s: decoded %+v, want %+v", v.Name, m, want[i].Msg)
		}
		again, err := AppendMessage(nil, &m)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(again) != v.Hex {
			t.Errorf("%s: re-encoded\n%x\nwant\n%s", v.Name, again, v.Hex)
		}
	}
}
