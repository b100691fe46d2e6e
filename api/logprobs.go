package api

import (
	"encoding/json"
	"math"
	"unicode/utf8"

	"github.com/krserve/krserve/scheduler"
)

// maxTopLogprobs is the most alternatives per token a request may ask for
// (OpenAI's chat limit; the legacy completions limit of 5 is relaxed to it).
const maxTopLogprobs = 20

// chatLogprobsParams validates chat's logprobs (a boolean) and top_logprobs
// (0..20, only with logprobs: true).
func chatLogprobsParams(q *commonRequest, p *scheduler.Params) *apiError {
	on := false
	if !isNull(q.Logprobs) {
		if err := json.Unmarshal(q.Logprobs, &on); err != nil {
			return invalid("logprobs", "logprobs must be a boolean")
		}
	}
	top := 0
	if q.TopLogprobs != nil {
		top = *q.TopLogprobs
		if top < 0 || top > maxTopLogprobs {
			return invalid("top_logprobs", "top_logprobs must be between 0 and %d; got %d", maxTopLogprobs, top)
		}
		if top > 0 && !on {
			return invalid("top_logprobs", "top_logprobs requires logprobs: true")
		}
	}
	p.Logprobs, p.TopLogprobs = on, top
	return nil
}

// completionLogprobsParams validates the legacy completions logprobs: an
// integer n in 0..20 asks for each token's logprob and the n most likely
// alternatives; null (or false) is off.
func completionLogprobsParams(q *commonRequest, p *scheduler.Params) *apiError {
	if q.TopLogprobs != nil && *q.TopLogprobs != 0 {
		return invalid("top_logprobs", "top_logprobs is a chat completions parameter; completions take logprobs: <n>")
	}
	if isNull(q.Logprobs) || string(q.Logprobs) == "false" {
		return nil
	}
	var n int
	if err := json.Unmarshal(q.Logprobs, &n); err != nil {
		return invalid("logprobs", "logprobs must be an integer between 0 and %d", maxTopLogprobs)
	}
	if n < 0 || n > maxTopLogprobs {
		return invalid("logprobs", "logprobs must be between 0 and %d; got %d", maxTopLogprobs, n)
	}
	p.Logprobs, p.TopLogprobs = true, n
	return nil
}

// clampLogprob keeps a logprob JSON-encodable: -Inf (a masked token) and NaN
// become -9999, as OpenAI reports them.
func clampLogprob(x float64) float64 {
	if math.IsNaN(x) || x < -9999 {
		return -9999
	}
	return x
}

func tokenBytes(s string) []int {
	b := make([]int, len(s))
	for i := range len(s) {
		b[i] = int(s[i])
	}
	return b
}

// Chat shapes: choices[].logprobs = {"content": [...]}.

type chatLogprobs struct {
	Content []chatTokenLogprob `json:"content"`
}

type chatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float64          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []chatTopLogprob `json:"top_logprobs"`
}

type chatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

func (c *chatLogprobs) add(lps []scheduler.TokenLogprob) {
	for _, t := range lps {
		e := chatTokenLogprob{Token: t.Token, Logprob: clampLogprob(t.Logprob), Bytes: tokenBytes(t.Token), TopLogprobs: make([]chatTopLogprob, len(t.Top))}
		for i, a := range t.Top {
			e.TopLogprobs[i] = chatTopLogprob{Token: a.Token, Logprob: clampLogprob(a.Logprob), Bytes: tokenBytes(a.Token)}
		}
		c.Content = append(c.Content, e)
	}
}

// Completion shapes: choices[].logprobs = {"tokens", "token_logprobs",
// "top_logprobs", "text_offset"}.

type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

func newCompletionLogprobs() *completionLogprobs {
	return &completionLogprobs{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
}

// add appends lps; offset is the output's length in characters before them,
// and the length after them is returned.
func (c *completionLogprobs) add(lps []scheduler.TokenLogprob, offset int) int {
	for _, t := range lps {
		top := make(map[string]float64, len(t.Top))
		for _, a := range t.Top {
			if _, dup := top[a.Token]; !dup { // best first: keep the best of equal texts
				top[a.Token] = clampLogprob(a.Logprob)
			}
		}
		c.Tokens = append(c.Tokens, t.Token)
		c.TokenLogprobs = append(c.TokenLogprobs, clampLogprob(t.Logprob))
		c.TopLogprobs = append(c.TopLogprobs, top)
		c.TextOffset = append(c.TextOffset, offset)
		offset += utf8.RuneCountInString(t.Token)
	}
	return offset
}
