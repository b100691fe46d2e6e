"""Per-step timing of a worker's prefill and decode (a measuring aid, not part of krserve).

    KRSERVE_WORKER_TTFT_TRACE=1 PYTHONPATH=worker-py:scripts/bench/ttft_trace bin/krserve up ...

Python imports ``sitecustomize`` at start-up; with the variable set, this one
wraps mlx-lm's ``PromptProcessingBatch.prompt`` and ``GenerationBatch.next``
and some of the worker's methods, and logs to stderr (the supervisor's log):

    TRACE <unix time> prefill B=16 max=512 real=8110 padded=8192 idx=1047 688ms
    TRACE <unix time> decode B=16 9ms
    TRACE <unix time> insert_pending 82ms      (worker phases over 2 ms)

``B`` sequences prefilled together, ``max`` tokens per sequence in this step
(the others right-padded to it), ``idx`` the batch's KV length before the step.
Each step ends in an ``mx.eval``, so a step's time is its device time too.
docs/benchmarks.md, "Prompt cache: time to first token".
"""
import os
import sys
import time

if os.environ.get("KRSERVE_WORKER_TTFT_TRACE") == "1":
    import builtins

    _import = builtins.__import__
    _done = set()

    def _out(s):
        print(f"TRACE {time.time():.3f} {s}", file=sys.stderr, flush=True)

    def _timed(cls, name, label):
        orig = getattr(cls, name)

        def f(self, *a, **k):
            t = time.perf_counter()
            r = orig(self, *a, **k)
            dt = (time.perf_counter() - t) * 1000
            if dt > 2:
                _out(f"{label} {dt:.0f}ms")
            return r

        setattr(cls, name, f)

    def _patch_generate(g):
        prompt = g.PromptProcessingBatch.prompt

        def traced_prompt(self, tokens):
            if not tokens:
                return prompt(self, tokens)
            t = time.perf_counter()
            lens = [len(x) for x in tokens]
            idx = getattr(self.prompt_cache[0], "_idx", None) if self.prompt_cache else None
            r = prompt(self, tokens)
            _out(f"prefill B={len(lens)} max={max(lens)} real={sum(lens)} "
                 f"padded={len(lens) * max(lens)} idx={idx} {(time.perf_counter() - t) * 1000:.0f}ms")
            return r

        g.PromptProcessingBatch.prompt = traced_prompt
        step = g.GenerationBatch.next

        def traced_next(self):
            t = time.perf_counter()
            n = len(self.uids)
            r = step(self)
            _out(f"decode B={n} {(time.perf_counter() - t) * 1000:.0f}ms")
            return r

        g.GenerationBatch.next = traced_next

    def _patch_worker(w):
        for name in ("insert_pending", "checkpoint", "finish", "start_fast"):
            if hasattr(w.Worker, name):
                _timed(w.Worker, name, name)

    def _hook(name, *a, **k):
        m = _import(name, *a, **k)
        g = sys.modules.get("mlx_lm.generate")
        if "g" not in _done and g is not None and hasattr(g, "GenerationBatch"):
            _done.add("g")
            _patch_generate(g)
        w = sys.modules.get("krserve_worker.worker")
        if "w" not in _done and w is not None and hasattr(w, "Worker"):
            _done.add("w")
            _patch_worker(w)
        r = sys.modules.get("krserve_worker.reader")
        if "r" not in _done and r is not None and hasattr(r, "Reader"):
            _done.add("r")
            _timed(r.Reader, "tokenize", "reader.tokenize")
        return m

    builtins.__import__ = _hook
