// Package loadgen is a closed-loop load generator for OpenAI-compatible
// streaming servers (krserve, mlx_lm.server, ...).
//
// Run sends Config.Requests streamed completions with at most
// Config.Concurrency in flight, and measures per request:
//
//   - TTFT: from just before the request is sent to the first SSE chunk that
//     carries content (delta.content / delta.reasoning / text / tool_calls);
//     role-only chunks and keep-alive comments do not count;
//   - end-to-end time: from send to "data: [DONE]" (or end of body);
//   - completion tokens: usage.completion_tokens from the final usage chunk
//     (stream_options.include_usage), else the number of content chunks;
//   - tok/s = tokens / end-to-end time (TTFT included, as in kr-serve-mlx's
//     50-questions benchmark);
//   - inter-token gaps: time between consecutive content chunks. A chunk may
//     carry more than one token (servers hold back partial UTF-8), so this is
//     the gap a client sees, not a per-token decode time.
//
// Prompts are used round-robin: request i gets Prompts[i%len(Prompts)].
package loadgen

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// SchemaVersion names the JSON layout of Result. scripts/bench/inprocess.py
// writes the same schema.
const SchemaVersion = "krserve-bench/1"

// Config describes one load run.
type Config struct {
	// URL is the server's base URL, e.g. http://127.0.0.1:8080 (a trailing
	// "/v1" is accepted too).
	URL string
	// Model is sent as the request's "model".
	Model string
	// Concurrency is the number of clients, each with at most one request in
	// flight (default 1).
	Concurrency int
	// Requests is the total number of requests (default len(Prompts)).
	Requests int
	// MaxTokens is sent as max_tokens (omitted when 0).
	MaxTokens int
	// Temperature is sent as temperature (always sent, 0 = greedy).
	Temperature float64
	// Seed is sent as seed when not nil. Note: mlx_lm.server does not batch
	// requests that carry a seed.
	Seed *int
	// Prompts are the user messages (Chat) or raw prompts (!Chat).
	Prompts []string
	// Chat selects /v1/chat/completions; otherwise /v1/completions.
	Chat bool
	// Timeout bounds each request (0: no limit beyond ctx).
	Timeout time.Duration
	// IgnoreEOS sends "ignore_eos": true (a krserve extension).
	IgnoreEOS bool
	// ResponseFormat, when set, is sent as response_format (a JSON object:
	// structured output, e.g. to measure what a grammar costs).
	ResponseFormat json.RawMessage
	// Progress, when not nil, receives a one-line progress bar redrawn with
	// '\r'.
	Progress io.Writer

	// Test hooks (nil in normal use).
	now     func() time.Time // clock; time.Now when nil
	onEvent func(req int)    // called after each SSE data event is handled
	client  *http.Client
	// ServerCPU reads the server's process_cpu_seconds_total from /metrics
	// before and after the run (Result.ServerCPUS).
	ServerCPU bool
}

// Record is the measurement of one request. Times are milliseconds.
type Record struct {
	Index        int       `json:"index"`
	Prompt       int       `json:"prompt"`   // index into the prompt list
	StartMS      float64   `json:"start_ms"` // send time, relative to the run's start
	TTFTMS       float64   `json:"ttft_ms"`  // 0 when no content arrived
	E2EMS        float64   `json:"e2e_ms"`
	Tokens       int       `json:"tokens"`
	PromptTokens int       `json:"prompt_tokens,omitempty"`
	CachedTokens int       `json:"cached_tokens,omitempty"` // usage.prompt_tokens_details.cached_tokens
	TokensSource string    `json:"tokens_source,omitempty"` // "usage" or "chunks"
	Chunks       int       `json:"chunks"`                  // content chunks
	TokPerS      float64   `json:"tok_per_s"`
	FinishReason string    `json:"finish_reason,omitempty"`
	GapsMS       []float64 `json:"itl_ms,omitempty"` // inter-chunk gaps
	Status       int       `json:"status,omitempty"` // HTTP status (0: no response)
	Error        string    `json:"error,omitempty"`
	// ErrorKind classifies Error: "http" (non-200 status), "transport"
	// (no response), "stream" (bad or truncated stream, or an error chunk),
	// "timeout" (Config.Timeout hit) or "canceled" (the run's ctx ended).
	ErrorKind string `json:"error_kind,omitempty"`
}

// OK reports whether the request succeeded.
func (r *Record) OK() bool { return r.Error == "" }

