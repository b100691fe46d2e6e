package loadgen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// MultiTurnConfig describes a multi-turn chat run (issue 15's scenario, after
// vLLM's benchmarks/multi_turn): Conversations conversations of Turns turns
// each. Every conversation starts with the same system prompt (SystemWords
// words) and its own first message prefix (PrefixWords words); each turn adds
// a user message of UserWords words, and the model's streamed reply is fed
// back as the assistant message of the next turn. The text is generated
// offline from Seed: the same seed gives the same conversations. At most
// Concurrency conversations are in flight (each sends its turns one after
// another); the chat endpoint, greedy unless Temperature is set.
//
// ThinkTime, when set, is a user's pause between a reply and the next turn:
// uniform in [0, 2·ThinkTime), drawn from Seed per conversation and turn
// (thinkTimes). Without it each conversation's next turn follows its reply at
// once, so it reaches the server just as the worker that served the previous
// turn frees a slot: least-loaded routing then keeps conversations on their
// worker by accident, which real users, who read and type, do not give it.
type MultiTurnConfig struct {
	Config
	Conversations, Turns                int
	SystemWords, PrefixWords, UserWords int
	Seed                                uint64
	ThinkTime                           time.Duration
}

// TurnRecord is one request of a multi-turn run.
type TurnRecord struct {
	Conversation int `json:"conversation"`
	Turn         int `json:"turn"` // from 1
	Record
}

// TurnSummary aggregates the requests of one turn number.
type TurnSummary struct {
	Turn         int     `json:"turn"`
	Requests     int     `json:"requests"`
	Errors       int     `json:"errors"`
	TTFTMS       Summary `json:"ttft_ms"`
	TTFTP90MS    float64 `json:"ttft_p90_ms"`
	PromptTokens int     `json:"prompt_tokens"` // summed over the turn's requests
	CachedTokens int     `json:"cached_tokens"`
	// PrevTokens: prompt + completion tokens of the same conversations'
	// previous turn (what a prompt cache could hold), summed.
	PrevTokens int `json:"prev_tokens,omitempty"`
}

// MultiTurnResult is the outcome of RunMultiTurn.
type MultiTurnResult struct {
	Schema  string        `json:"schema"`
	Name    string        `json:"name,omitempty"`
	Config  MultiTurnInfo `json:"config"`
	WallMS  float64       `json:"wall_ms"`
	Tokens  int           `json:"completion_tokens"`
	TokPerS float64       `json:"tok_per_s"`
	Turns   []TurnSummary `json:"turns"`
	Records []TurnRecord  `json:"records"`
}

// MultiTurnInfo records how a MultiTurnResult was produced.
type MultiTurnInfo struct {
	URL           string  `json:"url"`
	Model         string  `json:"model"`
	Conversations int     `json:"conversations"`
	Turns         int     `json:"turns"`
	Concurrency   int     `json:"concurrency"`
	Words         [3]int  `json:"system_prefix_user_words"`
	MaxTokens     int     `json:"max_tokens"`
	Temperature   float64 `json:"temperature"`
	Seed          uint64  `json:"seed"`
	ThinkTimeMS   float64 `json:"think_time_ms,omitempty"`
}

// MultiTurnSchema names the JSON layout of MultiTurnResult.
const MultiTurnSchema = "krserve-bench-multiturn/1"

// words is the vocabulary of the generated text: common English words, so a
// real tokenizer sees ordinary text (about 1.3 tokens a word).
var words = strings.Fields(`the of and to in is was for that with as on by at from his her are which
be this had not but have one were they you all she there their an been has more when will would who
so no out if up what about into than them can only other new some time could these two may first then
do any like my now over such our man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three small
large city river mountain garden house window market letter question answer number system water light
story music table paper country morning evening summer winter north south east west doctor teacher
student engineer model server request memory cache token prompt reply message turn history`)

