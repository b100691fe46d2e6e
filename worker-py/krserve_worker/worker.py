"""The worker: load the model, speak protocol v4 (docs/protocol.md), generate.

``main`` parses the flags (``args.py``), loads OpenBLAS where the venv has it
(``blas.py``) and then the model (on the CPU, a quantized one held as float32:
``cpuweights.py``), says ``hello``, starts the reader thread and runs the
engine, ``Worker``, until told to exit. ``Worker`` is the main thread's
loop: take the queued messages, start the new requests (``Request``,
``request.py``), step the generator, write the frames.

Threads:

- The main thread owns MLX: ``mlx_lm.load``, the ``BatchGenerator`` and every
  ``insert``/``next``/``remove``. A request that arrives when nothing else runs
  (and whose prompt, less what the cache holds, is at most ``FAST_PATH_PREFILL``
  tokens and one prefill step) is decoded with ``generate_step``
  instead, stream_generate's loop: a batch of one pays the batch's per-step
  work. Requests that arrive meanwhile go to the ``BatchGenerator`` and both
  advance one token per loop until the lone one ends
  (``--no-single-fast-path`` turns this off). Between two ``next()`` calls it drains the
  message queue without blocking (it blocks only when idle). All ``gen``
  messages drained together go into one ``insert`` call, so their prefill is
  batched; cancels and shutdown are applied at step boundaries (a long prefill
  is cut into ``--prefill-step`` token chunks, one per ``next()``).
- The reader thread (``reader.py``) reads and parses frames and queues them,
  except ``ping``, which it answers itself. It also tokenizes the text or chat
  messages of a ``gen`` before queueing it (tokenizers only, no MLX), so
  tokenizing never waits for a decode step and the main thread gets ids; a
  prompt the tokenizer refuses is answered from here. ``pong`` reports values
  the main thread caches after each step.

The prompt cache (``prompt_cache.py``): before a request is prefilled, the
nearest cached KV state of its prompt is fetched and only the rest is
prefilled, on the fast path and in the batch alike; the end of a chat's system
prompt, the end of each prompt and each finished (or cancelled) sequence are
stored back. New conversations that share a system prompt the cache lacks
wait for the first one's checkpoint there, so a burst prefills it once
(``Followers``).

Both threads write through one ``FrameWriter`` (a lock and an ``os.write``
loop); frames produced in one step are written as one buffer.

Token accounting: ``tok.ids`` are the generated tokens that make up the output
(a final EOS is not sent: it has no text and ends the request); ``ctoks``
counts every token this worker generated, EOS included, which is what
``max_tokens`` limits. ``ptoks`` is ``len(prompt) + len(resume)``, the tokens
prefilled.

What the engine leaves to other modules: the generator (``batchgen.py``,
mlx-lm's ``BatchGenerator`` with its grammar masks, ``batchmask.py``),
validating a gen (``params.py``), samplers and logits processors
(``sampling.py``), grammars (``grammar.py``), tool calls (``tools.py``), the
output text and stop strings (``textstream.py``), frames (``protocol.py``,
``channel.py``), the device's memory (``device.py``), fault injection
(``faults.py``), log lines and exit statuses (``log.py``); a worker that is a
group of ranks subclasses ``Worker`` (``ranks.py``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import time

from . import __version__, blas, device, faults, grammar, protocol, tools
from .args import default_prefill_step, parse_args
from .channel import FrameReader, FrameWriter
from .cpuweights import dequantize_for_cpu
from .log import EXIT_LOAD, EXIT_NO_MODEL, EXIT_OK, EXIT_PROTOCOL, log
from .params import InvalidRequest, parse_gen
from .prompt_cache import (Followers, PromptCache, copy_cache, device_budget, prefill,
                           prompt_checkpoints_needed, with_prefix)
from .protocol import ProtocolError
from .reader import CONSTRAINT, SYSTEM_END, TOKENIZED, Constraint, Reader, Shared
from .request import Request
from .textstream import TextStream

# The fast path prefills synchronously and decodes beside the batch: only for
# a short rest (what the cache does not hold), whatever the step.
FAST_PATH_PREFILL = 512
# Worker.gather: how long a prefill step about to start waits, in all, for
# gens the reader is still tokenizing (a 4,600-token conversation takes ~8 ms,
# a burst of 16 ~130 ms; a prefill step of 16 cached turns ~1 s on the H200).
GATHER_S = 0.25


class Worker:
    # Wait for gens the reader is tokenizing before a prefill step (gather);
    # a group's ranks do not: their loops must take the same items in step.
    gathers = True

    def __init__(self, model, tokenizer, *, vocab: int, ctx: int, args, writer: FrameWriter,
                 shared: Shared, q: queue.Queue, faults: faults.Faults | None = None):
        import mlx.core as mx

        from . import batchgen

        self.mx = mx
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.ctx = ctx
        self.writer = writer
        self.shared = shared
        self.q = q
        self.eos = set(int(e) for e in tokenizer.eos_token_ids)
        self.mask = grammar.pick_mask()
        try:  # the grammar masks of a decode step, all rows at once (batchmask.py)
            masker = grammar.BatchMasker(vocab, self.mask)
        except ImportError:  # no llguidance: no constrained requests either
            masker = None
        self.gen, how = batchgen.generator(
            model,
            masker,
            stop_tokens=[[e] for e in sorted(self.eos)],
            completion_batch_size=args.max_batch,
            prefill_batch_size=args.prefill_batch,
            prefill_step_size=args.prefill_step,
        )
        log(f"batch generator: {how}")
        from mlx_lm.generate import generate_step

        self.generate_step = generate_step
        self.single_fast_path = getattr(args, "single_fast_path", True)
        self.prefill_step = args.prefill_step
        # The single-sequence fast path: a request that arrives when nothing
        # else runs is decoded by generate_step (stream_generate's loop, less
        # per-step work than a batch of one). Requests that arrive while it
        # runs go to the BatchGenerator; both advance one token per loop
        # until the fast one ends. It is in self.reqs like any other.
        self.fast: Request | None = None
        self.fast_iter = None
        self.fast_cache = None  # its KV cache and the tokens it holds
        self.fast_tokens: list[int] = []
        self.pc = PromptCache(getattr(args, "prompt_cache_bytes", 0))
        self.prompt_end_checkpoints = self.pc.enabled and prompt_checkpoints_needed(model)
        self.reqs: dict[int, Request] = {}  # id -> running request (generator or fast path)
        self.by_uid: dict[int, Request] = {}
        self.pending: list[Request] = []  # validated, not yet inserted
        # Pending requests waiting for another's system prompt checkpoint.
        self.followers = Followers()
        self.noise = os.environ.get("KRSERVE_WORKER_NOISE") == "1"
        self.faults = faults
        self._libc = None
        self.tok_cache: dict[int, str] = {}  # token id -> its text (logprobs)
        self.publish()

    # -- bookkeeping --

    def publish(self):
        s = self.shared
        s.active = len(self.reqs) + len(self.pending) + len(self.followers)
        s.mem_active = int(self.mx.get_active_memory())
        s.mem_peak = int(self.mx.get_peak_memory())
        s.cache = self.pc.nbytes
        s.evicted = self.pc.evicted

    def active_bytes(self) -> int:
        """KV bytes the running sequences hold (the prompt cache's budget
        covers them too)."""
        n = self.gen.prompt_cache_nbytes
        if self.fast_cache is not None:
            n += sum(c.nbytes for c in self.fast_cache)
        return n

    def finish(self, req: Request, remove: bool, final=None):
        """Forget a request that ended. ``remove``: it is still in the batch
        generator; ``final``: the (cache, tokens) the generator returned with
        its last token. What it holds goes to the prompt cache."""
        saved = None
        if req is self.fast:
            saved = (self.fast_cache, self.fast_tokens)
            self.fast, self.fast_iter = None, None  # dropping the generator frees its cache
            self.fast_cache, self.fast_tokens = None, []
        elif remove and req.uid is not None:
            got = self.gen.remove([req.uid], return_prompt_caches=self.pc.enabled)
            saved = got.get(req.uid)
        elif final is not None:
            saved = final
        self.reqs.pop(req.p.id, None)
        if req.uid is not None:
            self.by_uid.pop(req.uid, None)
        if saved is not None and saved[0] and len(saved[1]) > req.cached:
            self.pc.store(list(saved[1]), saved[0], "assistant", self.active_bytes())
        self.release(req.p.id)  # a leader that ended before its checkpoint

    # -- messages --

    def handle(self, msg, out: list):
        t = msg["t"]
        rid = msg["id"]
        if t == "gen":
            if rid in self.reqs or any(r.p.id == rid for r in self.pending + self.followers.parked()):
                raise ProtocolError(f"gen for id {rid}, which is already running")
            self.on_gen(msg, out)
        elif t == "cancel":
            self.on_cancel(rid, out)

    def on_gen(self, msg, out):
        from .sampling import build_processors, build_sampler

        rid = msg["id"]
        con: Constraint | None = msg.get(CONSTRAINT)
        calls = None
        try:
            p = parse_gen(msg, self.vocab, self.ctx, msg.get(TOKENIZED))
            sys_end = msg.get(SYSTEM_END, 0)
            text = TextStream(self.tokenizer.detokenizer, p.stop)
            if con is not None and con.fmt is not None:
                # Content and calls are counted apart: the text is replayed
                # whole and CallStream skips what was delivered.
                calls = tools.CallStream(con.fmt, con.treq.tools, p.sent, p.sent_calls, p.sent_args,
                                         stream=con.treq.constrained)
                if p.resume:
                    text.replay(p.resume, 0)
            elif p.resume:
                text.replay(p.resume, p.sent)
        except InvalidRequest as e:
            out.append(protocol.error(rid, e.code, str(e)))
            return
        except ValueError as e:
            out.append(protocol.error(rid, "invalid", str(e)))
            return
        req = Request(p, text, sys_end)
        if self.faults:
            req.fault = self.faults.arm(msg)
        req.calls = calls
        if p.resume:
            # A stop string already complete in the replayed text (the
            # previous worker died between the token that completed it and
            # its done) ends it now. So does a resume with no token left to
            # generate (it asked for none, or it fills the context): the text
            # the dead worker held back is flushed.
            stop = text.stop_pending()
            if stop or p.max_tokens == 0:
                if not stop:
                    text.finalize()
                rest, stopped = text.take(final=True)
                rest, rest_calls = req.output(rest, final=True)
                out.append(protocol.done(rid, "stop" if stopped else "length", req.ptoks, 0, rest,
                                         calls=rest_calls, cut_call=req.cut_call))
                return
            if calls is not None:
                req.carry = calls.feed(text.take()[0])
        try:
            req.sampler = build_sampler(p, self.vocab)
            req.processors = build_processors(p)
            if con is not None and con.matcher is not None:
                req.grammar = grammar.GrammarProcessor(con.matcher, self.vocab, self.mask)
                req.processors = list(req.processors) + [req.grammar]  # last: masks the rest
        except Exception as e:
            out.append(protocol.error(rid, "invalid", f"bad sampling parameters: {e}"))
            return
        self.pending.append(req)

    def on_cancel(self, rid, out):
        for i, r in enumerate(self.pending):
            if r.p.id == rid:
                del self.pending[i]
                out.append(protocol.done(rid, "cancelled", r.ptoks, 0))
                self.release(rid)
                return
        parked = self.followers.cancel(rid)
        if parked is not None:
            out.append(protocol.done(rid, "cancelled", parked.ptoks, 0))
            return
        req = self.reqs.get(rid)
        if req is None:
            return  # unknown or already finished: not an error
        self.finish(req, remove=True)
        out.append(protocol.done(rid, "cancelled", req.ptoks, req.ctoks, cached=req.cached))

    def release(self, rid: int) -> None:
        """Leader ``rid`` stored its system checkpoint or left: its followers
        are fetched again (now a hit) and inserted with the next batch."""
        for r in self.followers.release(rid):
            r.cache, r.cached = None, 0
            self.pending.append(r)

    def insert_pending(self, out) -> bool:
        """Start the pending requests (batch or fast path); whether any started."""
        if not self.pending:
            return False
        go, parked = [], {}
        for r in self.pending:
            if r.cache is None and not r.cached:
                r.cache, r.cached = self.pc.fetch(r.tokens)
            key = r.system_key() if self.pc.enabled else None
            if key is not None and not self.followers.admit(key, r.p.id):
                # Another new conversation is prefilling this system prompt:
                # wait for its checkpoint rather than prefill it again.
                r.cache, r.cached = None, 0
                parked.setdefault(self.followers.park(key, r.p.id, r), []).append(r.p.id)
            else:
                if r.fault:
                    r.fault.on_start()
                go.append(r)
        self.pending = go
        for leader, ids in parked.items():
            log(f"ids {ids} wait for the system prompt of id {leader}")
        if not go:
            return False
        if (self.single_fast_path and not self.reqs and len(go) == 1 and not self.followers
                and len(go[0].tokens) - go[0].cached <= min(self.prefill_step, FAST_PATH_PREFILL)):
            # Alone (nobody waiting for it either), and what is left to prefill
            # is short and fits one step (a longer one goes to the generator,
            # whose chunked prefill can be cancelled and which later arrivals
            # join).
            self.start_fast(self.pending.pop())
        else:
            self.insert_batch(out)
        self.pc.trim(self.active_bytes())
        return True

    def start_fast(self, r: Request):
        from mlx_lm.models.cache import make_prompt_cache

        cache = r.cache if r.cache is not None else make_prompt_cache(self.model)
        r.cache = None
        toks, pos = r.tokens, r.cached
        self.fast_cache, self.fast_tokens = cache, list(toks)
        # Prefill to each checkpoint and store a copy there (generate_step
        # prefills the rest: at least the last token).
        for stop, kind in r.checkpoints(self.prompt_end_checkpoints):
            prefill(self.model, cache, toks, pos, stop, self.prefill_step)
            pos = stop
            self.pc.store(toks[:stop], copy_cache(cache), kind, self.active_bytes())
            if kind == "system":
                self.release(r.p.id)
        # generate_step shows logits processors only the tokens it is given:
        # they see the prefix the cache and the checkpoints took too.
        processors = [with_prefix(f, toks[:pos]) for f in r.processors] if pos else r.processors
        self.fast = r
        self.fast_iter = self.generate_step(
            self.mx.array(toks[pos:]), self.model, max_tokens=r.p.max_tokens, sampler=r.sampler,
            logits_processors=processors or None, prefill_step_size=self.prefill_step,
            prompt_cache=cache)
        self.reqs[r.p.id] = r
        log(f"fast path: id {r.p.id}" + (f", {r.cached} cached" if r.cached else ""))

    def insert_batch(self, out):
        batch, self.pending = self.pending, []
        segments = []
        for r in batch:
            n, stops = r.cached, r.checkpoints(self.prompt_end_checkpoints)
            # The generator stops at each segment's end (and splits off the
            # last token itself, which ends the "user" checkpoint).
            if stops and stops[0][1] == "system":
                segments.append([r.tokens[n:stops[0][0]], r.tokens[stops[0][0]:]])
            else:
                segments.append([r.tokens[n:]])
            r.kinds = [kind for _, kind in stops]
        try:
            uids = self.gen.insert_segments(
                segments,
                max_tokens=[r.p.max_tokens for r in batch],
                caches=[r.cache for r in batch],
                all_tokens=[r.tokens[:r.cached] for r in batch],
                samplers=[r.sampler for r in batch],
                logits_processors=[r.processors for r in batch],
            )
        except Exception as e:
            log(f"insert failed: {e!r}")
            for r in batch:
                out.append(protocol.error(r.p.id, "internal", f"insert failed: {e}"))
                self.release(r.p.id)
            return
        cached = [r.cached for r in batch]
        log(f"inserted {len(batch)} request(s): ids {[r.p.id for r in batch]}"
            + (f", cached {cached}" if any(cached) else ""))
        for r, uid in zip(batch, uids):
            r.cache = None  # the generator holds it now
            r.uid = uid
            self.reqs[r.p.id] = r
            self.by_uid[uid] = r

    # -- generation --

    def step(self, out):
        if self.fast is not None:
            self.step_fast(out)
        if self.by_uid:
            self.step_batch(out)

    def step_fast(self, out):
        req = self.fast
        token, logprobs = next(self.fast_iter)
        token = int(token)
        self.fast_tokens.append(token)  # generate_step has fed it to the cache already
        # BatchGenerator's finish reasons: "stop" on EOS, "length" at max_tokens.
        if token in self.eos:
            reason = "stop"
        elif req.ctoks + 1 >= req.p.max_tokens:
            reason = "length"
        else:
            reason = None
        lp = self.logprob_data(req.p.top_logprobs, token, logprobs) if req.p.logprobs else None
        self.on_token(req, token, reason, out, lp)  # with a reason, it also finishes req

    def step_batch(self, out):
        prompt_responses, responses = self.gen.next()
        if self.pc.enabled:
            self.checkpoint(prompt_responses)
        for r in responses:
            req = self.by_uid.get(r.uid)
            if req is None:
                continue
            lp = self.logprob_data(req.p.top_logprobs, int(r.token), r.logprobs) if req.p.logprobs else None
            final = (r.prompt_cache, r.all_tokens) if r.finish_reason is not None else None
            self.on_token(req, int(r.token), r.finish_reason, out, lp, final)

    def checkpoint(self, prompt_responses):
        """Store the KV state of sequences whose prefill reached a checkpoint
        (a segment's end) in this step."""
        uids = [r.uid for r in prompt_responses
                if r.end_of_segment and not r.end_of_prompt
                and r.uid in self.by_uid and self.by_uid[r.uid].kinds]
        if not uids:
            return
        for uid, (cache, tokens) in self.gen.extract_cache(uids).items():
            req = self.by_uid[uid]
            kind = req.kinds.pop(0)
            self.pc.store(list(tokens), cache, kind, self.active_bytes())
            if kind == "system":
                self.release(req.p.id)

    def token_text(self, i: int) -> str:
        s = self.tok_cache.get(i)
        if s is None:
            s = self.tokenizer.decode([i])  # invalid UTF-8 comes back as U+FFFD
            self.tok_cache[i] = s
        return s

    def logprob_data(self, k: int, token: int, logprobs):
        """The ``tok`` fields for one token of a request that asked for logprobs:
        its logprob and text, and the ``k`` best (logprob, text), best first.
        ``logprobs`` is the step's log-softmax over the vocabulary (after logit
        processors, as mlx-lm reports it)."""
        mx = self.mx
        lp = logprobs.astype(mx.float32)
        chosen = lp[token]
        if k > 0:
            k = min(k, lp.shape[-1])
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[idx]
            order = mx.argsort(-vals)
            idx, vals = idx[order], vals[order]
            mx.eval(chosen, idx, vals)
            top_ids, top_lps = idx.tolist(), vals.tolist()
        else:
            mx.eval(chosen)
            top_ids, top_lps = [], []
        return (chosen.item(), self.token_text(token), top_lps,
                [self.token_text(i) for i in top_ids])

    def on_token(self, req: Request, token: int, finish_reason, out, lp=None, final=None):
        rid = req.p.id
        req.ctoks += 1
        if req.grammar is not None and req.grammar.error:
            # The matcher refused a sampled token: a bug, never silently unconstrained.
            log(f"request {rid}: {req.grammar.error}")
            out.append(protocol.error(rid, "internal", req.grammar.error))
            self.finish(req, remove=finish_reason is None)
            return
        if token in self.eos and finish_reason == "stop":
            # EOS: its text is not output; flush what was held back.
            req.text.finalize()
            rest, _ = req.text.take(final=True)
            rest, calls = req.output(rest, final=True)
            out.append(protocol.done(rid, "stop", req.ptoks, req.ctoks, rest, calls=calls, cached=req.cached,
                                     cut_call=req.cut_call))
            self.finish(req, remove=False, final=final)
            return
        req.text.add(token)
        text, stopped = req.text.take()
        text, calls = req.output(text)
        if lp is None:
            out.append(protocol.tok(rid, [token], text, calls=calls))
        else:
            chosen, tok_text, top_lps, top_toks = lp
            out.append(protocol.tok(rid, [token], text, lps=[chosen], toks=[tok_text],
                                    top_lps=[top_lps] if top_lps else None,
                                    top_toks=[top_toks] if top_toks else None, calls=calls))
        if req.fault and req.fault.after_token(req.ctoks):
            self.write(out)  # the token reaches the supervisor; its done does not
            out.clear()
            faults.crash(f"segv-after-tokens: request {rid} after {req.ctoks} token(s)")
        if not stopped and req.p.one_call and req.calls is not None and req.calls.n_calls:
            stopped = True  # parallel_tool_calls false: the first call ends the answer
        if stopped:
            rest, calls = req.output("", final=True)
            out.append(protocol.done(rid, "stop", req.ptoks, req.ctoks, rest, calls=calls, cached=req.cached,
                                     cut_call=req.cut_call))
            self.finish(req, remove=finish_reason is None, final=final)
        elif finish_reason is not None:  # "length"
            req.text.finalize()
            rest, stopped = req.text.take(final=True)
            rest, calls = req.output(rest, final=True)
            reason = "stop" if stopped else "length"
            out.append(protocol.done(rid, reason, req.ptoks, req.ctoks, rest, calls=calls, cached=req.cached,
                                     cut_call=req.cut_call))
            self.finish(req, remove=False, final=final)

    def make_noise(self):
        """Test hook (KRSERVE_WORKER_NOISE=1): write junk to fd 1 three ways."""
        print("noise")
        os.write(1, b"c-noise\n")
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        buf = b"libc-noise\n"
        self._libc.write(1, buf, len(buf))

    # -- loop --

    def write(self, frames):
        if frames:
            self.writer.write(b"".join(frames))

    def take(self, idle: bool) -> list:
        """This loop's queue items: block for one when idle, then take
        whatever else is queued. (A group's ranks share them: ranks.py.)"""
        items = []
        try:
            items.append(self.q.get() if idle else self.q.get_nowait())
            while True:
                items.append(self.q.get_nowait())
        except queue.Empty:
            pass
        return items

    def gather(self, deadline: float) -> list:
        """Queue items of the gens the reader is tokenizing now, waited for
        until ``deadline`` (``time.monotonic``), and whatever else is queued.

        Called when requests were just inserted and their prefill step is
        next: gens the reader read meanwhile (a burst whose frames came
        while this thread was inserting) join that step instead of waiting a
        whole step for the next one. Requests the reader has not read are
        not waited for."""
        items = []
        while self.shared.tokenizing > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self.q.get(timeout=left))
            except queue.Empty:
                break
        try:
            while True:
                items.append(self.q.get_nowait())
        except queue.Empty:
            pass
        return items

    def process(self, items, out) -> int | None:
        """Handle queue items; an exit code when one says to exit."""
        for item in items:
            if item[0] == "exit":
                _, code, why = item
                log(f"exiting ({why}), cancelling "
                    f"{len(self.reqs) + len(self.pending) + len(self.followers)} request(s)")
                self.writer.close()
                if self.by_uid:
                    self.gen.remove(list(self.by_uid))
                return code
            try:
                for msg in item[1]:
                    self.handle(msg, out)
            except ProtocolError as e:
                log(f"protocol error from supervisor: {e}")
                self.writer.close()
                return EXIT_PROTOCOL
        return None

    def run(self) -> int:
        # KRSERVE_WORKER_TIMING=1: every 256 steps, log the time per loop spent
        # in step() (MLX: graph building and waiting for the device) and
        # outside it (messages, detokenizing, frames) -- where a worker's
        # per-token overhead goes.
        self.timing = os.environ.get("KRSERVE_WORKER_TIMING") == "1"
        self.t_step = self.t_loop = 0.0
        self.n_steps = 0
        t_loop = 0.0
        while True:
            if self.timing:
                t_loop = time.perf_counter()
            idle = not self.reqs and not self.pending and not self.followers
            out = []
            code = self.process(self.take(idle), out)
            if code is not None:
                return code
            if self.insert_pending(out) and self.gathers:
                # Gens the reader is tokenizing join the prefill step to come
                # (it may read a burst in several reads).
                deadline = time.monotonic() + GATHER_S
                while self.shared.tokenizing:
                    items = self.gather(deadline)
                    if not items:
                        break
                    code = self.process(items, out)
                    if code is not None:
                        return code
                    self.insert_pending(out)
            dt_step = 0.0
            if self.reqs:
                if self.timing:
                    t0 = time.perf_counter()
                    self.step(out)
                    dt_step = time.perf_counter() - t0
                    self.n_steps += 1
                else:
                    self.step(out)
                if self.noise:
                    self.make_noise()
            self.publish()
            self.write(out)
            if self.timing and not idle and dt_step:
                self.t_step += dt_step
                self.t_loop += time.perf_counter() - t_loop
                if self.n_steps % 256 == 0:
                    log(f"timing: {self.n_steps} steps, {1000 * self.t_step / 256:.2f} ms/step in step(), "
                        f"{1000 * (self.t_loop - self.t_step) / 256:.2f} ms/step outside")
                    self.t_step = self.t_loop = 0.0


