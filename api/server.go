// Package api is krserve's HTTP front door: the OpenAI-compatible endpoints,
// health and readiness, /stats and /metrics.
package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/krserve/krserve/ipc"
	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/scheduler"
	"github.com/krserve/krserve/supervisor"
)

// Config holds the front door's settings.
type Config struct {
	ModelName        string        // the id /v1/models lists and requests may name
	APIKey           string        // if set, /v1/* needs "Authorization: Bearer <key>"
	ProtectOps       bool          // with APIKey: /metrics and /stats need it too
	MaxBodyBytes     int64         // 413 above this
	MaxTokens        int           // cap on max_tokens
	DefaultMaxTokens int           // when the request names none
	MaxStop          int           // stop sequences per request
	MaxStopLen       int           // bytes per stop sequence
	MaxConcurrent    int           // requests being served at once (429 above)
	DefaultTimeout   time.Duration // per request, unless the request says otherwise
	MaxTimeout       time.Duration
	KeepAlive        time.Duration // SSE comment interval while waiting for tokens
	LogPrompts       bool
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		ModelName:        "default",
		MaxBodyBytes:     4 << 20,
		MaxTokens:        4096,
		DefaultMaxTokens: 256,
		MaxStop:          8,
		MaxStopLen:       256,
		MaxConcurrent:    1024,
		DefaultTimeout:   10 * time.Minute,
		MaxTimeout:       time.Hour,
		KeepAlive:        2 * time.Second,
	}
}

// Scheduler is what the front door needs from the scheduler.
type Scheduler interface {
	Submit(r *scheduler.Request) error
	Cancel(r *scheduler.Request, reason, msg string)
}

// Pool is what the front door needs from the worker pool.
type Pool interface {
	Hello() *supervisor.Hello
	CanServe() bool
}

// Ops answers /ready and /stats.
type Ops interface {
	Ready() (ok bool, body any)
	Stats() any
}

// Server is the HTTP handler set.
type Server struct {
	cfg     Config
	sched   Scheduler
	pool    Pool
	ops     Ops
	models  Models // several models (NewModels); nil: sched and pool serve the one model
	m       *metrics.Metrics
	log     *slog.Logger
	ids     func() uint64
	active  atomic.Int64
	created func() time.Time
}

// New builds the front door. ids must return process-unique request ids.
func New(cfg Config, sched Scheduler, pool Pool, ops Ops, m *metrics.Metrics, log *slog.Logger, ids func() uint64) *Server {
	return &Server{cfg: cfg, sched: sched, pool: pool, ops: ops, m: m, log: log, ids: ids, created: time.Now}
}

// Handler returns the routed handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.v1(s.chat))
	mux.HandleFunc("POST /v1/completions", s.v1(s.completion))
	mux.HandleFunc("GET /v1/models", s.v1(s.modelsList))
	if s.models != nil {
		s.routeModels(mux)
	}
	mux.HandleFunc("/v1/", s.v1(func(w http.ResponseWriter, r *http.Request) {
		// This catch-all also gets known paths with the wrong method
		// (the mux answers 405 only when no other pattern matches).
		if allow, ok := v1Methods[r.URL.Path]; ok {
			w.Header().Set("Allow", allow)
			writeError(w, &apiError{Status: 405, Type: "invalid_request_error", Code: "method_not_allowed", Message: fmt.Sprintf("%s is not allowed on %s; use %s", r.Method, r.URL.Path, allow)})
			return
		}
		writeError(w, &apiError{Status: 404, Type: "invalid_request_error", Code: "not_found", Message: fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path)})
	}))
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		if name := r.URL.Query().Get("model"); name != "" {
			s.readyModel(w, name)
			return
		}
		ok, body := s.ops.Ready()
		status := 200
		if !ok {
			status = 503
			w.Header().Set("Retry-After", "1")
		}
		writeJSON(w, status, body)
	})
	mux.Handle("GET /metrics", s.ops1(s.m.Handler()))
	mux.Handle("GET /stats", s.ops1(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, s.ops.Stats())
	})))
	return mux
}

// v1Methods lists the methods of the /v1 routes (Allow header of a 405).
var v1Methods = map[string]string{"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET, HEAD"}

