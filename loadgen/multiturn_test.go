package loadgen

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestConversationsAreSeeded(t *testing.T) {
	cfg := MultiTurnConfig{Conversations: 3, Turns: 2, SystemWords: 50, PrefixWords: 20, UserWords: 10, Seed: 7}
	s1, p1, u1 := conversations(&cfg)
	s2, p2, u2 := conversations(&cfg)
	if s1 != s2 || fmt.Sprint(p1, u1) != fmt.Sprint(p2, u2) {
		t.Fatal("same seed, different conversations")
	}
	if n := len(strings.Fields(u1[0][0])); n != 10 {
		t.Errorf("user turn of %d words, want 10", n)
	}
	if p1[0] == p1[1] || u1[0][0] == u1[1][0] {
		t.Error("conversations share their prefix or turns")
	}
	cfg.Seed = 8
	if s3, _, _ := conversations(&cfg); s3 == s1 {
		t.Error("another seed, the same system prompt")
	}
}

// TestThinkTimes: pauses come from the seed alone, none before a first turn,
// each in [0, 2·mean), and they differ between conversations and turns.
func TestThinkTimes(t *testing.T) {
	mean := 500 * time.Millisecond
	a, b := thinkTimes(3, 4, 5, mean), thinkTimes(3, 4, 5, mean)
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatal("same seed, different pauses")
	}
	if fmt.Sprint(a) == fmt.Sprint(thinkTimes(4, 4, 5, mean)) {
		t.Error("another seed, the same pauses")
	}
	seen := map[time.Duration]bool{}
	for c, ts := range a {
		if ts[0] != 0 {
			t.Errorf("conversation %d pauses %s before its first turn", c, ts[0])
		}
		for _, d := range ts[1:] {
			if d < 0 || d >= 2*mean {
				t.Errorf("pause %s outside [0, %s)", d, 2*mean)
			}
			seen[d] = true
		}
	}
	if len(seen) < 12 {
		t.Errorf("%d distinct pauses in 16, want them drawn apart", len(seen))
	}
	if got := thinkTimes(3, 4, 5, 0); got[0] != nil {
		t.Error("no think time, yet pauses")
	}
}

// TestRunMultiTurn: every turn resends the conversation with the previous
// replies, and the per-turn table adds up the server's usage.
func TestRunMultiTurn(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]bool{} // every prompt so far, joined
	var bad []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Messages []map[string]string `json:"messages"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		turn := len(req.Messages) / 2 // system, then user/assistant pairs, then user
		var parts []string
		for i, m := range req.Messages {
			parts = append(parts, m["content"])
			if m["role"] == "assistant" && m["content"] != fmt.Sprintf("reply %d", (i+1)/2) {
				mu.Lock()
				bad = append(bad, m["content"])
				mu.Unlock()
			}
		}
		// A "token" is a message here; cached: the previous turn's prompt and reply.
		prompt, cached := len(parts), 0
		mu.Lock()
		if seen[strings.Join(parts[:len(parts)-1], "\x00")] {
			cached = len(parts) - 1
		}
		seen[strings.Join(parts, "\x00")+"\x00"+fmt.Sprintf("reply %d", turn)] = true
		mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "data: %s\n\n", content(fmt.Sprintf("reply %d", turn)))
		fmt.Fprintf(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":1,\"prompt_tokens_details\":{\"cached_tokens\":%d}}}\n\n", prompt, cached)
		fmt.Fprint(w, "data: [DONE]\n\n")
	}))
	defer srv.Close()
	res, err := RunMultiTurn(context.Background(), MultiTurnConfig{
		Config:        Config{URL: srv.URL, Model: "m", Concurrency: 2, MaxTokens: 8},
		Conversations: 3, Turns: 3, SystemWords: 5, PrefixWords: 3, UserWords: 4, Seed: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(bad) > 0 {
		t.Errorf("replies not fed back: %q", bad)
	}
	if len(res.Records) != 9 || len(res.Turns) != 3 {
		t.Fatalf("%d records, %d turns", len(res.Records), len(res.Turns))
	}
	for i, s := range res.Turns {
		prompt := 3 * (2 + 2*i) // system + user, plus an assistant and a user per earlier turn
		want := TurnSummary{Turn: i + 1, Requests: 3, PromptTokens: prompt}
		if i > 0 {
			want.CachedTokens, want.PrevTokens = prompt-3, 3*(2*i+1) // the previous prompt + its 1-token reply
		}
		if s.Turn != want.Turn || s.Requests != want.Requests || s.Errors != 0 || s.PromptTokens != want.PromptTokens ||
			s.CachedTokens != want.CachedTokens || s.PrevTokens != want.PrevTokens || s.TTFTMS.N != 3 {
			t.Errorf("turn %d: %+v, want %+v", i+1, s, want)
		}
	}
	var b strings.Builder
	res.WriteTable(&b)
	if !strings.Contains(b.String(), "cached/prev turn") {
		t.Errorf("table:\n%s", b.String())
	}
}
