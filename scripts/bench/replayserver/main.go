// Command replayserver is the floor for krserve's supervisor-cost benchmark
// (docs/benchmarks.md, "Supervisor cost"): a net/http server that answers
// every POST with the bytes krserve answered to one recorded request,
// written in one piece, and exports
// process_cpu_seconds_total on /metrics like krserve. Whatever CPU it spends
// per request is net/http's, the kernel's and the Go runtime's: what any Go
// front door pays before doing any work of its own.
//
//	go build -o bin/replayserver ./scripts/bench/replayserver
//	bin/replayserver --record http://127.0.0.1:8080 --addr 127.0.0.1:18081 --max-tokens 16
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func main() {
	record := flag.String("record", "", "krserve URL to record one streamed answer from")
	addr := flag.String("addr", "127.0.0.1:18081", "listen address")
	maxTokens := flag.Int("max-tokens", 16, "max_tokens of the recorded request")
	flag.Parse()
	if *record == "" {
		fmt.Fprintln(os.Stderr, "replayserver: --record URL is required")
		os.Exit(2)
	}
	body := fmt.Sprintf(`{"model":"default","messages":[{"role":"user","content":"Say something."}],"max_tokens":%d,"stream":true,"ignore_eos":true}`, *maxTokens)
	resp, err := http.Post(strings.TrimRight(*record, "/")+"/v1/chat/completions", "application/json", strings.NewReader(body))
	if err != nil {
		log.Fatal(err)
	}
	answer, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		log.Fatalf("recording: status %d, %v", resp.StatusCode, err)
	}
	// krserve writes nothing before the first token and then flushes only
	// when no event waits; an instant worker's tokens arrive together, so
	// the whole answer can leave in one write: the cheapest way to send it,
	// and so the floor (krserve may flush more often than this).

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("POST /", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		w.WriteHeader(200)
		_, _ = w.Write(answer)
	})
	log.Fatal(http.ListenAndServe(*addr, mux))
}