// RunInfo records how a Result was produced.
type RunInfo struct {
	Engine      string  `json:"engine"` // "http" (loadgen) or "inprocess"
	URL         string  `json:"url,omitempty"`
	Endpoint    string  `json:"endpoint,omitempty"`
	Model       string  `json:"model"`
	Chat        bool    `json:"chat"`
	Concurrency int     `json:"concurrency"`
	Requests    int     `json:"requests"`
	MaxTokens   int     `json:"max_tokens"`
	Temperature float64 `json:"temperature"`
	Seed        *int    `json:"seed,omitempty"`
	IgnoreEOS   bool    `json:"ignore_eos"`
	// ResponseFormat is the response_format sent, if any.
	ResponseFormat json.RawMessage `json:"response_format,omitempty"`
	Prompts        int             `json:"prompts"`
}

// Result is the outcome of a run. It is the JSON schema shared with
// scripts/bench/inprocess.py (SchemaVersion). Summaries cover successful
// requests only; the inter-token gap summary pools the gaps of all of them.
type Result struct {
	Schema    string    `json:"schema"`
	Name      string    `json:"name,omitempty"` // label for tables
	Run       RunInfo   `json:"run"`
	StartedAt time.Time `json:"started_at"`

	WallMS         float64        `json:"wall_ms"` // first send to last finish
	Completed      int            `json:"completed"`
	Errors         int            `json:"errors"`
	ErrorsByStatus map[string]int `json:"errors_by_status,omitempty"` // "429", "500", "transport", "stream", ...
	TotalTokens    int            `json:"total_tokens"`
	TokPerS        float64        `json:"tok_per_s"` // aggregate: TotalTokens / wall
	ReqPerS        float64        `json:"req_per_s"` // Completed / wall

	ResponseMS Summary `json:"response_ms"`
	TTFTMS     Summary `json:"ttft_ms"`
	ReqTokPerS Summary `json:"request_tok_per_s"`
	ITLMS      Summary `json:"itl_ms"`

	// The server's own CPU over the run (its process_cpu_seconds_total, read
	// from /metrics before and after; krserve's supervisor exports it, worker
	// processes excluded). Zero when the server does not export it.
	ServerCPUS        float64 `json:"server_cpu_s,omitempty"`
	ServerCPUUSPerReq float64 `json:"server_cpu_us_per_request,omitempty"`

	Records []Record `json:"records"`
}

// Run executes the load described by cfg. On cancellation of ctx it stops
// dispatching, waits for in-flight requests to end, and returns the partial
// Result together with ctx's error.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.URL == "" {
		return nil, errors.New("loadgen: URL is empty")
	}
	if len(cfg.Prompts) == 0 {
		return nil, errors.New("loadgen: no prompts")
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.Requests <= 0 {
		cfg.Requests = len(cfg.Prompts)
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	client := cfg.client
	if client == nil {
		client = &http.Client{Transport: &http.Transport{
			Proxy:               nil, // load only goes where it is told
			MaxIdleConns:        cfg.Concurrency,
			MaxIdleConnsPerHost: cfg.Concurrency,
			DisableCompression:  true, // compression would buffer the stream
			IdleConnTimeout:     90 * time.Second,
		}}
		defer client.CloseIdleConnections()
	}
	endpoint := endpointURL(cfg.URL, cfg.Chat)

	res := &Result{
		Schema: SchemaVersion,
		Run: RunInfo{
			Engine:         "http",
			URL:            cfg.URL,
			Endpoint:       endpoint,
			Model:          cfg.Model,
			Chat:           cfg.Chat,
			Concurrency:    cfg.Concurrency,
			Requests:       cfg.Requests,
			MaxTokens:      cfg.MaxTokens,
			Temperature:    cfg.Temperature,
			Seed:           cfg.Seed,
			IgnoreEOS:      cfg.IgnoreEOS,
			ResponseFormat: cfg.ResponseFormat,
			Prompts:        len(cfg.Prompts),
		},
		Records: make([]Record, cfg.Requests),
	}

	var cpu0 float64
	cpuOK := false
	if cfg.ServerCPU {
		cpu0, cpuOK = serverCPU(ctx, client, cfg.URL)
	}
	prog := newProgress(cfg.Progress, cfg.Requests, cfg.now)
	start := cfg.now()
	res.StartedAt = start
	prog.start(start)

	jobs := make(chan int)
	var wg sync.WaitGroup
	var lastEnd atomic.Int64 // ns since start
	for w := 0; w < cfg.Concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				rec := doRequest(ctx, client, endpoint, &cfg, i, start, prog, nil)
				res.Records[i] = rec
				end := int64((rec.StartMS + rec.E2EMS) * 1e6)
				for {
					old := lastEnd.Load()
					if end <= old || lastEnd.CompareAndSwap(old, end) {
						break
					}
				}
				prog.finish(rec)
			}
		}()
	}
	dispatched := 0