def _model_info(model, tokenizer, config: dict) -> tuple[int, int]:
    text_cfg = config.get("text_config") or {}
    vocab = config.get("vocab_size") or text_cfg.get("vocab_size")
    if not vocab:
        vocab = getattr(getattr(model, "args", None), "vocab_size", None) or len(tokenizer)
    ctx = config.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
    if not ctx:
        mml = getattr(tokenizer, "model_max_length", 0) or 0
        ctx = int(mml) if 0 < mml < 10**8 else 0
    return int(vocab), int(ctx)


def main(argv, proto_in: int, proto_out: int) -> int:
    args = parse_args(argv)
    writer = FrameWriter(proto_out)

    def fatal(msg: str, code: int) -> int:
        log(msg)
        try:
            writer.write(protocol.error(0, "internal", msg))
        except OSError:
            pass
        return code

    if not os.path.isdir(args.model):
        return fatal(f"model directory {args.model!r} does not exist", EXIT_NO_MODEL)

    try:
        blas_info = blas.load()
    except blas.BlasError as e:
        return fatal(str(e), EXIT_LOAD)
    t0 = time.monotonic()
    try:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm import load

        from . import ranks

        group = ranks.start(args)  # None unless --group-size > 1
        if group is not None and args.prompt_cache_bytes != 0:
            # Each rank would keep its own cache of its KV shard; keeping them
            # in step is not done yet, so a group runs without one.
            log("prompt cache: off in a group of ranks (--group-size > 1)")
            args.prompt_cache_bytes = 0
        model, tokenizer, config = group.load(args.model) if group else load(args.model, return_config=True)
        vocab, ctx = _model_info(model, tokenizer, config)
        on_cpu = mx.default_device().type == mx.cpu
        if args.prefill_step is None:
            args.prefill_step = default_prefill_step(on_cpu)
        weights = dequantize_for_cpu(model, args.dequantize, on_cpu=on_cpu,
                                     fast_blas=blas_info.startswith("OpenBLAS"))
        limits = device.apply_memory_limit(device.current(), args.device_share)
        budget = None
        if args.prompt_cache_bytes is None:  # the default: by the device, now known
            budget = device_budget(model, args.device_share, device.physical_memory())
            args.prompt_cache_bytes = budget.bytes
    except Exception as e:
        return fatal(f"failed to load model from {args.model!r}: {type(e).__name__}: {e}",
                     EXIT_LOAD)
    log(f"loaded {args.model} in {time.monotonic() - t0:.2f}s: vocab {vocab}, ctx {ctx}, "
        f"eos {sorted(tokenizer.eos_token_ids)}; {mx.default_device()}, BLAS: {blas_info}; "
        f"weights: {weights}; prefill step {args.prefill_step}")
    if limits:
        log(limits)
    if budget is not None:
        log(f"prompt cache budget: {budget.rule}")

    try:
        injected = faults.Faults.from_env(os.environ, tokenizer)
    except faults.FaultSpecError as e:
        return fatal(str(e), EXIT_LOAD)
    grammars = None
    t0 = time.monotonic()
    try:
        grammars = grammar.Grammars(tokenizer._tokenizer, vocab, tokenizer.eos_token_ids)
        log(f"llguidance tokenizer built in {time.monotonic() - t0:.2f}s")
    except Exception as e:  # structured output and tool choice are then refused, not ignored
        log(f"llguidance unavailable ({type(e).__name__}: {e}): requests with response_format "
            "or a required tool_choice will be refused")

    if group is not None and group.rank > 0:  # a follower: no protocol, mirrors rank 0
        return group.follow(model, tokenizer, vocab=vocab, ctx=ctx, args=args, grammars=grammars)
    shared = Shared()
    q: queue.Queue = queue.Queue()
    worker = (group.leader if group else Worker)(model, tokenizer, vocab=vocab, ctx=ctx, args=args, writer=writer,
                    shared=shared, q=q, faults=injected)
    caps = protocol.CAPS + ([protocol.CAP_PROMPT_CACHE] if worker.pc.enabled else [])
    log(f"prompt cache: {worker.pc.budget / 2**20:.0f} MiB" if worker.pc.enabled else "prompt cache: off")
    writer.write(protocol.hello(
        pid=os.getpid(), model=args.model, ctx=ctx, vocab=vocab,
        eos=sorted(worker.eos), caps=caps, cache_bytes=worker.pc.budget,
        versions={"krserve_worker": __version__, "mlx": mx.__version__,
                  "mlx_lm": mlx_lm.__version__, "python": platform.python_version(),
                  "blas": " ".join(blas_info.split()[:2]) if blas_info.startswith("OpenBLAS") else "bundled"},
    ))
    Reader(FrameReader(proto_in), writer, q, tokenizer, shared, grammars,
           checkpoints=worker.pc.enabled).start()
    try:
        return worker.run()
    except BrokenPipeError:
        log("supervisor closed the protocol pipe")
        return EXIT_OK
