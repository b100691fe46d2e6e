"""The worker's prompt cache: a conversation's next turn prefills only what is new.

mlx-lm does the work; this module decides what goes in and what comes out, as
``mlx_lm/server.py`` does:

- ``mlx_lm.models.cache.LRUPromptCache`` holds KV caches keyed by the tokens
  they hold (a token trie). ``fetch`` returns the nearest one: an entry that is
  a prefix of the prompt (any cache type), or a longer entry trimmed back to the
  shared prefix (trimmable caches only: ``KVCache``, and ``RotatingKVCache``
  while it has not wrapped; never ``ArraysCache``, the state of SSM and hybrid
  models). Non-trimmable caches therefore only ever resume from an exact
  prefix: their state is never wrong, only less often reused.
- Checkpoints (``store``) where a later request resumes: the end of the system
  prompt of a chat (``system_end``), the end of each prompt (all but its last
  token, which a request always prefills itself; only for models whose caches
  cannot be trimmed, see ``prompt_checkpoints_needed``), and the finished
  sequence, prompt and reply, so turn k+1 finds everything up to its new user
  message.
  A cancelled request stores what it prefilled. For a trimmable cache a longer
  entry replaces its stored prefixes (mlx-lm drops them: the longer one serves
  them by trimming), and an entry that a stored trimmable entry extends is not
  stored again: the longer one is marked used instead (so a conversation that
  is asked again moves to the back of the eviction queue).
- The budget: ``budget`` bytes for the cache *and* the KV caches of the running
  sequences (``active``), so the worker's KV memory stays within it. After
  every insert of new sequences the cache is trimmed to ``budget - active``
  (mlx-lm's eviction order: it prefers evicting ``assistant`` entries, then
  ``user``, and keeps ``system`` entries longest; oldest first within a kind).
  An entry larger than what the budget leaves is skipped: it never flushes
  everything else (``LRUPromptCache.insert_cache`` alone would evict the
  whole cache, the new entry included). Without ``--prompt-cache-bytes`` the
  worker sizes the budget by the memory the KV cache lives in, once the model
  is loaded (``default_budget``): the GPU's on CUDA, physical memory elsewhere.

Bookkeeping for the protocol: ``nbytes`` (pong ``cache``), ``evicted`` (pong
``evicted``: entries dropped to stay within the budget or the entry limit,
not the prefixes a longer entry replaced) and the ``cached`` count of each
request (done ``cached``).

Everything here runs on the MLX thread, except ``system_end``, which the
reader thread calls (tokenizer only). mlx and mlx-lm are imported when a
``PromptCache`` is made: the worker loads its BLAS before mlx (``blas.py``).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

from .log import log

# One model per worker: the trie's model key.
_MODEL = "model"
# Entries kept at most (mlx_lm.server's --prompt-cache-size defaults to 10, too
# few for a worker serving tens of conversations; the byte budget binds first).
MAX_ENTRIES = 4096


class Budget(NamedTuple):
    """A default budget and the rule that gave it (for the worker's log)."""

    bytes: int
    rule: str


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def default_budget(kind: str, device_memory: int, physical_memory: int,
                   weights_bytes: int, share: int) -> Budget:
    """The budget of a worker started without ``--prompt-cache-bytes``, from
    the memory its KV cache lives in.

    ``kind`` is ``"cuda"`` for a GPU with memory of its own (mlx's CUDA
    backend), anything else (``"cpu"``, ``"metal"``) for memory shared with
    the system. ``share`` workers run on this device (the supervisor's
    ``--device-share``: those of every model that may be loaded at once, each
    counted as holding weights like this one's).

    - A CUDA GPU: half of ``device_memory`` (the GPU's total), less the
      weights of the ``share`` workers (``weights_bytes`` each), split among
      them; never below 0 (0: the cache is off). The other half is left to
      the running batch's activations, mlx's buffer cache and whatever else
      uses the card.
    - Elsewhere (the CPU; Apple silicon's unified memory), or a GPU whose
      memory is unknown (``device_memory`` 0): an eighth of
      ``physical_memory`` split among the ``share`` workers.
    """
    share = max(1, share)
    split = f", split among {share} workers" if share > 1 else ""
    if kind == "cuda" and device_memory > 0:
        room = device_memory // 2 - share * weights_bytes
        n = max(0, room // share)
        rule = (f"half of the GPU's {_gib(device_memory)} less {share} x {_gib(weights_bytes)} "
                f"of weights{split}")
        if n == 0:
            rule += ": the weights take that half, so the prompt cache is off"
        return Budget(n, rule)
    where = "GPU memory unknown: " if kind == "cuda" else ""
    return Budget(max(0, physical_memory) // 8 // share,
                  f"{where}an eighth of the {_gib(physical_memory)} of physical memory{split}")


def device_budget(model, share: int, physical_memory: int) -> Budget:
    """``default_budget`` for the loaded ``model`` on mlx's default device
    (called on the MLX thread, after the model is loaded)."""
    from . import device

    dev = device.current()
    return default_budget(dev.kind, dev.memory, physical_memory, device.weights_bytes(model), share)


def _linear_trie():
    """mlx-lm's ``PromptTrie`` with a ``search`` that costs the nodes it
    visits, not the sum of their depths.

    To find the nearest longer entry, ``PromptTrie.search`` walks the subtree
    below the prompt's end depth first, building each path as ``extra + [tok]``:
    a new list per node, so a branch of ``d`` tokens costs ``d**2 / 2`` element
    copies. A new conversation shares only the chat template's first tokens
    with the cached ones, so its search walks every cached conversation whole:
    with 16 conversations of ~3,200 tokens that was ~50 ms per fetch here and,
    on the GPU host, 1.7-2.7 s of fetches for a burst of 16 new conversations,
    all on the MLX thread (docs/benchmarks.md, "Prompt cache: time to first
    token"). This one walks the same nodes in the same order, carrying each
    path as a linked list (a node, its depth, its parent link), and rebuilds
    only the path it returns: the same result, in linear time. mlx-lm's main
    branch still has the quadratic walk (checked 2026-08-22)."""
    from mlx_lm.models.cache import PromptTrie, PromptTrieResult

    class LinearTrie(PromptTrie):
        def search(self, model, tokens):
            if model not in self._trie:
                return PromptTrieResult(model, None, None, None, 0)
            current = self._trie[model]
            if not tokens and "__value__" in current:
                return PromptTrieResult(model, [], None, None, 0)
            last_index = -1
            index = 0
            while index < len(tokens) and tokens[index] in current:
                current = current[tokens[index]]
                if "__value__" in current:
                    last_index = index
                index += 1
            if last_index == len(tokens) - 1 >= 0:
                return PromptTrieResult(model, tokens, None, None, 0)
            shorter = tokens[: last_index + 1] if last_index > 0 else None
            longer = None
            if index > 0:
                # PromptTrie.search's depth-first walk, node for node; a path
                # is (token, parent path), its length carried beside it.
                best, best_len = None, -1
                stack = [(current, 0, None)]
                while stack:
                    node, depth, path = stack.pop()
                    if "__value__" in node:
                        if best_len < 0 or depth < best_len:
                            best, best_len = path, depth
                    elif best_len < 0 or depth < best_len:
                        for tok in node:
                            stack.append((node[tok], depth + 1, (tok, path)))
                if best_len >= 0:  # (PromptTrie's walk fails when none is found)
                    extra = []
                    while best is not None:
                        extra.append(best[0])
                        best = best[1]
                    longer = tokens[:index] + extra[::-1]
            return PromptTrieResult(model, None, shorter, longer, index)

    return LinearTrie()


def _counting_order():
    """mlx-lm's eviction order, counting evictions: ``pop`` is called only to
    evict (for the entry limit, the byte limit and ``trim_to``); replaced
    prefixes leave through ``remove``."""
    from mlx_lm.models.cache import LRUPromptCache

    class CountingOrder(LRUPromptCache.CacheOrder):
        def __init__(self):
            super().__init__()
            self.evicted = 0

        def pop(self):
            self.evicted += 1
            return super().pop()

    return CountingOrder()


class PromptCache:
    def __init__(self, budget: int, max_entries: int = MAX_ENTRIES):
        from mlx_lm.models.cache import LRUPromptCache

        self.budget = max(0, int(budget))
        self.lru = LRUPromptCache(max_size=max_entries, max_bytes=self.budget)
        # The attribute LRUPromptCache evicts through (tests/py check the count).
        self.lru._lru = _counting_order()
        self.lru._trie = _linear_trie()  # the same lookups, in linear time
        self.skipped = 0  # entries larger than the room the budget left

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes

    @property
    def evicted(self) -> int:
        return self.lru._lru.evicted

    def __len__(self) -> int:
        return len(self.lru)

    def fetch(self, tokens: list[int]):
        """``(cache, n)``: a KV cache holding the first ``n`` tokens of
        ``tokens`` (a private copy the caller may extend), or ``(None, 0)``.
        ``n`` is at most ``len(tokens) - 1``: the last token is always
        prefilled, for its logits."""
        if not self.enabled or len(tokens) < 2:
            return None, 0
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.lru.fetch_nearest_cache(_MODEL, tokens)
        if cache is not None and not rest:
            # An entry of exactly these tokens: step back one token, or (a
            # cache that cannot be trimmed) take the nearest shorter entry.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = self.lru.fetch_nearest_cache(_MODEL, tokens[:-1])
                rest = rest + tokens[-1:]
        if cache is None:
            return None, 0
        return cache, len(tokens) - len(rest)

    def store(self, tokens: list[int], cache: list, kind: str, active: int) -> bool:
        """Checkpoint ``cache``, which holds exactly ``tokens``; ``kind`` is
        ``system``, ``user`` or ``assistant`` (mlx-lm's eviction classes).
        ``active``: the bytes the running sequences' caches hold. The cache
        object is kept: the caller must not extend it afterwards."""
        if not self.enabled or not tokens or not cache:
            return False
        _compact(cache)
        held = _held_tokens(cache)
        if held is not None and held != len(tokens):
            # Never store a state under the wrong key (a bug if it happens).
            log(f"prompt cache: not storing a cache of {held} tokens under {len(tokens)}")
            return False
        if self._touch_longer(tokens, cache):
            return True
        n = sum(c.nbytes for c in cache)
        room = self.budget - active
        if n > room:
            self.skipped += 1
            return False
        self.lru.max_bytes = room
        self.lru.insert_cache(_MODEL, list(tokens), cache, cache_type=kind)
        return True

    def _touch_longer(self, tokens: list[int], cache: list) -> bool:
        """A trimmable entry that a stored entry extends adds nothing (the
        longer one serves it by trimming; LRUPromptCache would keep both):
        mark the longer one used instead. Reports whether it did."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        if not can_trim_prompt_cache(cache):
            return False
        res = self.lru._trie.search(_MODEL, tokens)
        if res.exact is not None or res.longer is None or res.common_prefix < len(tokens):
            return False
        entry = self.lru._trie.get(_MODEL, res.longer)
        if not can_trim_prompt_cache(entry.prompt_cache):
            return False
        self.lru._lru.remove(_MODEL, res.longer)
        self.lru._lru.push(_MODEL, res.longer, entry.cache_type)
        return True

    def trim(self, active: int) -> None:
        """Evict until the cache and the running sequences fit the budget."""
        if self.enabled:
            self.lru.trim_to(n_bytes=self.budget - active)


class Followers:
    """New conversations that share a system prompt the cache does not hold
    yet: the first of them (its leader) prefills it and stores its
    checkpoint; the others wait for that and then start from the cache, so
    a burst of N new conversations prefills its system prompt once, not N
    times (SGLang's radix cache shares a prefix within a batch the same way).

    ``key`` is the system prompt's tokens; the requests are opaque here
    (``rid`` names them). The worker parks what ``admit`` refuses, and calls
    ``release`` when a leader stored its checkpoint or left (finished,
    cancelled, failed): its followers go back to be fetched again (now a hit,
    unless the checkpoint could not be stored) and inserted."""

    def __init__(self):
        self._leader: dict[tuple, int] = {}  # key -> the leader's rid
        self._keys: dict[int, tuple] = {}  # leader rid -> key
        self._waiting: dict[tuple, list] = {}  # key -> parked (rid, request), in arrival order

    def admit(self, key: tuple, rid: int) -> bool:
        """Whether ``rid`` may be prefilled now: it leads ``key`` (the first to
        ask) or already did; else it is to wait for the leader."""
        lead = self._leader.setdefault(key, rid)
        if lead == rid:
            self._keys[rid] = key
            return True
        return False

    def park(self, key: tuple, rid: int, req) -> int:
        """Park ``rid`` behind ``key``'s leader; returns the leader's rid."""
        self._waiting.setdefault(key, []).append((rid, req))
        return self._leader[key]

    def release(self, rid: int) -> list:
        """The requests that waited for leader ``rid`` (none unless it leads)."""
        key = self._keys.pop(rid, None)
        if key is None:
            return []
        del self._leader[key]
        return [req for _, req in self._waiting.pop(key, [])]

    def cancel(self, rid: int):
        """Take a parked request out (its request object), or None."""
        for key, parked in self._waiting.items():
            for i, (r, req) in enumerate(parked):
                if r == rid:
                    del parked[i]
                    if not parked:
                        del self._waiting[key]
                    return req
        return None

    def parked(self) -> list:
        return [req for parked in self._waiting.values() for _, req in parked]

    def __len__(self) -> int:
        return sum(len(parked) for parked in self._waiting.values())


def copy_cache(cache: list) -> list:
    """A checkpoint of a cache that keeps being extended (the fast path)."""
    return copy.deepcopy(cache)


def prefill(model, cache: list, tokens: list[int], start: int, stop: int, step: int) -> None:
    """Run ``tokens[start:stop]`` through the model into ``cache``, ``step``
    tokens at a time, as generate_step prefills (the fast path's checkpoints)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    with mx.stream(generation_stream):
        for a in range(start, stop, step):
            model(mx.array(tokens[a:min(stop, a + step)])[None], cache=cache)
            mx.eval([c.state for c in cache])


def with_prefix(processor, prefix: list[int]):
    """A logits processor that sees ``prefix`` before the tokens it is given
    (generate_step passes only the tokens it prefilled and generated)."""
    import mlx.core as mx

    head = mx.array(prefix)
    return lambda tokens, logits: processor(mx.concatenate([head, tokens]), logits)


def _compact(cache: list) -> None:
    """Drop the unused tail of ``KVCache`` buffers (they grow in 256-token
    steps), so an entry's bytes are what it holds."""
    import mlx.core as mx

    for c in cache:
        keys = getattr(c, "keys", None)
        if (type(c).__name__ == "KVCache" and keys is not None
                and not isinstance(keys, (list, tuple)) and c.offset < keys.shape[2]):
            c.keys = mx.contiguous(keys[..., : c.offset, :])
            c.values = mx.contiguous(c.values[..., : c.offset, :])
    mx.eval([c.state for c in cache])


def _held_tokens(cache: list):
    """The tokens a cache holds, where its layers say (``offset`` of a
    ``KVCache`` or ``RotatingKVCache``); None when no layer says."""
    for c in cache:
        if type(c).__name__ in ("KVCache", "RotatingKVCache", "QuantizedKVCache"):
            return int(c.offset)
    return None


def prompt_checkpoints_needed(model) -> bool:
    """Whether the end of each prompt is worth a checkpoint for this model: only
    when its caches cannot always be trimmed (``ArraysCache`` of SSM and hybrid
    models, ``RotatingKVCache`` once it wraps). A trimmable cache's finished
    sequence serves its prompt by trimming, and the copy would double the
    request's KV memory while it runs."""
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    return not all(c.is_trimmable() and not isinstance(c, RotatingKVCache) for c in cache)


def system_end(tokenizer, chat: list[dict], ids: list[int], **template_kwargs) -> int:
    """Where the leading system message(s) of ``chat`` end in its prompt
    ``ids`` (0 when there are none or it cannot be told): the template
    applied to the system messages and an empty user message shares exactly
    that prefix with the prompt (mlx_lm.server's rule). ``template_kwargs``
    are the prompt's own (its ``tools``), so the checkpoint covers the system
    prompt and the tools."""
    k = 0
    while k < len(chat) and chat[k]["role"] == "system":
        k += 1
    if k == 0 or k == len(chat):
        return 0
    try:
        sys_ids = tokenizer.apply_chat_template(chat[:k] + [{"role": "user", "content": ""}],
                                                add_generation_prompt=False, tokenize=True,
                                                **template_kwargs)
    except Exception:
        return 0
    if hasattr(sys_ids, "tolist"):
        sys_ids = sys_ids.tolist()
    end = 0
    for a, b in zip(sys_ids, ids):
        if a != b:
            break
        end += 1
    return end if 0 < end < len(ids) else 0