dispatch:
	for i := 0; i < cfg.Requests; i++ {
		select {
		case jobs <- i:
			dispatched++
		case <-ctx.Done():
			break dispatch
		}
	}
	close(jobs)
	wg.Wait()
	prog.stop()

	res.Records = res.Records[:dispatched]
	res.Run.Requests = dispatched
	res.WallMS = float64(lastEnd.Load()) / 1e6
	if cpuOK {
		if cpu1, ok := serverCPU(context.WithoutCancel(ctx), client, cfg.URL); ok && cpu1 >= cpu0 {
			res.ServerCPUS = cpu1 - cpu0
		}
	}
	res.finalize()
	return res, ctx.Err()
}

// finalize fills the aggregates and summaries from Records and WallMS.
func (r *Result) finalize() {
	var e2e, ttft, tps, gaps []float64
	r.Completed, r.Errors, r.TotalTokens = 0, 0, 0
	r.ErrorsByStatus = nil
	for i := range r.Records {
		rec := &r.Records[i]
		if !rec.OK() {
			r.Errors++
			if r.ErrorsByStatus == nil {
				r.ErrorsByStatus = map[string]int{}
			}
			r.ErrorsByStatus[errorClass(rec)]++
			continue
		}
		r.Completed++
		r.TotalTokens += rec.Tokens
		e2e = append(e2e, rec.E2EMS)
		if rec.Chunks > 0 {
			ttft = append(ttft, rec.TTFTMS)
		}
		tps = append(tps, rec.TokPerS)
		gaps = append(gaps, rec.GapsMS...)
	}
	if r.WallMS > 0 {
		r.TokPerS = float64(r.TotalTokens) / (r.WallMS / 1000)
		r.ReqPerS = float64(r.Completed) / (r.WallMS / 1000)
	}
	if r.ServerCPUS > 0 && len(r.Records) > 0 {
		r.ServerCPUUSPerReq = r.ServerCPUS * 1e6 / float64(len(r.Records))
	}
	r.ResponseMS = Summarize(e2e)
	r.TTFTMS = Summarize(ttft)
	r.ReqTokPerS = Summarize(tps)
	r.ITLMS = Summarize(gaps)
}

// errorClass is the key of Result.ErrorsByStatus: the HTTP status for a
// non-200 answer, else the ErrorKind.
func errorClass(rec *Record) string {
	if rec.ErrorKind == "http" || (rec.ErrorKind == "" && rec.Status != 0 && rec.Status != http.StatusOK) {
		return strconv.Itoa(rec.Status)
	}
	if rec.ErrorKind == "" {
		return "other"
	}
	return rec.ErrorKind
}

// fail sets rec's error, classifying context errors.
func (rec *Record) fail(kind string, err error, runCtx context.Context) {
	rec.Error = err.Error()
	rec.ErrorKind = kind
	switch {
	case runCtx.Err() != nil:
		rec.ErrorKind = "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		rec.ErrorKind = "timeout"
	}
}

func endpointURL(base string, chat bool) string {
	base = strings.TrimRight(base, "/")
	base = strings.TrimSuffix(base, "/v1")
	if chat {
		return base + "/v1/chat/completions"
	}
	return base + "/v1/completions"
}

func requestBody(cfg *Config, prompt string) ([]byte, error) {
	if cfg.Chat {
		return chatBody(cfg, []map[string]string{{"role": "user", "content": prompt}})
	}
	return chatBody(cfg, nil, prompt)
}

// chatBody is the request body for chat messages, or (prompt given) a
// completion prompt.
func chatBody(cfg *Config, msgs []map[string]string, prompt ...string) ([]byte, error) {
	body := map[string]any{
		"model":          cfg.Model,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
		"temperature":    cfg.Temperature,
	}
	if len(prompt) > 0 {
		body["prompt"] = prompt[0]
	} else {
		body["messages"] = msgs
	}
	if cfg.MaxTokens > 0 {
		body["max_tokens"] = cfg.MaxTokens
	}
	if cfg.Seed != nil {
		body["seed"] = *cfg.Seed
	}
	if cfg.IgnoreEOS {
		body["ignore_eos"] = true
	}
	if len(cfg.ResponseFormat) > 0 {
		body["response_format"] = cfg.ResponseFormat
	}
	return json.Marshal(body)
}

