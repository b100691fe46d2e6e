"""A worker that is a group of ranks (``--group-size N``): one model split over
N processes with ``mlx.distributed`` and mlx-lm's sharded loading.

The supervisor starts N processes per worker slot, each with ``MLX_RANK``,
``MLX_HOSTFILE`` (the ring backend's JSON host file), ``KRSERVE_GROUP_ADDR``
(rank 0's control address) and ``KRSERVE_GROUP_TOKEN`` (a secret a follower
shows rank 0). Each loads its shard of the model with
``mlx_lm.utils.sharded_load`` (tensor parallel: the model class's ``shard``).
Every rank runs the same engine loop (``worker.Worker``) on the same
requests, so every rank calls the model with the same shapes in the same
order, which is what the collectives inside the sharded layers need:

- Rank 0 (``Leader``) is the worker the supervisor sees: it speaks the
  protocol on stdio, its reader thread tokenizes, and at every loop it sends
  the queue items it took (gens with their prompt ids, cancels, exit) to the
  others before handling them (``share``).
- The other ranks (``Follower``) never touch the protocol channel: each loop
  they take rank 0's items, build the same samplers and grammar matchers, run
  the same ``insert``/``next``/``remove`` and throw their frames away.

The items travel over a TCP link from rank 0 to each follower (msgpack, one
length-prefixed message per loop), not in a collective as ``mlx_lm.server``
does (``_share_object``, an ``all_sum`` of pickled bytes). Two things measured
here with mlx 0.32.4's ring backend decided it: (1) a collective on its own
stream is not ordered with the model's collectives that ``BatchGenerator``
leaves running asynchronously on the generation stream, and the ranks paired
them differently (a follower read part of an activation as the message size);
on the generation stream it would be ordered but would wait for the step in
flight, losing the overlap of the next step with detokenizing; (2) a rank
waiting in a collective spins a CPU core (3 s of CPU in a 3 s wait), so idle
followers would burn a core each. A follower blocked on its link sleeps, and
sees rank 0's death as EOF (it exits).

Sampling is identical on every rank: the logits are (the ring's all-reduce
gives every rank the same sum), greedy is an argmax, a seeded request draws
from its own keys (sampling.SeededSampler), and unseeded sampling draws from
the global ``mx.random`` state, which every rank seeds alike at start (rank 0
picks the seed, shared with an ``all_sum``) and then advances by the same
draws in the same order. Each loop's message carries a digest of every token rank 0
sampled (``_Digest``); a follower whose own differs exits rather than go on.

What is off in a group: the lone-request fast path (generate_step is a
different call sequence from the batch's) and ``--dequantize`` (the sharded
layers are not ``nn.QuantizedLinear``). Fault injection
(``KRSERVE_WORKER_FAULT``) acts on rank 0 only.

A rank that dies leaves the others blocked in a collective for ever; that is
the supervisor's to contain (supervisor/group.go): the group is one crash
domain.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

import msgpack

from .log import log
from .reader import CONSTRAINT, Reader, Shared
from .worker import Worker

EXIT_GROUP_BROKEN = 4  # a rank's peer vanished (its link closed)
EXIT_DIVERGED = 5  # a follower sampled other tokens than rank 0


class GroupError(Exception):
    """A group that cannot work (bad size, model that cannot be sharded)."""


def _model_config(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GroupError(f"cannot read {model_dir}/config.json: {e}") from e


def check(model_dir: str, size: int) -> str:
    """Refuse a group of ``size`` that cannot work for the model in
    ``model_dir``: its attention and KV heads must split evenly over the
    ranks and its mlx-lm model class must have ``shard``. Returns the model
    class's name."""
    if size < 1:
        raise GroupError(f"--group-size must be at least 1; got {size}")
    cfg = _model_config(model_dir)
    text = {**cfg, **(cfg.get("text_config") or {})}
    heads = text.get("num_attention_heads") or text.get("n_heads") or text.get("num_heads")
    kv = text.get("num_key_value_heads") or text.get("n_kv_heads") or heads
    if heads:
        if heads % size or kv % size:
            ok = [d for d in range(1, math.gcd(int(heads), int(kv)) + 1)
                  if heads % d == 0 and kv % d == 0]
            raise GroupError(
                f"the model has {heads} attention heads and {kv} KV heads: a group of {size} "
                f"ranks must divide both (group sizes that fit: {', '.join(map(str, ok))})")
    try:
        try:  # mlx-lm's own lookup (model_type remappings included); private, so
            from mlx_lm.utils import _get_classes
        except ImportError:  # a later mlx-lm may move it: the module by its type
            import importlib

            def _get_classes(c):
                return importlib.import_module(f"mlx_lm.models.{c['model_type']}").Model, None
        cls, _ = _get_classes(cfg)
    except Exception as e:
        raise GroupError(f"mlx-lm does not know this model ({type(e).__name__}: {e})") from e
    if not hasattr(cls, "shard"):
        raise GroupError(
            f"mlx-lm's {cls.__module__}.{cls.__name__} (model_type {cfg.get('model_type')!r}) has no "
            "tensor-parallel shard(): this model cannot run as a group of ranks (--group-size 1)")
    return f"{cls.__module__}.{cls.__name__}"


