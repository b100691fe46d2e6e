package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/krserve/krserve/loadgen"
)

type benchFlags struct {
	url, model, questions, jsonOut, compare, from, name string
	responseFormat                                      string
	scenario                                            string
	conversations, turns, systemWords, prefixWords      int
	userWords                                           int
	concurrency, requests, maxTokens, seed, warmup      int
	temperature                                         float64
	completions, ignoreEOS, noProgress                  bool
	timeout, thinkTime                                  time.Duration
}

func newBenchCmd() *cobra.Command {
	var b benchFlags
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Load an OpenAI-compatible server with streamed requests and report latency and throughput",
		Long: `Send --requests streamed completions (questions from --questions, one per line,
used round-robin) with --concurrency clients, each with one request in flight, and
print kr-serve-mlx style tables: response time, TTFT, per-request tok/s and
inter-token gap (mean, median, P95, P99, min, max, std dev), plus the run's
wall time, aggregate tok/s and requests/s.

TTFT is send -> first content chunk; tok/s = completion tokens (from the usage
chunk) / end-to-end time, TTFT included. Works against krserve, mlx_lm.server or
any server that streams OpenAI chunks (send --model default_model or the model path
to mlx_lm.server). --seed is only sent when given (mlx_lm.server does not batch
seeded requests).

--json writes the run (the schema of scripts/bench/inprocess.py); --compare
prints it side by side with a saved run, speedup and overhead per row; --from
loads a saved run instead of sending load (e.g. to compare two files).

--scenario multi-turn runs chat conversations instead (a prompt cache's case):
--conversations conversations of --turns turns, generated offline from --seed
(default 0): a shared system prompt of --system-words words, a per-conversation
prefix of --prefix-words words in the first message, user turns of --user-words
words, each model reply fed back into the next turn; --concurrency conversations
at once. --think-time D pauses each conversation before its next turn for a
seeded random time in [0, 2D), as a user reading and typing would (without it a
conversation's next turn arrives as its worker frees a slot, which keeps
conversations on their worker under any routing). It prints TTFT P50/P90, prompt tokens and cached tokens
(usage.prompt_tokens_details.cached_tokens) per turn number.`,
		Example: `  krserve bench --scenario multi-turn --conversations 8 --turns 4 --concurrency 4 --max-tokens 48
  krserve bench --url http://127.0.0.1:8080 --concurrency 1 --requests 50 --max-tokens 50 \
      --questions scripts/bench/questions.txt --json out/krserve.json --compare out/inprocess.json
  krserve bench --from out/krserve.json --compare out/inprocess.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			seedSet := cmd.Flags().Changed("seed")
			return runBench(cmd.Context(), b, seedSet, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&b.url, "url", "http://127.0.0.1:8080", "server base URL")
	f.StringVar(&b.model, "model", "default", "model id sent in each request")
	f.IntVar(&b.concurrency, "concurrency", 1, "concurrent clients (each keeps one request in flight)")
	f.IntVar(&b.requests, "requests", 50, "total requests (questions are reused round-robin)")
	f.IntVar(&b.maxTokens, "max-tokens", 50, "max_tokens per request")
	f.Float64Var(&b.temperature, "temperature", 0, "sampling temperature (0 = greedy, like the in-process baseline)")
	f.IntVar(&b.seed, "seed", 0, "send this seed (omitted unless given)")
	f.StringVar(&b.questions, "questions", "scripts/bench/questions.txt", "prompt file, one per line (blank lines and lines starting with # skipped)")
	f.StringVar(&b.jsonOut, "json", "", "write the result as JSON to this file")
	f.StringVar(&b.compare, "compare", "", "compare against this saved result (JSON from bench or inprocess.py)")
	f.StringVar(&b.from, "from", "", "load this saved result instead of running")
	f.StringVar(&b.name, "name", "", "label of this run in tables and JSON (default: the URL)")
	f.BoolVar(&b.completions, "completions", false, "use /v1/completions with raw prompts instead of /v1/chat/completions")
	f.StringVar(&b.responseFormat, "response-format", "", `send this response_format (a JSON object, e.g. '{"type":"json_object"}'): structured output's cost against the same run without it`)
	f.BoolVar(&b.ignoreEOS, "ignore-eos", false, `send "ignore_eos": true (krserve extension) so every request makes max-tokens tokens`)
	f.DurationVar(&b.timeout, "timeout", 5*time.Minute, "per-request timeout (0 = none)")
	f.IntVar(&b.warmup, "warmup", 1, "unrecorded sequential requests sent first")
	f.BoolVar(&b.noProgress, "no-progress", false, "do not draw the progress line on stderr")
	f.StringVar(&b.scenario, "scenario", "questions", "questions (single-turn questions from --questions) or multi-turn (generated conversations)")
	f.IntVar(&b.conversations, "conversations", 32, "multi-turn: conversations")
	f.IntVar(&b.turns, "turns", 8, "multi-turn: turns per conversation")
	f.IntVar(&b.systemWords, "system-words", 750, "multi-turn: words of the shared system prompt (~1,000 tokens)")
	f.IntVar(&b.prefixWords, "prefix-words", 200, "multi-turn: words of each conversation's own prefix")
	f.DurationVar(&b.thinkTime, "think-time", 0, "multi-turn: mean pause before each next turn, uniform in [0, 2×this) from --seed (0: none)")
	f.IntVar(&b.userWords, "user-words", 75, "multi-turn: words per user turn (~100 tokens)")
	return cmd
}

