package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/krserve/krserve/metrics"
	"github.com/krserve/krserve/models"
	"github.com/krserve/krserve/supervisor"
)

// Models is what the front door needs from the owner of the served models
// (models.Manager): a request names a model, waits while it loads, and holds
// it until the response is done.
type Models interface {
	Resolve(requested string) (name string, ok bool)
	Acquire(ctx context.Context, requested string, tick <-chan time.Time, onTick func()) (*models.Lease, error)
	Status() []models.Status
	StatusOf(name string) (models.Status, bool)
	Load(ctx context.Context, name string) error
	Unload(ctx context.Context, name string) error
}

// Model is a loaded model as a request uses it: its scheduler and pool.
type Model interface {
	Scheduler
	Pool
}

// modelReadier answers /ready?model=NAME.
type modelReadier interface {
	ReadyModel(name string) (ok bool, body any)
}

// NewModels builds a front door for one or more models owned by ms.
func NewModels(cfg Config, ms Models, ops Ops, m *metrics.Metrics, log *slog.Logger, ids func() uint64) *Server {
	s := New(cfg, nil, nil, ops, m, log, ids)
	s.models = ms
	return s
}

// routeModels adds the model routes: Ollama's /api/ps and load and unload.
func (s *Server) routeModels(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/ps", s.v1(s.ps))
	mux.HandleFunc("POST /api/models/{name}/load", s.v1(s.loadModel))
	mux.HandleFunc("POST /api/models/{name}/unload", s.v1(s.unloadModel))
}

// hello is the model's announcement for validating a request before it is
// routed: the one pool's (nil before it loaded); with several models nil, and
// lateChecks repeats what needs it once the request holds its model.
func (s *Server) hello() *supervisor.Hello {
	if s.models != nil {
		return nil
	}
	return s.pool.Hello()
}

// modelError maps why a model cannot serve to an HTTP error.
func modelError(err error, w http.ResponseWriter, requested string) *apiError {
	var me *models.Error
	if !errors.As(err, &me) {
		if errors.Is(err, context.DeadlineExceeded) {
			return &apiError{Status: 504, Type: "timeout_error", Code: "timeout", Message: fmt.Sprintf("request timed out waiting for model %q to load", requested)}
		}
		return &apiError{Status: 500, Type: "server_error", Message: err.Error()}
	}
	if me.RetryAfter > 0 && w != nil {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(me.RetryAfter.Seconds()))))
	}
	switch me.Code {
	case models.CodeNotFound:
		return &apiError{Status: 404, Type: "invalid_request_error", Code: "model_not_found", Param: "model", Message: me.Msg}
	case models.CodeBusy:
		return &apiError{Status: 429, Type: "rate_limit_error", Code: me.Code, Message: me.Msg}
	default: // unavailable, too large, draining
		return &apiError{Status: 503, Type: "server_error", Code: me.Code, Message: me.Msg}
	}
}

// acquire holds the job's model for the request, loading it if needed. A
// stream that waits gets its headers and SSE keep-alive comments meanwhile,
// as it does while queued.
func (s *Server) acquire(ctx context.Context, w http.ResponseWriter, j *job) (*models.Lease, Model, *apiError) {
	var tick <-chan time.Time
	onTick := func() {}
	if j.stream && s.cfg.KeepAlive > 0 {
		t := time.NewTicker(s.cfg.KeepAlive)
		defer t.Stop()
		tick = t.C
		rc := http.NewResponseController(w)
		onTick = func() {
			if !j.headersSent {
				j.headersSent = true
				h := w.Header()
				h["Content-Type"], h["Cache-Control"] = sseContentType, sseNoCache
				h["Connection"], h["X-Accel-Buffering"] = sseKeepAlive, sseNo
				w.WriteHeader(200)
			}
			_, _ = io.WriteString(w, ": keep-alive\n\n")
			_ = rc.Flush()
		}
	}
	lease, err := s.models.Acquire(ctx, j.model, tick, onTick)
	if err != nil {
		return nil, nil, modelError(err, w, j.model)
	}
	mod, ok := lease.Instance().(Model)
	if !ok {
		lease.Release(nil)
		return nil, nil, &apiError{Status: 500, Type: "server_error", Message: "the loaded model cannot take requests"}
	}
	return lease, mod, nil
}

// lateChecks validates what needs the model's vocabulary once the request
// holds it (a model that was not loaded when the request was validated).
func lateChecks(j *job, h *supervisor.Hello) *apiError {
	if h == nil {
		return nil
	}
	p := &j.params
	for id := range p.LogitBias {
		if h.Vocab > 0 && int(id) >= h.Vocab && p.LogitBias[id] != -1e9 {
			return invalid("logit_bias", "logit_bias key %q is not a token id of this model", strconv.Itoa(int(id)))
		}
	}
	if j.ignoreEOS {
		if p.LogitBias == nil {
			p.LogitBias = map[int32]float64{}
		}
		for _, e := range h.EOS {
			p.LogitBias[e] = -1e9
		}
	}
	return nil
}