// ops1 guards /metrics and /stats with the API key when ProtectOps is set.
func (s *Server) ops1(h http.Handler) http.Handler {
	if !s.cfg.ProtectOps || s.cfg.APIKey == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.authorized(r) {
			writeError(w, unauthorized())
			return
		}
		h.ServeHTTP(w, r)
	})
}

func unauthorized() *apiError {
	return &apiError{Status: 401, Type: "authentication_error", Code: "invalid_api_key", Message: "missing or invalid API key: send Authorization: Bearer <key>"}
}

func (s *Server) authorized(r *http.Request) bool {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(tok)), []byte(s.cfg.APIKey)) == 1
}

// v1 wraps /v1/* handlers: API key, concurrency cap, body limit.
func (s *Server) v1(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.APIKey != "" && !s.authorized(r) {
			s.log.Warn("request refused: bad API key", "path", r.URL.Path, "remote", r.RemoteAddr)
			writeError(w, unauthorized())
			return
		}
		if n := s.active.Add(1); s.cfg.MaxConcurrent > 0 && n > int64(s.cfg.MaxConcurrent) {
			s.active.Add(-1)
			s.m.AdmissionRejections.WithLabelValues("connections").Inc()
			w.Header().Set("Retry-After", "1")
			writeError(w, &apiError{Status: 429, Type: "rate_limit_error", Code: "too_many_connections", Message: fmt.Sprintf("more than %d requests are being served; retry later", s.cfg.MaxConcurrent)})
			return
		}
		defer s.active.Add(-1)
		r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		h(w, r)
	}
}

func (s *Server) modelsList(w http.ResponseWriter, r *http.Request) {
	if s.models != nil {
		s.modelList(w)
		return
	}
	created := s.created().Unix()
	data := []map[string]any{{"id": s.cfg.ModelName, "object": "model", "created": created, "owned_by": "krserve"}}
	if h := s.pool.Hello(); h != nil && h.Model != s.cfg.ModelName {
		data = append(data, map[string]any{"id": h.Model, "object": "model", "created": created, "owned_by": "krserve"})
	}
	writeJSON(w, 200, map[string]any{"object": "list", "data": data})
}

func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			s.m.AdmissionRejections.WithLabelValues("too_large").Inc()
			return nil, &apiError{Status: 413, Type: "invalid_request_error", Code: "request_too_large", Message: fmt.Sprintf("request body exceeds %d bytes", s.cfg.MaxBodyBytes)}
		}
		return nil, &apiError{Status: 400, Type: "invalid_request_error", Message: "reading request body: " + err.Error()}
	}
	return body, nil
}

// decodeBody reads the (size-limited) body and decodes it into v.
func (s *Server) decodeBody(w http.ResponseWriter, r *http.Request, v any) *apiError {
	body, e := s.readBody(w, r)
	if e != nil {
		return e
	}
	return decodeJSON(body, v)
}

// job is a validated request, ready for the scheduler.
type job struct {
	chat         bool
	model        string
	stream       bool
	includeUsage bool
	params       scheduler.Params
	timeout      time.Duration
	ignoreEOS    bool
	keepAlive    *time.Duration // how long the model stays loaded after this request (nil: its ttl)
	sched        Scheduler      // the model's, once routed
	headersSent  bool           // a stream's headers went out while its model loaded
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if e := s.decodeBody(w, r, &req); e != nil {
		s.refuse(w, r, e)
		return
	}
	texts, e := parseMessages(req.Messages)
	if e != nil {
		s.refuse(w, r, e)
		return
	}
	j, e := s.common(&req.commonRequest)
	if e == nil {
		e = chatLogprobsParams(&req.commonRequest, &j.params)
	}
	if e != nil {
		s.refuse(w, r, e)
		return
	}
	ts, e := parseTools(req.Tools, req.ToolChoice, req.ParallelToolCalls)
	if e != nil {
		s.refuse(w, r, e)
		return
	}
	j.chat = true
	in := &scheduler.Input{Messages: make([]ipc.ChatMessage, len(req.Messages)),
		Tools: ts.Tools, ToolChoice: ts.Choice, ToolName: ts.Name, OneCall: ts.OneCall}
	for i, m := range req.Messages {
		in.Messages[i] = ipc.ChatMessage{Role: m.Role, Content: texts[i], ToolCallID: m.ToolCallID}
		if len(m.ToolCalls) > 0 {
			calls, e := historyCalls(i, m.ToolCalls)
			if e != nil {
				s.refuse(w, r, e)
				return
			}
			in.Messages[i].ToolCalls = calls
		}
	}
	s.run(w, r, j, in, nil)
}