// conversations generates the text of every conversation, from cfg.Seed.
func conversations(cfg *MultiTurnConfig) (system string, prefixes []string, users [][]string) {
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x6b72736572766531))
	text := func(n int) string {
		ws := make([]string, n)
		for i := range ws {
			ws[i] = words[rng.IntN(len(words))]
		}
		return strings.Join(ws, " ")
	}
	system = "You are a helpful assistant. " + text(cfg.SystemWords)
	prefixes = make([]string, cfg.Conversations)
	users = make([][]string, cfg.Conversations)
	for c := range prefixes {
		prefixes[c] = fmt.Sprintf("Conversation %d. Context: %s", c, text(cfg.PrefixWords))
		users[c] = make([]string, cfg.Turns)
		for t := range users[c] {
			users[c][t] = text(cfg.UserWords) + "?"
		}
	}
	return system, prefixes, users
}

// thinkTimes gives each conversation's pause before each of its turns
// (none before the first): uniform in [0, 2·mean), from seed alone, so runs
// of the same seed pause alike whatever the server does.
func thinkTimes(seed uint64, convs, turns int, mean time.Duration) [][]time.Duration {
	out := make([][]time.Duration, convs)
	if mean <= 0 {
		return out
	}
	rng := rand.New(rand.NewPCG(seed, 0x7468696e6b696e67))
	for c := range out {
		out[c] = make([]time.Duration, turns)
		for t := 1; t < turns; t++ {
			out[c][t] = time.Duration(rng.Int64N(int64(2 * mean)))
		}
	}
	return out
}

// RunMultiTurn runs the multi-turn scenario. A failed turn ends its
// conversation (the next turn would need its reply).
func RunMultiTurn(ctx context.Context, cfg MultiTurnConfig) (*MultiTurnResult, error) {
	if cfg.URL == "" {
		return nil, errors.New("loadgen: URL is empty")
	}
	if cfg.Conversations < 1 || cfg.Turns < 1 || cfg.SystemWords < 0 || cfg.PrefixWords < 0 || cfg.UserWords < 1 {
		return nil, errors.New("loadgen: multi-turn needs conversations, turns and user words >= 1")
	}
	if cfg.Concurrency <= 0 || cfg.Concurrency > cfg.Conversations {
		cfg.Concurrency = cfg.Conversations
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	cfg.Chat = true
	cfg.Prompts = []string{""} // doRequest's record index; the messages are given
	client := cfg.client
	if client == nil {
		client = &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConns: cfg.Concurrency,
			MaxIdleConnsPerHost: cfg.Concurrency, DisableCompression: true, IdleConnTimeout: 90 * time.Second}}
		defer client.CloseIdleConnections()
	}
	endpoint := endpointURL(cfg.URL, true)
	system, prefixes, users := conversations(&cfg)
	think := thinkTimes(cfg.Seed, cfg.Conversations, cfg.Turns, cfg.ThinkTime)

	res := &MultiTurnResult{Schema: MultiTurnSchema, Config: MultiTurnInfo{
		URL: cfg.URL, Model: cfg.Model, Conversations: cfg.Conversations, Turns: cfg.Turns,
		Concurrency: cfg.Concurrency, Words: [3]int{cfg.SystemWords, cfg.PrefixWords, cfg.UserWords},
		MaxTokens: cfg.MaxTokens, Temperature: cfg.Temperature, Seed: cfg.Seed,
		ThinkTimeMS: ms(cfg.ThinkTime),
	}}
	recs := make([][]TurnRecord, cfg.Conversations)
	start := cfg.now()
	prog := newProgress(cfg.Progress, cfg.Conversations*cfg.Turns, cfg.now)
	prog.start(start)
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range jobs {
				msgs := []map[string]string{{"role": "system", "content": system}}
				for t := range cfg.Turns {
					if think[c] != nil && think[c][t] > 0 && !pause(ctx, think[c][t]) {
						break
					}
					content := users[c][t]
					if t == 0 {
						content = prefixes[c] + "\n\n" + content
					}
					msgs = append(msgs, map[string]string{"role": "user", "content": content})
					var reply strings.Builder
					rec := doRequest(ctx, client, endpoint, &cfg.Config, c*cfg.Turns+t, start, prog, msgs, &reply)
					prog.finish(rec)
					recs[c] = append(recs[c], TurnRecord{Conversation: c, Turn: t + 1, Record: rec})
					if !rec.OK() {
						break
					}
					msgs = append(msgs, map[string]string{"role": "assistant", "content": reply.String()})
				}
			}
		}()
	}
