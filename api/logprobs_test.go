package api

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"
)

// The fake worker's tokens are "w0 ", "w1 ", ... with logprob fakeLogprob(i)
// and alternatives alt1, alt2, ... (addFakeLogprobs).

func wantChatContent(n, top int) []map[string]any {
	var out []map[string]any
	for i := range n {
		tok := fmt.Sprintf("w%d ", i)
		tops := []any{}
		for k := range top {
			t := tok
			if k > 0 {
				t = fmt.Sprintf("alt%d", k)
			}
			tops = append(tops, map[string]any{"token": t, "logprob": fakeLogprob(i) - float64(k), "bytes": bytesJSON(t)})
		}
		out = append(out, map[string]any{"token": tok, "logprob": fakeLogprob(i), "bytes": bytesJSON(tok), "top_logprobs": tops})
	}
	return out
}

func bytesJSON(s string) []any {
	out := []any{}
	for i := range len(s) {
		out = append(out, float64(s[i]))
	}
	return out
}

func TestChatLogprobs(t *testing.T) {
	h := newHarness(t)
	for _, top := range []int{0, 3} {
		t.Run(fmt.Sprint("top=", top), func(t *testing.T) {
			resp, b := h.do("POST", chatPath, chatJSON(fmt.Sprintf(`,"max_tokens":10,"logprobs":true,"top_logprobs":%d`, top)))
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			var r struct {
				Choices []struct {
					Message  struct{ Content string } `json:"message"`
					Logprobs struct {
						Content []map[string]any `json:"content"`
					} `json:"logprobs"`
				} `json:"choices"`
			}
			if err := json.Unmarshal(b, &r); err != nil {
				t.Fatal(err)
			}
			if got, want := r.Choices[0].Logprobs.Content, wantChatContent(3, top); !reflect.DeepEqual(got, want) {
				t.Fatalf("logprobs.content\n%v\nwant\n%v", got, want)
			}
		})
	}
	// Not asked: logprobs stays null.
	_, b := h.do("POST", chatPath, chatJSON(`,"logprobs":false`))
	if r := decodeResponse(t, b); string(r.Choices[0].Logprobs) != "null" {
		t.Fatalf("logprobs %s", r.Choices[0].Logprobs)
	}
}

func TestChatLogprobsStream(t *testing.T) {
	h := newHarness(t)
	resp := h.streamRequest(t, context.Background(), chatPath, chatJSON(`,"stream":true,"max_tokens":10,"logprobs":true,"top_logprobs":2`))
	defer resp.Body.Close()
	data, _, err := newSSEReader(t, resp.Body).readAll()
	if err != nil {
		t.Fatal(err)
	}
	var content []map[string]any
	for _, d := range data {
		if d == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Delta    struct{ Content *string } `json:"delta"`
				Logprobs *struct {
					Content []map[string]any `json:"content"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatal(err)
		}
		for _, ch := range c.Choices {
			if ch.Logprobs == nil {
				continue
			}
			// Each chunk carries the logprobs of the tokens of its text.
			text := ""
			for _, e := range ch.Logprobs.Content {
				text += e["token"].(string)
			}
			if ch.Delta.Content == nil || *ch.Delta.Content != text {
				t.Fatalf("chunk text %v, logprobs of %q", ch.Delta.Content, text)
			}
			content = append(content, ch.Logprobs.Content...)
		}
	}
	if want := wantChatContent(3, 2); !reflect.DeepEqual(content, want) {
		t.Fatalf("streamed logprobs\n%v\nwant\n%v", content, want)
	}
}

type completionLogprobsJSON struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

func wantCompletionLogprobs(n, top int) completionLogprobsJSON {
	w := completionLogprobsJSON{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	off := 0
	for i := range n {
		tok := fmt.Sprintf("w%d ", i)
		m := map[string]float64{}
		for k := range top {
			t := tok
			if k > 0 {
				t = fmt.Sprintf("alt%d", k)
			}
			m[t] = fakeLogprob(i) - float64(k)
		}
		w.Tokens = append(w.Tokens, tok)
		w.TokenLogprobs = append(w.TokenLogprobs, fakeLogprob(i))
		w.TopLogprobs = append(w.TopLogprobs, m)
		w.TextOffset = append(w.TextOffset, off)
		off += len(tok)
	}
	return w
}

func TestCompletionLogprobs(t *testing.T) {
	h := newHarness(t)
	for _, top := range []int{0, 2} {
		t.Run(fmt.Sprint("logprobs=", top), func(t *testing.T) {
			resp, b := h.do("POST", cmplPath, cmplJSON(fmt.Sprintf(`,"max_tokens":10,"logprobs":%d`, top)))
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			var r struct {
				Choices []struct {
					Text     string                 `json:"text"`
					Logprobs completionLogprobsJSON `json:"logprobs"`
				} `json:"choices"`
			}
			if err := json.Unmarshal(b, &r); err != nil {
				t.Fatal(err)
			}
			if got, want := r.Choices[0].Logprobs, wantCompletionLogprobs(3, top); !reflect.DeepEqual(got, want) {
				t.Fatalf("logprobs\n%+v\nwant\n%+v", got, want)
			}
		})
	}
	// Streamed: the chunks' lists concatenate to the same, offsets continuing.
	resp := h.streamRequest(t, context.Background(), cmplPath, cmplJSON(`,"stream":true,"max_tokens":10,"logprobs":2`))
	defer resp.Body.Close()
	data, _, err := newSSEReader(t, resp.Body).readAll()
	if err != nil {
		t.Fatal(err)
	}
	got := completionLogprobsJSON{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for _, d := range data {
		if d == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Logprobs *completionLogprobsJSON `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatal(err)
		}
		for _, ch := range c.Choices {
			if l := ch.Logprobs; l != nil {
				got.Tokens = append(got.Tokens, l.Tokens...)
				got.TokenLogprobs = append(got.TokenLogprobs, l.TokenLogprobs...)
				got.TopLogprobs = append(got.TopLogprobs, l.TopLogprobs...)
				got.TextOffset = append(got.TextOffset, l.TextOffset...)
			}
		}
	}
	if want := wantCompletionLogprobs(3, 2); !reflect.DeepEqual(got, want) {
		t.Fatalf("streamed logprobs\n%+v\nwant\n%+v", got, want)
	}
}
