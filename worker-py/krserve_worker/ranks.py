"""A worker that is a group of ranks (``--group-size N``): one model split over
N processes with ``mlx.distributed`` and mlx-lm's sharded loading.

The supervisor starts N processes per worker slot, each with ``MLX_RANK``,
``MLX_HOSTFILE`` (the ring backend's JSON host file) and
``KRSERVE_GROUP_DOORBELL`` (rank 0's address for the doorbell, below). Each
loads its shard of the model with ``mlx_lm.utils.sharded_load`` (tensor
parallel: the model class's ``shard``). Every rank runs the same engine loop
(``worker.Worker``) on the same requests, so every rank calls the model with
the same shapes in the same order, which is what the collectives inside the
sharded layers need:

- Rank 0 (``Leader``) is the worker the supervisor sees: it speaks the
  protocol on stdio, its reader thread tokenizes, and at every loop it
  broadcasts the queue items it took (gens with their prompt ids, cancels,
  exit) to the others before handling them (``share``: an ``all_sum`` of the
  pickled items, as ``mlx_lm.server`` does in distributed mode).
- The other ranks (``Follower``) never touch the protocol channel: they take
  their items from that broadcast, build the same samplers and grammar
  matchers, run the same ``insert``/``next``/``remove`` and throw their frames
  away.

Sampling is identical on every rank: the logits are (the ring's all-reduce
gives every rank the same sum), greedy is an argmax, a seeded request draws
from its own keys (sampling.SeededSampler), and unseeded sampling draws from
the global ``mx.random`` state, which every rank seeds alike at start (rank 0
picks the seed) and then advances by the same draws in the same order.

Idle. A rank waiting inside a collective spins a CPU core (checked with mlx
0.32.4's ring backend: 3 s of CPU in a 3 s wait), so while nothing runs the
followers must not sit in the broadcast. The loop's state is the same on
every rank, so every rank knows when rank 0 will block on its queue; then
the followers block on a plain TCP socket to rank 0 (the doorbell) instead,
and rank 0 writes one byte to each before its next broadcast. The doorbell
also tells an idle follower that rank 0 died (EOF): it exits.

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
import pickle
import socket
import time

from .worker import CONSTRAINT, Reader, Worker, log

EXIT_LEADER_GONE = 4


class GroupError(Exception):
    """A group that cannot work (bad size, model that cannot be sharded)."""


def add_args(ap) -> None:
    ap.add_argument("--group-size", type=int, default=1,
                    help="ranks this worker is split over (tensor parallel with mlx.distributed; "
                         "the supervisor sets MLX_RANK, MLX_HOSTFILE and KRSERVE_GROUP_DOORBELL)")


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
        from mlx_lm.utils import _get_classes

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
            doorbell = _addr(os.environ["KRSERVE_GROUP_DOORBELL"])
            os.environ["MLX_HOSTFILE"]  # noqa: B018 - the ring backend reads it
        except (KeyError, ValueError) as e:
            raise GroupError(f"a group rank needs MLX_RANK, MLX_HOSTFILE and KRSERVE_GROUP_DOORBELL "
                             f"(set by krserve up --group-size): {e!r}") from e
        self.size = size
        self.bells: list[socket.socket] = []  # rank 0: one per follower
        self.bell: socket.socket | None = None  # a follower: to rank 0
        self._listener = None
        if self.rank == 0:
            self._listener = socket.create_server(doorbell)
        self.doorbell = doorbell
        self.g = mx.distributed.init(strict=True, backend="ring")
        if self.g.size() != size or self.g.rank() != self.rank:
            raise GroupError(f"mlx.distributed gave rank {self.g.rank()} of {self.g.size()}, "
                             f"expected rank {self.rank} of {size}")
        log(f"rank {self.rank} of {size}: ring backend up")

    # -- start-up --

    def load(self, path: str):
        """Load this rank's shard, then connect the doorbell and seed the
        random state alike on every rank."""
        from mlx_lm.utils import sharded_load

        model, tokenizer, config = sharded_load(path, tensor_group=self.g, return_config=True)
        self._connect()
        seed = int.from_bytes(os.urandom(4), "little") >> 1 if self.rank == 0 else 0
        seed = self._all_sum(self.mx.array(seed, dtype=self.mx.int32)).item()
        self.mx.random.seed(seed)
        return model, tokenizer, config

    def _connect(self, timeout: float = 120.0):
        if self.rank == 0:
            self._listener.settimeout(timeout)
            for _ in range(self.size - 1):
                s, _ = self._listener.accept()
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.bells.append(s)
            self._listener.close()
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.bell = socket.create_connection(self.doorbell, timeout=5)
                self.bell.settimeout(None)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- every loop --

    def _all_sum(self, x):
        y = self.mx.distributed.all_sum(x, group=self.g, stream=self.mx.cpu)
        self.mx.eval(y)
        return y

    def share(self, items: list) -> None:
        """Rank 0: send this loop's queue items to the other ranks."""
        import numpy as np

        wire = [_wire(i) for i in items]
        data = pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL) if wire else b""
        self._all_sum(self.mx.array(len(data), dtype=self.mx.int32))
        if data:
            self._all_sum(self.mx.array(np.frombuffer(data, dtype=np.uint8)))

    def receive(self) -> list:
        """A follower: rank 0's items for this loop."""
        import numpy as np

        n = self._all_sum(self.mx.array(0, dtype=self.mx.int32)).item()
        if n == 0:
            return []
        data = self._all_sum(self.mx.zeros((n,), dtype=self.mx.uint8))
        return pickle.loads(np.array(data, copy=False).tobytes())

    def ring(self) -> None:
        """Rank 0, after blocking idle: wake the followers."""
        for s in self.bells:
            s.sendall(b"\x01")

    def wait(self) -> bool:
        """A follower, idle: block until rank 0 rings; False if rank 0 is gone."""
        try:
            return self.bell.recv(1) == b"\x01"
        except OSError:
            return False

    # -- the engine --

    def leader(self, *args, **kwargs) -> "Leader":
        return Leader(self, *args, **kwargs)

    def follow(self, model, tokenizer, *, vocab: int, ctx: int, args, grammars) -> int:
        """Run a follower until rank 0 exits (its exit item) or vanishes."""
        import queue

        from .worker import Shared

        reader = Reader(None, NullWriter(), None, tokenizer, Shared(), grammars)
        w = Follower(self, reader, model, tokenizer, vocab=vocab, ctx=ctx, args=args,
                     writer=NullWriter(), shared=Shared(), q=queue.Queue())
        log(f"rank {self.rank}: following rank 0")
        return w.run()


def _wire(item):
    """A queue item as it travels to the followers: a gen without its
    Constraint (a matcher is not picklable; each rank compiles its own)."""
    if item[0] != "msgs":
        return item
    return ("msgs", [{k: v for k, v in m.items() if k != CONSTRAINT} for m in item[1]])


class Leader(Worker):
    def __init__(self, group: Group, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def take(self, idle: bool) -> list:
        items = super().take(idle)
        if idle:
            self.group.ring()  # the followers wait on the doorbell, not in the broadcast
        self.group.share(items)
        return items


class Follower(Worker):
    def __init__(self, group: Group, reader: Reader, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.reader = reader

    def take(self, idle: bool) -> list:
        if idle and not self.group.wait():
            return [("exit", EXIT_LEADER_GONE, "rank 0 is gone (doorbell closed)")]
        items = self.group.receive()
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
