package api

import (
	"encoding/json"
	"testing"
	"unicode/utf8"
)

// marshalEvent is the reference: what serveStream wrote with encoding/json.
func marshalEvent(t testing.TB, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return "data: " + string(b) + "\n\n"
}

func refContent(chat bool, id string, created int64, model, text string) any {
	if chat {
		return chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, SystemFingerprint: "krserve",
			Choices: []chatChoice{{Index: 0, Delta: &chatOutMsg{Content: &text}}}}
	}
	return completionResponse{ID: id, Object: "text_completion", Created: created, Model: model, SystemFingerprint: "krserve",
		Choices: []completionChoice{{Index: 0, Text: text}}}
}

func refFinish(chat bool, id string, created int64, model, reason string) any {
	if chat {
		return chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, SystemFingerprint: "krserve",
			Choices: []chatChoice{{Index: 0, Delta: &chatOutMsg{}, FinishReason: &reason}}}
	}
	return completionResponse{ID: id, Object: "text_completion", Created: created, Model: model, SystemFingerprint: "krserve",
		Choices: []completionChoice{{Index: 0, FinishReason: &reason}}}
}

var sseTexts = []string{
	"", " tok", "Hello, world!", `quote " backslash \ slash /`, "tab\tnew\nline\rcr\bbs\fff",
	"\x00\x01\x1f\x7f", "<script>&amp;</script>", "héllo wörld", "日本語のテキスト", "emoji 😀👍🏽",
	"line sep \u2028 para sep \u2029", "bad utf8 \xff\xfe end", "truncated \xe6\x97", "\xed\xa0\x80 surrogate",
	"\u00ad\u200b\ufeff", "mixed <\u2028>&\"\\\n\xc3",
}

func TestChunkEncoderMatchesEncodingJSON(t *testing.T) {
	for _, chat := range []bool{true, false} {
		for _, model := range []string{"default", "/models/My <Model> & \"x\"", "模型"} {
			enc := newChunkEncoder(chat, "chatcmpl-1f", 1795822600, model)
			for _, text := range sseTexts {
				if got, want := string(enc.content(text)), marshalEvent(t, refContent(chat, "chatcmpl-1f", 1795822600, model, text)); got != want {
					t.Errorf("chat=%v model %q content %q:\n got %s\nwant %s", chat, model, text, got, want)
				}
			}
			for _, reason := range []string{"stop", "length"} {
				if got, want := string(enc.finish(reason)), marshalEvent(t, refFinish(chat, "chatcmpl-1f", 1795822600, model, reason)); got != want {
					t.Errorf("chat=%v finish %q:\n got %s\nwant %s", chat, reason, got, want)
				}
			}
			u := &usage{PromptTokens: 12, CompletionTokens: 345, TotalTokens: 357, PromptTokensDetails: promptDetails{CachedTokens: 11}}
			var ref any = completionResponse{ID: "chatcmpl-1f", Object: "text_completion", Created: 1795822600, Model: model, SystemFingerprint: "krserve", Choices: []completionChoice{}, Usage: u}
			if chat {
				ref = chatResponse{ID: "chatcmpl-1f", Object: "chat.completion.chunk", Created: 1795822600, Model: model, SystemFingerprint: "krserve", Choices: []chatChoice{}, Usage: u}
			}
			if got, want := string(enc.usage(12, 345, 11)), marshalEvent(t, ref); got != want {
				t.Errorf("chat=%v usage:\n got %s\nwant %s", chat, got, want)
			}
			if chat {
				empty := ""
				want := marshalEvent(t, chatResponse{ID: "chatcmpl-1f", Object: "chat.completion.chunk", Created: 1795822600, Model: model, SystemFingerprint: "krserve",
					Choices: []chatChoice{{Index: 0, Delta: &chatOutMsg{Role: "assistant", Content: &empty}}}})
				if got := string(enc.role()); got != want {
					t.Errorf("role chunk:\n got %s\nwant %s", got, want)
				}
			}
		}
	}
}

func FuzzChunkEncoder(f *testing.F) {
	for _, s := range sseTexts {
		f.Add(s, "default", true)
	}
	f.Fuzz(func(t *testing.T, text, model string, chat bool) {
		enc := newChunkEncoder(chat, "cmpl-7", 42, model)
		got := string(enc.content(text))
		if want := marshalEvent(t, refContent(chat, "cmpl-7", 42, model, text)); got != want {
			t.Fatalf("content %q model %q chat=%v:\n got %s\nwant %s", text, model, chat, got, want)
		}
		if !utf8.ValidString(got) {
			t.Fatalf("invalid UTF-8 in %q", got)
		}
	})
}

func BenchmarkChunkEncoder(b *testing.B) {
	text := " the"
	b.Run("hand", func(b *testing.B) {
		enc := newChunkEncoder(true, "chatcmpl-1f", 1795822600, "default")
		for b.Loop() {
			_ = enc.content(text)
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			_ = marshalEvent(b, refContent(true, "chatcmpl-1f", 1795822600, "default", text))
		}
	})
}