// readQuestions reads one prompt per line; blank lines and lines starting
// with '#' are skipped.
func readQuestions(path string) ([]string, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	var qs []string
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		qs = append(qs, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(qs) == 0 {
		return nil, fmt.Errorf("%s: no questions", path)
	}
	return qs, nil
}

func runBench(ctx context.Context, b benchFlags, seedSet bool, stdout, stderr io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	rf, err := responseFormat(b.responseFormat)
	if err != nil {
		return err
	}
	switch b.scenario {
	case "questions":
	case "multi-turn":
		return runMultiTurn(ctx, b, rf, stdout, stderr)
	default:
		return fmt.Errorf("bench: --scenario must be questions or multi-turn; got %q", b.scenario)
	}
	var res *loadgen.Result
	var runErr error // set when the run was interrupted
	if b.from != "" {
		r, err := loadgen.ReadResult(b.from)
		if err != nil {
			return err
		}
		if b.name != "" {
			r.Name = b.name
		}
		res = r
	} else {
		if b.concurrency < 1 || b.requests < 1 || b.maxTokens < 1 || b.warmup < 0 {
			return errors.New("bench: --concurrency, --requests and --max-tokens must be >= 1, --warmup >= 0")
		}
		qs, err := readQuestions(b.questions)
		if err != nil {
			return fmt.Errorf("bench: questions: %w", err)
		}
		ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
		defer stop()
		cfg := loadgen.Config{
			URL:         b.url,
			Model:       b.model,
			Concurrency: b.concurrency,
			Requests:    b.requests,
			MaxTokens:   b.maxTokens,
			Temperature: b.temperature,
			Prompts:     qs,
			Chat:        !b.completions,
			Timeout:     b.timeout,
			IgnoreEOS:   b.ignoreEOS,
			ServerCPU:   true,
		}
		cfg.ResponseFormat = rf
		if seedSet {
			s := b.seed
			cfg.Seed = &s
		}
		if b.warmup > 0 {
			w := cfg
			w.Concurrency, w.Requests, w.ServerCPU = 1, b.warmup, false
			wr, err := loadgen.Run(ctx, w)
			if err != nil {
				return fmt.Errorf("bench: warmup: %w", err)
			}
			if wr.Completed == 0 {
				return fmt.Errorf("bench: warmup failed: %s", wr.Records[0].Error)
			}
		}
		if !b.noProgress {
			cfg.Progress = stderr
		}
		r, err := loadgen.Run(ctx, cfg)
		if r == nil {
			return fmt.Errorf("bench: %w", err)
		}
		r.Name = b.name
		res = r
		if err != nil {
			// Interrupted: report and save what was measured, then fail.
			runErr = fmt.Errorf("bench: interrupted after %d requests: %w", len(r.Records), err)
		}
	}

	res.WriteTable(stdout)
	if b.compare != "" {
		base, err := loadgen.ReadResult(b.compare)
		if err != nil {
			return fmt.Errorf("bench: --compare: %w", err)
		}
		loadgen.Compare(stdout, base, res, [2]string{base.Label(), res.Label()})
	}
	if b.jsonOut != "" && b.from == "" {
		if err := res.WriteJSON(b.jsonOut); err != nil {
			return fmt.Errorf("bench: --json: %w", err)
		}
	}
	if runErr != nil {
		return runErr
	}
	if b.from == "" && res.Completed == 0 && len(res.Records) > 0 {
		return fmt.Errorf("bench: all %d requests failed; first error: %s", len(res.Records), res.Records[0].Error)
	}
	return nil
}

func runMultiTurn(ctx context.Context, b benchFlags, rf json.RawMessage, stdout, stderr io.Writer) error {
	if b.from != "" || b.compare != "" {
		return errors.New("bench: --from and --compare are for the questions scenario")
	}
	if b.conversations < 1 || b.turns < 1 || b.concurrency < 1 || b.maxTokens < 1 || b.userWords < 1 || b.systemWords < 0 || b.prefixWords < 0 {
		return errors.New("bench: --conversations, --turns, --concurrency, --max-tokens and --user-words must be >= 1")
	}
	if b.thinkTime < 0 {
		return fmt.Errorf("bench: --think-time must be at least 0; got %s", b.thinkTime)
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := loadgen.MultiTurnConfig{
		Config: loadgen.Config{URL: b.url, Model: b.model, Concurrency: b.concurrency, MaxTokens: b.maxTokens,
			Temperature: b.temperature, Timeout: b.timeout, IgnoreEOS: b.ignoreEOS},
		Conversations: b.conversations, Turns: b.turns, SystemWords: b.systemWords, PrefixWords: b.prefixWords,
		UserWords: b.userWords, Seed: uint64(b.seed), ThinkTime: b.thinkTime,
	}
	cfg.ResponseFormat = rf
	if !b.noProgress {
		cfg.Progress = stderr
	}
	res, err := loadgen.RunMultiTurn(ctx, cfg)
	if res == nil {
		return fmt.Errorf("bench: %w", err)
	}
	res.Name = b.name
	res.WriteTable(stdout)
	if b.jsonOut != "" {
		if werr := res.WriteJSON(b.jsonOut); werr != nil {
			return fmt.Errorf("bench: --json: %w", werr)
		}
	}
	if err != nil {
		return fmt.Errorf("bench: interrupted: %w", err)
	}
	return nil
}

// responseFormat is --response-format as sent: nil when empty, an error
// unless it is a JSON object.
func responseFormat(flag string) (json.RawMessage, error) {
	if flag == "" {
		return nil, nil
	}
	var obj map[string]any
	if err := json.Unmarshal([]byte(flag), &obj); err != nil {
		return nil, fmt.Errorf("bench: --response-format must be a JSON object: %w", err)
	}
	return json.RawMessage(flag), nil
}