def start(args):
    """The ``Group`` this process is a rank of, or None without a group.
    Turns off what a group cannot do (see the module's docstring)."""
    size = getattr(args, "group_size", 1)
    if size <= 1:
        return None
    check(args.model, size)
    args.single_fast_path = False
    if args.dequantize != "off":
        log(f"group of {size} ranks: weights stay as stored (--dequantize {args.dequantize} is "
            "not applied to sharded layers); the lone-request fast path is off")
    args.dequantize = "off"
    return Group(size)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class NullWriter:
    """A follower's frame writer: nobody listens."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class Group:
    def __init__(self, size: int):
        import mlx.core as mx

        self.mx = mx
        try:
            self.rank = int(os.environ["MLX_RANK"])
            self.address = _addr(os.environ["KRSERVE_GROUP_ADDR"])
            self.token = os.environ["KRSERVE_GROUP_TOKEN"].encode()
            os.environ["MLX_HOSTFILE"]  # noqa: B018 - the ring backend reads it
        except (KeyError, ValueError) as e:
            raise GroupError("a group rank needs MLX_RANK, MLX_HOSTFILE, KRSERVE_GROUP_ADDR and "
                             f"KRSERVE_GROUP_TOKEN (set by krserve up --group-size): {e!r}") from e
        self.size = size
        self.links: list[socket.socket] = []  # rank 0: one per follower
        self.link = None  # a follower: its stream from rank 0
        self._listener = None
        if self.rank == 0:  # bound before anyone can look for it
            self._listener = socket.create_server(self.address)
        self.g = mx.distributed.init(strict=True, backend="ring")
        if self.g.size() != size or self.g.rank() != self.rank:
            raise GroupError(f"mlx.distributed gave rank {self.g.rank()} of {self.g.size()}, "
                             f"expected rank {self.rank} of {size}")
        log(f"rank {self.rank} of {size}: ring backend up")

    # -- start-up --

    def load(self, path: str):
        """Load this rank's shard, connect the control links and seed the
        random state alike on every rank."""
        from mlx_lm.utils import sharded_load

        model, tokenizer, config = sharded_load(path, tensor_group=self.g, return_config=True)
        self._connect()
        seed = int.from_bytes(os.urandom(4), "little") >> 1 if self.rank == 0 else 0
        seed = self.mx.distributed.all_sum(self.mx.array(seed, dtype=self.mx.int32),
                                           group=self.g, stream=self.mx.cpu).item()
        self.mx.random.seed(seed)
        return model, tokenizer, config

    def _connect(self, timeout: float = 120.0):
        hello = self.token + b"\n"
        if self.rank == 0:
            self._listener.settimeout(timeout)
            while len(self.links) < self.size - 1:
                s, _ = self._listener.accept()
                s.settimeout(5)
                try:
                    got = _recv_exact(s, len(hello))
                except OSError:
                    got = None
                if got != hello:  # not one of ours
                    s.close()
                    continue
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.links.append(s)
            self._listener.close()
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.create_connection(self.address, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.sendall(hello)
        s.settimeout(None)
        self.link = s.makefile("rb")
        s.close()  # the file keeps the connection

    # -- every loop --

    def share(self, items: list, digest: int, estimates=(None, None)) -> None:
        """Rank 0: send this loop's queue items to every follower, with the
        digest of every token it has sampled so far and its generator's step
        time estimates (batchgen.Generator.estimates): a decision made from
        each rank's own clock would differ between ranks and take their
        collectives out of step."""
        data = msgpack.packb([digest, [_wire(i) for i in items], list(estimates)], use_bin_type=True)
        frame = struct.pack(">I", len(data)) + data
        for s in self.links:
            s.sendall(frame)

    def receive(self):
        """A follower: rank 0's token digest, items and step time estimates
        for this loop (blocking, asleep), or None when rank 0 is gone."""
        head = self.link.read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        data = self.link.read(n)
        if len(data) < n:
            return None
        digest, items, estimates = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
        return digest, items, tuple(estimates)

    # -- the engine --

    def leader(self, *args, **kwargs) -> "Leader":
        return Leader(self, *args, **kwargs)

    def follow(self, model, tokenizer, *, vocab: int, ctx: int, args, grammars) -> int:
        """Run a follower until rank 0 exits (its exit item) or vanishes."""
        import queue

        reader = Reader(None, NullWriter(), None, tokenizer, Shared(), grammars)
        w = Follower(self, reader, model, tokenizer, vocab=vocab, ctx=ctx, args=args,
                     writer=NullWriter(), shared=Shared(), q=queue.Queue())
        log(f"rank {self.rank}: following rank 0")
        return w.run()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _wire(item):
    """A queue item as it travels to the followers: a gen without its
    Constraint (a matcher is not picklable; each rank compiles its own)."""
    if item[0] != "msgs":
        return item
    return ("msgs", [{k: v for k, v in m.items() if k != CONSTRAINT} for m in item[1]])


class _Digest:
    """A running digest of every (request, token) this rank sampled, in order.
    Rank 0 sends its own with each loop's items and a follower compares: ranks
    that sampled differently (a bug, or randomness that is not shared) would
    otherwise go on silently, their caches apart, until their steps no longer
    match; a follower that sees it exits instead and the group restarts."""

    digest = 0

    def on_token(self, req, token: int, *args, **kwargs):
        self.digest = (self.digest * 1000003 + req.p.id * 65599 + int(token) + 1) % (1 << 61)
        return super().on_token(req, token, *args, **kwargs)


class Leader(_Digest, Worker):
    gathers = False  # followers replay the leader's takes, one per loop

    def __init__(self, group: Group, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def take(self, idle: bool) -> list:
        items = super().take(idle)
        try:
            self.group.share(items, self.digest, self.gen.estimates)
        except OSError as e:  # a follower died; the supervisor ends the group
            return [("exit", EXIT_GROUP_BROKEN, f"a follower is gone ({e!r})")]
        return items


class Follower(_Digest, Worker):
    gathers = False

    def __init__(self, group: Group, reader: Reader, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.reader = reader
        self.gen.measures = False  # it decides with rank 0's (take)

    def take(self, idle: bool) -> list:
        got = self.group.receive()
        if got is None:
            return [("exit", EXIT_GROUP_BROKEN, "rank 0 is gone (its link closed)")]
        digest, items, self.gen.estimates = got
        if digest != self.digest:
            log(f"RankDivergedError: rank {self.group.rank} sampled other tokens than rank 0 "
                f"(digest {self.digest:x}, rank 0's {digest:x}); exiting so the group restarts")
            return [("exit", EXIT_DIVERGED, "diverged from rank 0")]
        for item in items:
            if item[0] != "msgs":
                continue
            for m in item[1]:
                if m.get("t") == "gen":
                    m[CONSTRAINT] = self._constraint(m)
        return items

    def _constraint(self, m):
        from . import tools

        try:
            return self.reader.constraint(m, tools.parse_tool_request(m))
        except Exception as e:  # rank 0 compiled it: a difference here is a bug
            log(f"rank {self.group.rank}: compiling the grammar of {m.get('id')} failed: {e!r}")
            return None


def _main(argv=None) -> int:
    """``python -m krserve_worker.ranks --check DIR --group-size N``: what
    ``krserve up --group-size`` runs before starting workers. Prints the
    reason and exits 2 when the group cannot work."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m krserve_worker.ranks")
    ap.add_argument("--check", required=True, metavar="DIR", help="model directory")
    ap.add_argument("--group-size", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        cls = check(args.check, args.group_size)
    except GroupError as e:
        print(e, flush=True)
        return 2
    print(f"ok: {cls} shards over {args.group_size} ranks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