// streamChunk is the part of a chat.completion.chunk / text_completion chunk
// that loadgen reads.
type streamChunk struct {
	Choices []struct {
		Delta struct {
			Content          *string         `json:"content"`
			Reasoning        *string         `json:"reasoning"`
			ReasoningContent *string         `json:"reasoning_content"`
			ToolCalls        json.RawMessage `json:"tool_calls"`
		} `json:"delta"`
		Text         *string `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens        int `json:"prompt_tokens"`
		CompletionTokens    int `json:"completion_tokens"`
		PromptTokensDetails *struct {
			CachedTokens int `json:"cached_tokens"`
		} `json:"prompt_tokens_details"`
	} `json:"usage"`
	Error json.RawMessage `json:"error"`
}

func nonEmpty(s *string) bool { return s != nil && *s != "" }

func (c *streamChunk) hasContent() bool {
	for _, ch := range c.Choices {
		d := &ch.Delta
		if nonEmpty(d.Content) || nonEmpty(d.Reasoning) || nonEmpty(d.ReasoningContent) || nonEmpty(ch.Text) {
			return true
		}
		if len(d.ToolCalls) > 0 && !bytes.Equal(d.ToolCalls, []byte("null")) && !bytes.Equal(d.ToolCalls, []byte("[]")) {
			return true
		}
	}
	return false
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// doRequest sends request i (body: from cfg.Prompts when nil) and measures
// it; with text, the streamed content is also collected there.
func doRequest(runCtx context.Context, client *http.Client, endpoint string, cfg *Config, i int, runStart time.Time, prog *progress,
	msgs []map[string]string, text ...*strings.Builder) (rec Record) {
	pi := i % len(cfg.Prompts)
	rec = Record{Index: i, Prompt: pi}
	var body []byte
	var err error
	if msgs != nil {
		body, err = chatBody(cfg, msgs)
	} else {
		body, err = requestBody(cfg, cfg.Prompts[pi])
	}
	if err != nil {
		rec.fail("other", err, runCtx)
		return rec
	}
	ctx := runCtx
	if cfg.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		rec.fail("other", err, runCtx)
		return rec
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")

	t0 := cfg.now()
	rec.StartMS = ms(t0.Sub(runStart))
	defer func() {
		rec.E2EMS = ms(cfg.now().Sub(t0))
		if rec.OK() && rec.E2EMS > 0 {
			rec.TokPerS = float64(rec.Tokens) / (rec.E2EMS / 1000)
		}
	}()

	resp, err := client.Do(req)
	if err != nil {
		rec.fail("transport", err, runCtx)
		return rec
	}
	defer resp.Body.Close()
	rec.Status = resp.StatusCode
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		rec.Error = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, truncate(strings.TrimSpace(string(msg)), 300))
		rec.ErrorKind = "http"
		return rec
	}

	sse := newSSEReader(resp.Body)
	var last time.Time
	usageTokens := -1
	done := false
	for {
		data, err := sse.Next()
		if err != nil {
			if err != io.EOF {
				rec.fail("stream", fmt.Errorf("stream: %w", err), runCtx)
			} else if !done {
				rec.fail("stream", errors.New("stream: ended before [DONE]"), runCtx)
			}
			break
		}
		now := cfg.now()
		if bytes.Equal(bytes.TrimSpace(data), []byte("[DONE]")) {
			done = true
			if cfg.onEvent != nil {
				cfg.onEvent(i)
			}
			// Drain so the connection can be reused.
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			break
		}
		var c streamChunk
		if err := json.Unmarshal(data, &c); err != nil {
			rec.fail("stream", fmt.Errorf("stream: bad chunk %q: %v", truncate(string(data), 120), err), runCtx)
			break
		}
		if len(c.Error) > 0 && !bytes.Equal(c.Error, []byte("null")) {
			rec.fail("stream", errors.New("stream: server error: "+truncate(string(c.Error), 300)), runCtx)
			break
		}
		if c.hasContent() {
			for _, t := range text {
				for _, ch := range c.Choices {
					if ch.Delta.Content != nil {
						t.WriteString(*ch.Delta.Content)
					}
				}
			}
			if rec.Chunks == 0 {
				rec.TTFTMS = ms(now.Sub(t0))
			} else {
				rec.GapsMS = append(rec.GapsMS, ms(now.Sub(last)))
			}
			last = now
			rec.Chunks++
			prog.tokens(1)
		}
		for _, ch := range c.Choices {
			if ch.FinishReason != nil && *ch.FinishReason != "" {
				rec.FinishReason = *ch.FinishReason
			}
		}
		if c.Usage != nil {
			usageTokens = c.Usage.CompletionTokens
			rec.PromptTokens = c.Usage.PromptTokens
			if d := c.Usage.PromptTokensDetails; d != nil {
				rec.CachedTokens = d.CachedTokens
			}
		}
		if cfg.onEvent != nil {
			cfg.onEvent(i)
		}
	}
	if usageTokens >= 0 {
		rec.Tokens = usageTokens
		rec.TokensSource = "usage"
	} else {
		rec.Tokens = rec.Chunks
		rec.TokensSource = "chunks"
	}
	if rec.OK() {
		prog.tokens(rec.Tokens - rec.Chunks)
	}
	return rec
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
