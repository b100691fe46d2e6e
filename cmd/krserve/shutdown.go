package main

import (
	"log/slog"
	"time"
)

// drainer is what the stop sequence needs from the scheduler.
type drainer interface {
	Drain() <-chan struct{}
	Abort(msg string)
}

// stopPlan is how `krserve up` stops after a signal.
type stopPlan struct {
	// Delay: /ready already answers 503 but requests are still admitted, so a
	// load balancer's health check takes the instance out of rotation before
	// it refuses anything (--drain-delay).
	Delay time.Duration
	// Timeout: after the delay, new requests get 503 and the ones in flight
	// have this long to finish before they are failed (--drain-timeout).
	Timeout time.Duration
}

// drainAfterSignal runs the stop sequence once a signal came: notReady (so
// /ready turns 503 while requests are still admitted), the delay, then the
// scheduler's drain, bounded by the timeout. A failure on errs during the
// delay ends the delay at once and is returned. after is time.After outside
// tests.
func drainAfterSignal(p stopPlan, notReady func(), sched drainer, errs <-chan error,
	after func(time.Duration) <-chan time.Time, log *slog.Logger) error {
	notReady()
	var failure error
	if p.Delay > 0 {
		log.Info("shutting down: not ready any more; still admitting requests for the drain delay", "drain_delay", p.Delay)
		select {
		case <-after(p.Delay):
		case failure = <-errs:
			log.Error("failure during the drain delay", "err", failure)
		}
	}
	log.Info("shutting down: draining", "drain_timeout", p.Timeout)
	drainFor(p.Timeout, sched, after, log)
	return failure
}

// drainFor refuses new requests and waits up to timeout for the ones in
// flight; what is left then fails.
func drainFor(timeout time.Duration, sched drainer, after func(time.Duration) <-chan time.Time, log *slog.Logger) {
	select {
	case <-sched.Drain():
		log.Info("drained: no request in flight")
	case <-after(timeout):
		log.Warn("drain timeout passed; failing what is left")
		sched.Abort("server shut down before the request finished")
	}
}