func (s *Server) completion(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if e := s.decodeBody(w, r, &req); e != nil {
		s.refuse(w, r, e)
		return
	}
	text, ids, e := parsePrompt(req.Prompt)
	if e != nil {
		s.refuse(w, r, e)
		return
	}
	if req.Echo {
		s.refuse(w, r, invalid("echo", "echo is not supported"))
		return
	}
	if req.Suffix != nil && *req.Suffix != "" {
		s.refuse(w, r, invalid("suffix", "suffix is not supported"))
		return
	}
	j, e := s.common(&req.commonRequest)
	if e == nil {
		e = completionLogprobsParams(&req.commonRequest, &j.params)
	}
	if e != nil {
		s.refuse(w, r, e)
		return
	}
	var in *scheduler.Input
	if ids == nil {
		in = &scheduler.Input{Text: text, Special: true}
	}
	s.run(w, r, j, in, ids)
}

// common validates the fields shared by both endpoints.
func (s *Server) common(q *commonRequest) (*job, *apiError) {
	j := &job{model: q.Model, stream: q.Stream}
	if q.Model == "" {
		return nil, invalid("model", "model is required")
	}
	if !s.knownModel(q.Model) {
		return nil, &apiError{Status: 404, Type: "invalid_request_error", Code: "model_not_found", Param: "model", Message: fmt.Sprintf("model %q is not served here; GET /v1/models lists %s", q.Model, s.knownNames())}
	}
	var e *apiError
	if j.keepAlive, e = parseKeepAlive(q.KeepAlive); e != nil {
		return nil, e
	}
	j.ignoreEOS = q.IgnoreEOS
	if q.N != nil && *q.N != 1 {
		return nil, invalid("n", "n must be 1; krserve returns one choice per request (got %d)", *q.N)
	}
	if q.StreamOptions != nil {
		if !q.Stream {
			return nil, invalid("stream_options", "stream_options is only allowed with stream: true")
		}
		j.includeUsage = q.StreamOptions.IncludeUsage
	}
	p := &j.params
	p.MaxTokens = s.cfg.DefaultMaxTokens
	mt, mtName := q.MaxTokens, "max_tokens"
	if q.MaxCompletionTokens != nil {
		mt, mtName = q.MaxCompletionTokens, "max_completion_tokens"
	}
	if mt != nil {
		if *mt < 1 {
			return nil, invalid(mtName, "%s must be at least 1; got %d", mtName, *mt)
		}
		if *mt > s.cfg.MaxTokens {
			return nil, invalid(mtName, "%s may be at most %d; got %d", mtName, s.cfg.MaxTokens, *mt)
		}
		p.MaxTokens = *mt
	}
	p.Temperature = 1.0
	if q.Temperature != nil {
		if *q.Temperature < 0 || *q.Temperature > 2 || math.IsNaN(*q.Temperature) {
			return nil, invalid("temperature", "temperature must be between 0 and 2; got %v", *q.Temperature)
		}
		p.Temperature = *q.Temperature
	}
	if q.TopP != nil {
		if *q.TopP <= 0 || *q.TopP > 1 || math.IsNaN(*q.TopP) {
			return nil, invalid("top_p", "top_p must be in (0, 1]; got %v", *q.TopP)
		}
		if *q.TopP < 1 {
			p.TopP = *q.TopP
		}
	}
	if q.TopK != nil {
		if *q.TopK < 0 && *q.TopK != -1 {
			return nil, invalid("top_k", "top_k must be 0 or -1 (off) or positive; got %d", *q.TopK)
		}
		p.TopK = max(0, *q.TopK)
	}
	if q.MinP != nil {
		if *q.MinP < 0 || *q.MinP > 1 || math.IsNaN(*q.MinP) {
			return nil, invalid("min_p", "min_p must be in [0, 1]; got %v", *q.MinP)
		}
		p.MinP = *q.MinP
	}
	// A slice, not a map: with both out of range the error must not vary.
	for _, pen := range []struct {
		name string
		v    *float64
	}{{"presence_penalty", q.PresencePenalty}, {"frequency_penalty", q.FrequencyPenalty}} {
		if v := pen.v; v != nil && (*v < -2 || *v > 2 || math.IsNaN(*v)) {
			return nil, invalid(pen.name, "%s must be between -2 and 2; got %v", pen.name, *v)
		}
	}
	if q.PresencePenalty != nil {
		p.PresencePenalty = *q.PresencePenalty
	}
	if q.FrequencyPenalty != nil {
		p.FrequencyPenalty = *q.FrequencyPenalty
	}
	if q.RepetitionPenalty != nil {
		if *q.RepetitionPenalty <= 0 || *q.RepetitionPenalty > 10 || math.IsNaN(*q.RepetitionPenalty) {
			return nil, invalid("repetition_penalty", "repetition_penalty must be in (0, 10]; got %v", *q.RepetitionPenalty)
		}
		if *q.RepetitionPenalty != 1 {
			p.RepetitionPenalty = *q.RepetitionPenalty
		}
	}
	if q.Seed != nil {
		seed := *q.Seed
		p.Seed = &seed
	}
	vocab := 0
	if h := s.hello(); h != nil {
		vocab = h.Vocab
	}
	if len(q.LogitBias) > 0 {
		if len(q.LogitBias) > 1024 {
			return nil, invalid("logit_bias", "logit_bias may name at most 1024 tokens")
		}
		p.LogitBias = map[int32]float64{}
		for k, v := range q.LogitBias {
			id, err := strconv.Atoi(k)
			if err != nil || id < 0 || (vocab > 0 && id >= vocab) {
				return nil, invalid("logit_bias", "logit_bias key %q is not a token id of this model", k)
			}
			if v < -100 || v > 100 || math.IsNaN(v) {
				return nil, invalid("logit_bias", "logit_bias values must be between -100 and 100; got %v", v)
			}
			if _, dup := p.LogitBias[int32(id)]; dup { // "5" and "05": which won would depend on map order
				return nil, invalid("logit_bias", "logit_bias names token %d twice", id)
			}
			p.LogitBias[int32(id)] = v
		}
	}
	if q.IgnoreEOS {
		if p.LogitBias == nil {
			p.LogitBias = map[int32]float64{}
		}
		if h := s.hello(); h != nil {
			for _, e := range h.EOS {
				p.LogitBias[e] = -1e9
			}
		}
	}
	stop, e := parseStop(q.Stop, s.cfg.MaxStop, s.cfg.MaxStopLen)
	if e != nil {
		return nil, e
	}
	p.Stop = stop
	if p.Schema, e = parseResponseFormat(q.ResponseFormat); e != nil {
		return nil, e
	}
	j.timeout = s.cfg.DefaultTimeout
	if q.Timeout != nil {
		if *q.Timeout <= 0 || math.IsNaN(*q.Timeout) {
			return nil, invalid("timeout", "timeout must be a positive number of seconds")
		}
		// Compare in seconds: a huge value overflows time.Duration (negative).
		j.timeout = s.cfg.MaxTimeout
		if *q.Timeout < s.cfg.MaxTimeout.Seconds() {
			j.timeout = time.Duration(*q.Timeout * float64(time.Second))
		}
	}
	return j, nil
}