// refuseJob answers a request that fails before it was submitted: an HTTP
// error, or, once a stream's headers went out while its model loaded, an
// error event.
func (s *Server) refuseJob(w http.ResponseWriter, r *http.Request, j *job, e *apiError) {
	if !j.headersSent {
		s.refuse(w, r, e)
		return
	}
	s.log.Info("request refused", "path", r.URL.Path, "status", e.Status, "param", e.Param, "err", e.Message)
	b, _ := json.Marshal(map[string]any{"error": errorBody(e)})
	_, _ = fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", b)
}

// parseKeepAlive reads a request's keep_alive (Ollama's): a number of
// seconds or a duration string; negative keeps the model loaded, 0 unloads
// it once the request is done.
func parseKeepAlive(raw json.RawMessage) (*time.Duration, *apiError) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, invalid("keep_alive", "keep_alive must be a number of seconds or a duration such as \"5m\"")
	}
	var text string
	switch x := v.(type) {
	case float64:
		text = strconv.FormatFloat(x, 'f', -1, 64)
	case string:
		text = x
	default:
		return nil, invalid("keep_alive", "keep_alive must be a number of seconds or a duration such as \"5m\"")
	}
	d, err := models.ParseTTL(text)
	if err != nil {
		return nil, invalid("keep_alive", "keep_alive %v", err)
	}
	return &d, nil
}

// modelList is /v1/models with several models: every configured one, with
// its state (and aliases) in extra fields.
func (s *Server) modelList(w http.ResponseWriter) {
	created := s.created().Unix()
	data := []map[string]any{}
	for _, st := range s.models.Status() {
		e := map[string]any{"id": st.Name, "object": "model", "created": created, "owned_by": "krserve", "state": st.State}
		if len(st.Aliases) > 0 {
			e["aliases"] = st.Aliases
		}
		data = append(data, e)
	}
	writeJSON(w, 200, map[string]any{"object": "list", "data": data})
}

// psModel is one entry of /api/ps: Ollama's fields, then krserve's.
type psModel struct {
	Name      string    `json:"name"`
	Model     string    `json:"model"`
	Size      int64     `json:"size"`
	SizeVRAM  int64     `json:"size_vram"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	models.Status
}

// ps is GET /api/ps: the models that are loaded or on their way in or out,
// with ?all=1 every configured model.
func (s *Server) ps(w http.ResponseWriter, r *http.Request) {
	all := r.URL.Query().Get("all") != ""
	out := []psModel{}
	for _, st := range s.models.Status() {
		if !all && st.State == models.StateUnloaded {
			continue
		}
		out = append(out, psModel{Name: st.Name, Model: st.Path, Size: st.Bytes(), ExpiresAt: st.ExpiresAt, Status: st})
	}
	writeJSON(w, 200, map[string]any{"models": out})
}

// pathModel resolves the {name} of an /api/models path (an alias too), or
// answers 404 model_not_found.
func (s *Server) pathModel(w http.ResponseWriter, r *http.Request) (string, bool) {
	requested := r.PathValue("name")
	name, ok := s.models.Resolve(requested)
	if !ok {
		writeError(w, modelError(&models.Error{Code: models.CodeNotFound, Msg: fmt.Sprintf("model %q is not served here", requested)}, w, requested))
	}
	return name, ok
}

// loadModel is POST /api/models/{name}/load: it answers once the model is
// loaded, with its status.
func (s *Server) loadModel(w http.ResponseWriter, r *http.Request) {
	name, ok := s.pathModel(w, r)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.DefaultTimeout)
	defer cancel()
	if err := s.models.Load(ctx, name); err != nil {
		if errors.Is(r.Context().Err(), context.Canceled) {
			return
		}
		s.log.Info("load refused", "model", name, "err", err)
		writeError(w, modelError(err, w, name))
		return
	}
	st, _ := s.models.StatusOf(name)
	writeJSON(w, 200, st)
}

// unloadModel is POST /api/models/{name}/unload: the model finishes its
// requests, then stops; it answers once it has.
func (s *Server) unloadModel(w http.ResponseWriter, r *http.Request) {
	name, ok := s.pathModel(w, r)
	if !ok {
		return
	}
	if err := s.models.Unload(r.Context(), name); err != nil {
		if errors.Is(r.Context().Err(), context.Canceled) {
			return
		}
		writeError(w, modelError(err, w, name))
		return
	}
	st, _ := s.models.StatusOf(name)
	writeJSON(w, 200, st)
}

// readyModel answers /ready?model=NAME.
func (s *Server) readyModel(w http.ResponseWriter, requested string) {
	mr, ok := s.ops.(modelReadier)
	name, known := requested, s.models == nil && requested == s.cfg.ModelName
	if s.models != nil {
		name, known = s.models.Resolve(requested)
	}
	if !known || !ok {
		writeError(w, &apiError{Status: 404, Type: "invalid_request_error", Code: "model_not_found", Param: "model",
			Message: fmt.Sprintf("model %q is not served here", requested)})
		return
	}
	ready, body := mr.ReadyModel(name)
	status := 200
	if !ready {
		status = 503
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, status, body)
}

// knownNames lists the model ids for an error message.
func (s *Server) knownNames() string {
	if s.models == nil {
		return strconv.Quote(s.cfg.ModelName)
	}
	var names []string
	for _, st := range s.models.Status() {
		names = append(names, strconv.Quote(st.Name))
	}
	return strings.Join(names, ", ")
}