dispatch:
	for c := range cfg.Conversations {
		select {
		case jobs <- c:
		case <-ctx.Done():
			break dispatch
		}
	}
	close(jobs)
	wg.Wait()
	prog.stop()
	res.WallMS = ms(cfg.now().Sub(start))
	for _, rs := range recs {
		res.Records = append(res.Records, rs...)
	}
	res.finalize(cfg.Turns)
	return res, ctx.Err()
}

// pause waits d, or until ctx ends (false).
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (r *MultiTurnResult) finalize(turns int) {
	r.Turns = make([]TurnSummary, turns)
	ttft := make([][]float64, turns)
	prev := map[int]int{} // conversation -> prompt + completion tokens of its last turn
	r.Tokens = 0
	for _, rec := range r.Records { // conversations in order, turns in order
		s := &r.Turns[rec.Turn-1]
		s.Turn = rec.Turn
		s.Requests++
		if !rec.OK() {
			s.Errors++
			delete(prev, rec.Conversation)
			continue
		}
		r.Tokens += rec.Tokens
		ttft[rec.Turn-1] = append(ttft[rec.Turn-1], rec.TTFTMS)
		s.PromptTokens += rec.PromptTokens
		s.CachedTokens += rec.CachedTokens
		if p, ok := prev[rec.Conversation]; ok && rec.Turn > 1 {
			s.PrevTokens += p
		}
		prev[rec.Conversation] = rec.PromptTokens + rec.Tokens
	}
	for i := range r.Turns {
		r.Turns[i].Turn = i + 1
		r.Turns[i].TTFTMS = Summarize(ttft[i])
		r.Turns[i].TTFTP90MS = Percentile(ttft[i], 90)
	}
	if r.WallMS > 0 {
		r.TokPerS = float64(r.Tokens) / (r.WallMS / 1000)
	}
}

// WriteTable prints TTFT P50/P90 and prompt cache use per turn number.
func (r *MultiTurnResult) WriteTable(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "multi-turn: %d conversations x %d turns, %d at once, words system/prefix/user %d/%d/%d, max_tokens %d, seed %d\n",
		c.Conversations, c.Turns, c.Concurrency, c.Words[0], c.Words[1], c.Words[2], c.MaxTokens, c.Seed)
	if c.ThinkTimeMS > 0 {
		fmt.Fprintf(w, "think time: mean %.0f ms before each next turn\n", c.ThinkTimeMS)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "turn\trequests\terrors\tTTFT P50 ms\tTTFT P90 ms\tprompt tok\tcached tok\tcached/prompt\tcached/prev turn\t")
	for _, t := range r.Turns {
		ratio := func(a, b int) string {
			if b == 0 {
				return "-"
			}
			return fmt.Sprintf("%.1f%%", 100*float64(a)/float64(b))
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%.0f\t%.0f\t%d\t%d\t%s\t%s\t\n", t.Turn, t.Requests, t.Errors, t.TTFTMS.Median, t.TTFTP90MS,
			t.PromptTokens, t.CachedTokens, ratio(t.CachedTokens, t.PromptTokens), ratio(t.CachedTokens, t.PrevTokens))
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "wall %.1f s, %d completion tokens, %.1f tok/s\n", r.WallMS/1000, r.Tokens, r.TokPerS)
}

// WriteJSON writes r to path.
func (r *MultiTurnResult) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