func (s *Server) knownModel(name string) bool {
	if s.models != nil {
		_, ok := s.models.Resolve(name)
		return ok
	}
	if name == s.cfg.ModelName {
		return true
	}
	h := s.pool.Hello()
	return h != nil && name == h.Model
}

// refuse answers an invalid request and counts it.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, e *apiError) {
	if e.Status == 400 || e.Status == 404 || e.Status == 413 {
		s.m.RequestFailure.WithLabelValues(scheduler.ReasonInvalid).Inc()
	}
	s.log.Info("request refused", "path", r.URL.Path, "status", e.Status, "param", e.Param, "err", e.Message)
	writeError(w, e)
}

// run admits and serves a job whose prompt is token ids, or an Input that
// the worker tokenizes (and checks against the context) when it takes the
// request.
func (s *Server) run(w http.ResponseWriter, r *http.Request, j *job, in *scheduler.Input, ids []int32) {
	ctx, cancel := context.WithTimeout(r.Context(), j.timeout)
	defer cancel()
	var pool Pool = s.pool
	j.sched = s.sched
	if s.models != nil {
		lease, mod, e := s.acquire(ctx, w, j)
		if e != nil {
			if errors.Is(r.Context().Err(), context.Canceled) {
				return // the client left while its model loaded
			}
			s.refuseJob(w, r, j, e)
			return
		}
		defer lease.Release(j.keepAlive)
		pool, j.sched = mod, mod
		if e := lateChecks(j, pool.Hello()); e != nil {
			s.refuseJob(w, r, j, e)
			return
		}
	}
	hello := pool.Hello()
	if hello == nil {
		w.Header().Set("Retry-After", "1")
		s.refuseJob(w, r, j, &apiError{Status: 503, Type: "server_error", Code: "not_ready", Message: "no worker has loaded the model yet; retry shortly"})
		return
	}
	if !pool.CanServe() {
		w.Header().Set("Retry-After", "1")
		s.refuseJob(w, r, j, &apiError{Status: 503, Type: "server_error", Code: "no_worker", Message: "no worker is available right now (every worker keeps failing); retry shortly"})
		return
	}
	var req *scheduler.Request
	if in != nil {
		req = scheduler.NewInputRequest(s.ids(), *in, j.params)
	} else {
		if len(ids) == 0 {
			s.refuseJob(w, r, j, invalid("prompt", "the prompt is empty"))
			return
		}
		for i, t := range ids {
			if hello.Vocab > 0 && int(t) >= hello.Vocab {
				s.refuseJob(w, r, j, invalid("prompt", "prompt[%d] = %d is not a token id of this model (vocabulary size %d)", i, t, hello.Vocab))
				return
			}
		}
		if hello.Context > 0 {
			if len(ids) >= hello.Context {
				s.refuseJob(w, r, j, contextError(j, hello.Context, len(ids)))
				return
			}
			j.params.MaxTokens = min(j.params.MaxTokens, hello.Context-len(ids))
		}
		req = scheduler.NewRequest(s.ids(), ids, j.params)
	}
	if dl, ok := ctx.Deadline(); ok {
		req.Deadline = dl
	}
	if err := j.sched.Submit(req); err != nil {
		s.refuseJob(w, r, j, schedError(err, w))
		return
	}
	log := s.log // each line names the request (log.With would cost an allocation per request)
	switch {
	case s.cfg.LogPrompts && in != nil:
		log.Debug("request admitted", "request", req.ID, "max_tokens", j.params.MaxTokens, "stream", j.stream, "text", in.Text, "messages", in.Messages)
	case s.cfg.LogPrompts:
		log.Debug("request admitted", "request", req.ID, "max_tokens", j.params.MaxTokens, "stream", j.stream, "prompt", ids)
	default:
		log.Debug("request admitted", "request", req.ID, "max_tokens", j.params.MaxTokens, "stream", j.stream)
	}
	if j.stream {
		s.serveStream(ctx, w, req, j, log)
	} else {
		s.serveJSON(ctx, w, req, j, log)
	}
}

// contextError is OpenAI's answer to a prompt that leaves no room in the
// model's context.
func contextError(j *job, context, prompt int) *apiError {
	return &apiError{Status: 400, Type: "invalid_request_error", Code: scheduler.CodeContextLength, Param: promptParam(j),
		Message: fmt.Sprintf("This model's maximum context length is %d tokens. However, your prompt has %d tokens.", context, prompt)}
}

// promptParam names the request field that holds j's prompt.
func promptParam(j *job) string {
	if j.chat {
		return "messages"
	}
	return "prompt"
}

// schedError maps a scheduler refusal or failure to an HTTP error.
func schedError(err error, w http.ResponseWriter) *apiError {
	var se *scheduler.Error
	if !errors.As(err, &se) {
		return &apiError{Status: 500, Type: "server_error", Message: err.Error()}
	}
	if se.RetryAfter > 0 && w != nil {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(se.RetryAfter.Seconds()))))
	}
	switch se.Reason {
	case scheduler.ReasonOverloaded:
		return &apiError{Status: 429, Type: "rate_limit_error", Code: "overloaded", Message: se.Msg}
	case scheduler.ReasonDraining:
		return &apiError{Status: 503, Type: "server_error", Code: "draining", Message: se.Msg}
	case scheduler.ReasonInvalid:
		return &apiError{Status: 400, Type: "invalid_request_error", Code: se.Code, Message: se.Msg}
	case scheduler.ReasonTimeout:
		return &apiError{Status: 504, Type: "timeout_error", Code: "timeout", Message: se.Msg}
	case scheduler.ReasonWorkerCrash:
		return &apiError{Status: 500, Type: "server_error", Code: "worker_crash", Message: se.Msg}
	default:
		return &apiError{Status: 500, Type: "server_error", Code: se.Reason, Message: se.Msg}
	}
}

// wait returns the next event, or cancels the request when ctx ends (client
// gone or deadline) and returns the terminal event that the cancel produced.
// While waiting, onTick runs on every tick (SSE keep-alives).
func (s *Server) wait(ctx context.Context, sched Scheduler, req *scheduler.Request, tick <-chan time.Time, onTick func()) scheduler.Event {
	for {
		if ev, ok := req.Poll(); ok {
			return ev
		}
		select {
		case <-req.Ready():
		case <-tick:
			onTick()
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				sched.Cancel(req, scheduler.ReasonTimeout, "request timed out")
			} else {
				s.m.ClientDisconnects.Inc()
				sched.Cancel(req, scheduler.ReasonCancelled, "client disconnected")
			}
			for {
				ev, ok := req.Poll()
				if !ok {
					// Cancel always leaves a terminal event; reaching here
					// means the request had already finished and been read.
					return scheduler.Event{Done: true, Err: &scheduler.Error{Reason: scheduler.ReasonCancelled, Msg: "request ended"}}
				}
				if ev.Done {
					return ev
				}
			}
		}
	}
}

func (s *Server) serveJSON(ctx context.Context, w http.ResponseWriter, req *scheduler.Request, j *job, log *slog.Logger) {
	var text strings.Builder
	var calls []outToolCall
	var args []*strings.Builder // calls[i]'s arguments, assembled from their fragments
	var chatLP *chatLogprobs
	var cmplLP *completionLogprobs
	offset := 0
	if j.params.Logprobs {
		chatLP, cmplLP = &chatLogprobs{Content: []chatTokenLogprob{}}, newCompletionLogprobs()
	}
	for {
		ev := s.wait(ctx, j.sched, req, nil, nil)
		text.WriteString(ev.Text)
		for _, c := range ev.Calls { // in order: the scheduler checked it
			if c.Name != "" {
				calls = append(calls, outToolCall{ID: callID(req.ID, c.Index), Type: "function", Function: outToolCallF{Name: c.Name}})
				args = append(args, &strings.Builder{})
			}
			args[c.Index].WriteString(c.Arguments)
		}
		if j.params.Logprobs {
			if j.chat {
				chatLP.add(ev.Logprobs)
			} else {
				offset = cmplLP.add(ev.Logprobs, offset)
			}
		}
		if !ev.Done {
			continue
		}
		if ev.Err != nil {
			s.failed(ctx, w, j, req, ev.Err, log)
			return
		}
		log.Debug("request done", "request", req.ID, "finish_reason", ev.FinishReason, "completion_tokens", ev.CompletionTokens, "cached_tokens", ev.CachedTokens)
		u := &usage{PromptTokens: ev.PromptTokens, CompletionTokens: ev.CompletionTokens, TotalTokens: ev.PromptTokens + ev.CompletionTokens,
			PromptTokensDetails: promptDetails{CachedTokens: ev.CachedTokens}}
		id, created, reason := s.idFor(j, req), time.Now().Unix(), finishReason(ev.FinishReason, len(calls), ev.CutCall)
		for i := range calls {
			a := args[i].String()
			calls[i].Function.Arguments = &a
		}
		out := text.String()
		if j.chat {
			content := &out
			if len(calls) > 0 && strings.TrimSpace(out) == "" {
				content = nil
			}
			writeJSON(w, 200, chatResponse{ID: id, Object: "chat.completion", Created: created, Model: j.model, SystemFingerprint: "krserve",
				Choices: []chatChoice{{Index: 0, Message: &chatFullMsg{Role: "assistant", Content: content, ToolCalls: calls}, Logprobs: chatLP, FinishReason: &reason}}, Usage: u})
		} else {
			writeJSON(w, 200, completionResponse{ID: id, Object: "text_completion", Created: created, Model: j.model, SystemFingerprint: "krserve",
				Choices: []completionChoice{{Index: 0, Text: out, Logprobs: cmplLP, FinishReason: &reason}}, Usage: u})
		}
		return
	}
}

// failed answers a request that failed before anything of its response was
// written: an HTTP error status with an OpenAI error body, unless the client
// is gone.
func (s *Server) failed(ctx context.Context, w http.ResponseWriter, j *job, req *scheduler.Request, err error, log *slog.Logger) {
	log.Info("request failed", "request", req.ID, "err", err)
	if errors.Is(ctx.Err(), context.Canceled) {
		return
	}
	e := schedError(err, w)
	switch e.Code { // the worker refused the prompt it tokenized
	case scheduler.CodeContextLength:
		e.Param = promptParam(j)
	case scheduler.CodeInvalidPrompt:
		e.Code, e.Param = "", promptParam(j)
	}
	writeError(w, e)
}

func (s *Server) idFor(j *job, req *scheduler.Request) string {
	if j.chat {
		return fmt.Sprintf("chatcmpl-%x", req.ID)
	}
	return fmt.Sprintf("cmpl-%x", req.ID)
}

// Header values of an event stream, shared by every response (net/http
// only reads them).
var (
	sseContentType = []string{"text/event-stream"}
	sseNoCache     = []string{"no-cache"}
	sseKeepAlive   = []string{"keep-alive"}
	sseNo          = []string{"no"}
)

func (s *Server) serveStream(ctx context.Context, w http.ResponseWriter, req *scheduler.Request, j *job, log *slog.Logger) {
	rc := http.NewResponseController(w)
	id, created := s.idFor(j, req), time.Now().Unix()
	enc := newChunkEncoder(j.chat, id, created, j.model)
	offset := 0 // completions: characters of output before the next token
	nCalls := 0 // tool calls begun
	// A chunk with logprobs, the one chunk enc does not write by hand.
	logprobsChunk := func(text string, lps []scheduler.TokenLogprob) any {
		if j.chat {
			lp := &chatLogprobs{}
			lp.add(lps)
			return chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: j.model, SystemFingerprint: "krserve",
				Choices: []chatChoice{{Index: 0, Delta: &chatOutMsg{Content: &text}, Logprobs: lp}}}
		}
		lp := newCompletionLogprobs()
		offset = lp.add(lps, offset)
		return completionResponse{ID: id, Object: "text_completion", Created: created, Model: j.model, SystemFingerprint: "krserve",
			Choices: []completionChoice{{Index: 0, Text: text, Logprobs: lp}}}
	}
	// Writes go to net/http's buffer; a flush is one write syscall. Nothing is
	// written before the first event (or the first keep-alive, while a request
	// waits in the queue or in prefill): the status line, the headers, the
	// role chunk and the first token then leave in one write, and a request
	// that fails before its first token gets a real HTTP error status, as a
	// non-streamed one does. After that, flushes happen whenever no event is
	// waiting (everything already queued goes out in one write) and at the end.
	write := func(b []byte) bool {
		_, err := w.Write(b)
		return err == nil
	}
	gone := func() {
		s.m.ClientDisconnects.Inc()
		j.sched.Cancel(req, scheduler.ReasonCancelled, "client disconnected")
	}
	opened := false
	open := func() bool {
		opened = true
		if !j.headersSent { // they went out while the model loaded
			h := w.Header()
			h["Content-Type"], h["Cache-Control"] = sseContentType, sseNoCache
			h["Connection"], h["X-Accel-Buffering"] = sseKeepAlive, sseNo
			w.WriteHeader(200)
		}
		return !j.chat || write(enc.role())
	}
	var tick <-chan time.Time // nil: no keep-alives (NewTicker panics on <= 0)
	if s.cfg.KeepAlive > 0 {
		ka := time.NewTicker(s.cfg.KeepAlive)
		defer ka.Stop()
		tick = ka.C
	}
	keepAlive := func() {
		if !opened && !open() {
			return // the client is gone: the request's context ends the wait
		}
		_, _ = io.WriteString(w, ": keep-alive\n\n")
		_ = rc.Flush()
	}
	unflushed := false
	for {
		ev, ok := req.Poll()
		if !ok {
			if unflushed {
				unflushed = false
				if rc.Flush() != nil {
					gone()
					return
				}
			}
			ev = s.wait(ctx, j.sched, req, tick, keepAlive)
		}
		if !opened {
			if ev.Done && ev.Err != nil && !j.headersSent {
				s.failed(ctx, w, j, req, ev.Err, log)
				return
			}
			if !open() {
				gone()
				return
			}
			unflushed = true
		}
		if ev.Text != "" || len(ev.Logprobs) > 0 {
			var b []byte
			if len(ev.Logprobs) > 0 {
				b = enc.event(logprobsChunk(ev.Text, ev.Logprobs))
			} else {
				b = enc.content(ev.Text)
			}
			if !write(b) {
				gone()
				return
			}
			unflushed = true
		}
		for _, c := range ev.Calls {
			// OpenAI's shape: a call's first chunk has index, id, type and
			// name (with empty arguments); fragments of its arguments follow
			// under the same index. The client concatenates strings per
			// index, so id and name go out once. An entry with a name begins
			// a call (whole, its arguments follow at once); one without is a
			// fragment of the call under way (the scheduler checked the order).
			i, empty, args := c.Index, "", c.Arguments
			var tcs []outToolCall
			if c.Name != "" {
				nCalls++
				tcs = append(tcs, outToolCall{Index: &i, ID: callID(req.ID, i), Type: "function", Function: outToolCallF{Name: c.Name, Arguments: &empty}})
			}
			if args != "" {
				tcs = append(tcs, outToolCall{Index: &i, Function: outToolCallF{Arguments: &args}})
			}
			for _, tc := range tcs {
				if !write(enc.event(chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: j.model, SystemFingerprint: "krserve",
					Choices: []chatChoice{{Index: 0, Delta: &chatOutMsg{ToolCalls: []outToolCall{tc}}, Logprobs: nil}}})) {
					gone()
					return
				}
			}
			unflushed = true
		}
		if !ev.Done {
			continue
		}
		if ev.Err != nil {
			log.Info("request failed", "request", req.ID, "err", ev.Err)
			if ctx.Err() != nil && errors.Is(ctx.Err(), context.Canceled) {
				return
			}
			e := schedError(ev.Err, nil)
			write(enc.event(map[string]any{"error": errorBody(e)}))
			_, _ = io.WriteString(w, "data: [DONE]\n\n")
			_ = rc.Flush()
			return
		}
		reason := finishReason(ev.FinishReason, nCalls, ev.CutCall)
		write(enc.finish(reason))
		if j.includeUsage {
			write(enc.usage(ev.PromptTokens, ev.CompletionTokens, ev.CachedTokens))
		}
		// No flush: returning ends the response, and net/http writes what is
		// buffered together with the chunked terminator in one write.
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
		log.Debug("request done", "request", req.ID, "finish_reason", reason, "completion_tokens", ev.CompletionTokens, "cached_tokens", ev.CachedTokens)
		return
	}
}

// finishReason is OpenAI's finish_reason: "tool_calls" when the model ended
// its turn after calling tools, every call whole. When the output ended inside
// a call (cut: a stop string or max_tokens cut it, so its arguments are as far
// as they were generated and may not parse), the reason stays "stop" or
// "length": a client must not take a cut call for a whole one.
func finishReason(reason string, calls int, cut bool) string {
	if reason == "stop" && calls > 0 && !cut {
		return "tool_calls"
	}
	return reason
}

func errorBody(e *apiError) map[string]any {
	var code, param any
	if e.Code != "" {
		code = e.Code
	}
	if e.Param != "" {
		param = e.Param
	}
	return map[string]any{"message": e.Message, "type": e.Type, "param": param, "code": code}
}

func writeError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.Status, map[string]any{"error": errorBody(e)})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = 500, []byte(`{"error":{"message":"encoding response failed","type":"server_error","param":null,"code":null}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
