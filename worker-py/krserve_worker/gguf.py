"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

    python -m krserve_worker.gguf MODEL.gguf OUT_DIR

The output directory holds ``model.safetensors`` (GGUF Q4_0/Q4_1/Q8_0 tensors
stay quantized as MLX affine triples, group size 32), ``config.json`` for
``mlx_lm.models.llama``, a ``tokenizers`` byte-level BPE tokenizer rebuilt
from the ``tokenizer.ggml.*`` metadata (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) and, written last, the
marker file ``krserve-converted.json``.

The conversion is written into a temporary directory next to ``OUT_DIR`` and
renamed into place at the end, so a directory at ``OUT_DIR`` that holds the
marker is always a finished conversion. Converting into such a directory again
does nothing.

Only the header is parsed here (pure Python, so that every malformed or
unsupported file gives a :class:`GGUFError` naming the problem before MLX's
native reader sees it); the tensors themselves are read by ``mx.load``.

This module imports nothing heavy at import time: :func:`is_complete` is used
on the worker's start-up path.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["GGUFError", "convert", "is_complete", "read_header", "MARKER"]

#: Written last into a finished model directory.
MARKER = "krserve-converted.json"
#: Bump when the output layout changes; a directory written by another
#: version is converted again (and replaced) instead of being reused.
FORMAT_VERSION = 1

_TMP_PREFIX = ".krserve-tmp-"


class GGUFError(Exception):
    """The file is not a GGUF file we can convert; the message names the problem."""


# ---------------------------------------------------------------------------
# GGUF header reader
# ---------------------------------------------------------------------------

# gguf_type (metadata value types)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_FMT = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I",
    _INT32: "i", _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q",
    _FLOAT64: "d",
}

# ggml_type -> (name, block size in elements, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1),
    25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# What mlx 0.32's GGUF reader turns into arrays: Q4_0/Q4_1/Q8_0 stay quantized
# (weight/scales/biases, group 32), F32/F16 load as they are, BF16/Q4_K/Q6_K are
# dequantized to float16 through gguflib. Everything else is refused up front
# (mlx would raise an opaque error or read garbage).
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"}
_MLX_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


class _Reader:
    def __init__(self, buf, path: str, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def _need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: truncated GGUF file: {what} needs {n} bytes at "
                f"offset {self.pos}, but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self._need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Some vocabularies hold invalid UTF-8 pieces; keep them usable.
            return raw.decode("utf-8", errors="replace")

    def _strings(self, count: int, key: str) -> list[str]:
        # The hot loop of the header (tokens, merges): kept tight.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self._need(8, f"element {i} of {key}")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self._need(n, f"element {i} of {key}")
            raw = buf[pos : pos + n]
            pos += n
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                append(raw.decode("utf-8", errors="replace"))
        self.pos = pos
        return out

    def value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self.string(f"string value of {key}")
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype], f"value of {key}")
        if vtype == _ARRAY:
            etype = self.scalar("I", f"array type of {key}")
            count = self.scalar("Q", f"array length of {key}")
            if etype == _STRING:
                return self._strings(count, key)
            if etype in _SCALAR_FMT:
                fmt = _SCALAR_FMT[etype]
                n = struct.calcsize("<" + fmt) * count
                self._need(n, f"array {key}")
                vals = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
                self.pos += n
                return vals
            if etype == _ARRAY:
                return [self.value(_ARRAY, f"{key}[{i}]") for i in range(count)]
            raise GGUFError(f"{self.path}: metadata key {key!r}: unknown array element type {etype}")
        raise GGUFError(f"{self.path}: metadata key {key!r}: unknown value type {vtype}")


def read_header(path) -> tuple[dict, list[dict]]:
    """Parse a GGUF header: ``(metadata, tensors)``.

    ``tensors`` is a list of ``{"name", "shape" (ggml order, fastest first),
    "type" (name), "offset" (absolute), "nbytes"}``. Raises :class:`GGUFError`
    for a file that is not GGUF, an unsupported GGUF version, a truncated
    header or tensor data that extends past the end of the file.
    """
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise GGUFError(f"{path}: not a GGUF file ({size} bytes, no 'GGUF' magic)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(buf, path, size)
        finally:
            buf.close()


def _parse(buf, path: str, size: int):
    if buf[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    r = _Reader(buf, path, size)
    r.pos = 4
    version = r.scalar("I", "version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.scalar("Q", "tensor count")
    n_kv = r.scalar("Q", "metadata count")
    # Every tensor info and key/value takes well over 8 bytes: a count that
    # cannot fit is a corrupt (or truncated) header, not a reason to loop 2**60 times.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise GGUFError(f"{path}: corrupt GGUF header (tensor count {n_tensors}, metadata count {n_kv}, file size {size})")
    meta: dict = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        vtype = r.scalar("I", f"type of metadata key {key!r}")
        meta[key] = r.value(vtype, key)
    tensors = []
    for i in range(n_tensors):
        name = r.string(f"tensor name #{i}")
        ndim = r.scalar("I", f"dimension count of tensor {name!r}")
        if ndim > 8:
            raise GGUFError(f"{path}: tensor {name!r}: corrupt dimension count {ndim}")
        shape = [r.scalar("Q", f"shape of tensor {name!r}") for _ in range(ndim)]
        ttype = r.scalar("I", f"type of tensor {name!r}")
        offset = r.scalar("Q", f"offset of tensor {name!r}")
        tensors.append({"name": name, "shape": shape, "type_id": ttype, "offset": offset})
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{path}: bad general.alignment={alignment!r}")
    data_start = (r.pos + alignment - 1) // alignment * alignment
    for t in tensors:
        tid = t.pop("type_id")
        name, block, block_bytes = GGML_TYPES.get(tid, (f"type#{tid}", None, None))
        t["type"] = name
        n = 1
        for d in t["shape"]:
            n *= d
        t["offset"] += data_start
        if block is None:
            t["nbytes"] = None  # unknown type: reported by the caller
            continue
        if t["shape"] and t["shape"][0] % block:
            raise GGUFError(
                f"{path}: tensor {t['name']!r} ({name}): first dimension {t['shape'][0]} "
                f"is not a multiple of the block size {block}"
            )
        t["nbytes"] = n // block * block_bytes
        end = t["offset"] + t["nbytes"]
        if end > size:
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {t['name']!r} ends at byte {end}, "
                f"but the file has {size} bytes"
            )
    return meta, tensors


# ---------------------------------------------------------------------------
# Checks and names
# ---------------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# mx.load names a quantized GGUF tensor X as X.weight, X.scales, X.biases.
_SUFFIXES = ("weight", "scales", "biases", "bias")


def _module_name(gguf_base: str) -> str | None:
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``; None if unknown."""
    if gguf_base in _TOP_NAMES:
        return _TOP_NAMES[gguf_base]
    parts = gguf_base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def _split_name(name: str) -> tuple[str, str]:
    base, _, suffix = name.rpartition(".")
    if suffix not in _SUFFIXES or not base:
        return name, ""
    return base, suffix


# Pre-tokenizer names of llama.cpp (llama-vocab.cpp, tokenizer.ggml.pre), in
# the two families that HF tokenizers expresses exactly:
# "\p{N}" (each digit its own piece), then the GPT-2 regex ...
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# ... or the GPT-2 regex alone. Not "default" (also what a missing key means):
# llama.cpp runs four regexes for it and warns that quality is degraded.
_PRE_GPT2 = {"gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"}


def _meta_int(meta, key, path, default=None):
    v = meta.get(key, default)
    if v is None:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise GGUFError(f"{path}: metadata {key}={v!r} is not an integer")
    return v


def _meta_float(meta, key, path, default=None):
    v = meta.get(key, default)
    if v is None:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GGUFError(f"{path}: metadata {key}={v!r} is not a number")
    return float(v)


def check(path) -> tuple[dict, list[dict]]:
    """Read the header and refuse anything :func:`convert` cannot handle."""
    path = str(path)
    meta, tensors = read_header(path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{path}: missing metadata key 'general.architecture'")
    if arch != "llama":
        raise GGUFError(
            f"{path}: unsupported architecture general.architecture={arch!r} (only 'llama' is supported)"
        )
    if meta.get("llama.expert_count", 0):
        raise GGUFError(
            f"{path}: unsupported mixture-of-experts model llama.expert_count={meta['llama.expert_count']}"
        )
    tok_model = meta.get("tokenizer.ggml.model")
    if tok_model is None:
        raise GGUFError(f"{path}: missing metadata key 'tokenizer.ggml.model'")
    if tok_model == "llama":
        raise GGUFError(
            f"{path}: unsupported tokenizer tokenizer.ggml.model='llama' (SentencePiece); "
            "only 'gpt2' (byte-level BPE) is supported"
        )
    if tok_model != "gpt2":
        raise GGUFError(
            f"{path}: unsupported tokenizer tokenizer.ggml.model={tok_model!r}; "
            "only 'gpt2' (byte-level BPE) is supported"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_DIGITS_THEN_GPT2 and pre not in _PRE_GPT2:
        raise GGUFError(
            f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: "
            f"{', '.join(sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2))})"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not isinstance(meta.get(key), list) or not meta[key]:
            raise GGUFError(f"{path}: missing or empty metadata key {key!r}")
    for t in tensors:
        if t["type"] not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {t['name']!r} has unsupported type {t['type']} "
                f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
        base, _ = _split_name(t["name"])
        if _module_name(base) is None:
            raise GGUFError(f"{path}: unsupported tensor {t['name']!r} for a llama model")
        if t["type"] in _MLX_QUANTIZED and t["shape"][0] % 32:
            raise GGUFError(f"{path}: tensor {t['name']!r}: row length {t['shape'][0]} is not a multiple of 32")
    names = {t["name"] for t in tensors}
    for needed in ("token_embd.weight", "output_norm.weight"):
        if needed not in names:
            raise GGUFError(f"{path}: missing tensor {needed!r}")
    return meta, tensors


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def is_complete(out_dir) -> bool:
    """True if ``out_dir`` holds a finished conversion of the current format."""
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == FORMAT_VERSION


def _log(msg: str):
    print(f"krserve gguf: {msg}", file=sys.stderr, flush=True)


def _config(meta: dict, tensors: list[dict], arrays: dict, path: str) -> dict:
    P = "llama."
    hidden = _meta_int(meta, P + "embedding_length", path)
    heads = _meta_int(meta, P + "attention.head_count", path)
    kv_heads = _meta_int(meta, P + "attention.head_count_kv", path, heads)
    if heads <= 0 or hidden % heads:
        raise GGUFError(f"{path}: {P}embedding_length={hidden} is not a multiple of {P}attention.head_count={heads}")
    head_dim = _meta_int(meta, P + "attention.key_length", path, hidden // heads)
    rope_dim = _meta_int(meta, P + "rope.dimension_count", path, head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: unsupported partial rotary embedding {P}rope.dimension_count={rope_dim} (head size {head_dim})")
    vocab = arrays["model.embed_tokens.weight"].shape[0]
    n_tokens = len(meta["tokenizer.ggml.tokens"])
    if vocab != n_tokens:
        raise GGUFError(f"{path}: token_embd.weight has {vocab} rows but tokenizer.ggml.tokens has {n_tokens} entries")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, P + "block_count", path),
        "intermediate_size": _meta_int(meta, P + "feed_forward_length", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _meta_float(meta, P + "attention.layer_norm_rms_epsilon", path),
        "rope_theta": _meta_float(meta, P + "rope.freq_base", path, 10000.0),
        # llama.cpp's converter permutes the q/k rows so that its rotation of
        # adjacent pairs (GPT-J style) is right; MLX calls that "traditional".
        "rope_traditional": True,
        "max_position_embeddings": _meta_int(meta, P + "context_length", path, 4096),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in arrays,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in arrays,
        "mlp_bias": "model.layers.0.mlp.up_proj.bias" in arrays,
    }
    scaling = meta.get(P + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"{path}: unsupported rope scaling {P}rope.scaling.type={scaling!r}")
        cfg["rope_scaling"] = {"type": "linear", "factor": _meta_float(meta, P + "rope.scaling.factor", path)}
    n_layers = cfg["num_hidden_layers"]
    for i in range(n_layers):
        for mod in _BLOCK_NAMES.values():
            if f"model.layers.{i}.{mod}.weight" not in arrays:
                raise GGUFError(f"{path}: missing tensor for layer {i} ({mod}) with {P}block_count={n_layers}")
    if f"model.layers.{n_layers}.input_layernorm.weight" in arrays:
        raise GGUFError(f"{path}: more layers in the file than {P}block_count={n_layers}")

    # Quantization: the most common (group_size, bits) is the default; every
    # quantized tensor that differs gets a per-path entry.
    # The row length comes from the header; mx.load packs 32 // bits values
    # into each uint32 and keeps one scale per group.
    row_len = {}
    for t in tensors:
        base, suffix = _split_name(t["name"])
        if suffix == "weight":
            row_len[_module_name(base)] = t["shape"][0]
    quant = {}
    for key in arrays:
        if key.endswith(".scales"):
            mod = key[: -len(".scales")]
            packed, n_groups = arrays[mod + ".weight"].shape[-1], arrays[key].shape[-1]
            in_features = row_len[mod]
            bits, group = packed * 32 // in_features, in_features // n_groups
            if bits * in_features != packed * 32 or group * n_groups != in_features or bits not in (2, 3, 4, 5, 6, 8):
                raise GGUFError(f"{path}: tensor {mod}: cannot derive the quantization of a {in_features}-wide row "
                                f"from {packed} packed words and {n_groups} scales")
            quant[mod] = {"group_size": group, "bits": bits}
    for key, w in arrays.items():
        mod, suffix = key.rsplit(".", 1)
        if suffix == "weight" and mod not in quant and w.ndim == 2 and not mod.endswith("norm"):
            quant[mod] = False  # stays a float (dequantized) layer
    if any(quant.values()):
        counts: dict = {}
        for q in quant.values():
            if q:
                k = (q["group_size"], q["bits"])
                counts[k] = counts.get(k, 0) + 1
        group, bits = max(counts, key=counts.get)
        q_cfg = {"group_size": group, "bits": bits}
        for mod, q in sorted(quant.items()):
            if q != {"group_size": group, "bits": bits}:
                q_cfg[mod] = q
        cfg["quantization"] = q_cfg
        cfg["quantization_config"] = dict(q_cfg)
    return cfg


def _build_tokenizer(meta: dict, path: str, out: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFError(f"{path}: tokenizer.ggml.tokens: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merges = []
    for i, m in enumerate(meta["tokenizer.ggml.merges"]):
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{i}]={m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    pre = meta["tokenizer.ggml.pre"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        # llama.cpp splits on "\p{N}" first: every digit is its own piece.
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()

    # Control (3) and user-defined (4) tokens are matched whole in the input
    # text, as llama.cpp does; control tokens are special (skipped when
    # decoding with skip_special_tokens).
    added = []
    for i, (tok, ttype) in enumerate(zip(tokens, types)):
        if ttype in (3, 4):
            added.append(AddedToken(tok, special=(ttype == 3), normalized=False))
    if added:
        tk.add_tokens(added)

    def tok_at(key):
        i = meta.get(key)
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise GGUFError(f"{path}: {key}={i!r} is not a token id (vocabulary of {len(tokens)})")
        return tokens[i]

    bos, eos = tok_at("tokenizer.ggml.bos_token_id"), tok_at("tokenizer.ggml.eos_token_id")
    pad, unk = tok_at("tokenizer.ggml.padding_token_id"), tok_at("tokenizer.ggml.unknown_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        bos_id = vocab[bos]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)) if v is not None}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        model_max_length=meta.get("llama.context_length", 4096),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        fast.chat_template = template
    fast.save_pretrained(out)

    # transformers 5 would rebuild a LlamaTokenizer's pre-tokenizer from
    # scratch (dropping the byte-level one), so name the plain fast class.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["add_bos_token"] = add_bos
    tcfg["add_eos_token"] = False
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _fsync_tree(d: str):
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(parent: str, name: str):
    """Remove temp dirs of conversions into ``name`` whose process is gone."""
    import re

    # <prefix><name>-<pid>-[old-]<mkdtemp suffix>, exactly: never another name's.
    pattern = re.compile(re.escape(f"{_TMP_PREFIX}{name}-") + r"(\d+)-(?:old-)?[A-Za-z0-9_]{8}")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        m = pattern.fullmatch(e)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, e), ignore_errors=True)


def convert(gguf_path, out_dir) -> Path:
    """Convert ``gguf_path`` into an mlx-lm model directory at ``out_dir``.

    Returns ``out_dir`` as a Path. A no-op if ``out_dir`` already holds a
    finished conversion (see :func:`is_complete`). Raises :class:`GGUFError`
    for files it cannot convert, and if ``out_dir`` exists but is not a
    finished conversion (it is never deleted, since it might not be ours).
    """
    gguf_path = os.path.abspath(os.fspath(gguf_path))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if is_complete(out_dir):
        return Path(out_dir)
    parent, name = os.path.split(out_dir)
    replace_old = False
    if os.path.lexists(out_dir):
        if os.path.isdir(out_dir) and os.path.exists(os.path.join(out_dir, MARKER)):
            replace_old = True  # our own output, of another format version
        elif os.path.isdir(out_dir) and not os.listdir(out_dir):
            pass  # an empty directory is fine
        else:
            raise GGUFError(f"{out_dir}: exists and is not a finished conversion; remove it first")

    t0 = time.monotonic()
    meta, tensors = check(gguf_path)
    os.makedirs(parent, exist_ok=True)
    _clean_stale_tmp(parent, name)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        import mlx.core as mx

        try:
            raw = mx.load(gguf_path)
        except Exception as e:  # mlx raises RuntimeError/ValueError with its own text
            raise GGUFError(f"{gguf_path}: mlx could not read the tensors: {e}") from e
        arrays = {}
        for key, arr in raw.items():
            base, suffix = _split_name(key)
            mod = _module_name(base)
            if mod is None or not suffix:
                raise GGUFError(f"{gguf_path}: unsupported tensor {key!r} for a llama model")
            arrays[f"{mod}.{suffix}"] = arr
        cfg = _config(meta, tensors, arrays, gguf_path)
        if cfg["tie_word_embeddings"]:
            arrays.pop("lm_head.weight", None)

        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if isinstance(meta.get(key), int) and meta[key] not in eos_ids:
                eos_ids.append(meta[key])
        if isinstance(meta.get("tokenizer.ggml.bos_token_id"), int):
            cfg["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
        if eos_ids:
            cfg["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        if isinstance(meta.get("tokenizer.ggml.padding_token_id"), int):
            cfg["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]

        mx.save_safetensors(os.path.join(tmp, "model.safetensors"), arrays, metadata={"format": "mlx"})
        del raw, arrays
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        _build_tokenizer(meta, gguf_path, tmp)

        st = os.stat(gguf_path)
        marker = {
            "format_version": FORMAT_VERSION,
            "source": os.path.basename(gguf_path),
            "source_size": st.st_size,
            "general.name": meta.get("general.name"),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _fsync_tree(tmp)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

        old = None
        if replace_old:
            old = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-{os.getpid()}-old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        elif os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Someone else finished the same conversion first.
            if not is_complete(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"converted {gguf_path} -> {out_dir} in {time.monotonic() - t0:.1f}s")
    return Path(out_dir)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m krserve_worker.gguf",
        description="Convert a llama-architecture GGUF (gpt2/byte-level BPE tokenizer) into an mlx-lm model directory.",
    )
    ap.add_argument("gguf", help="input .gguf file")
    ap.add_argument("out", help="output model directory (created; a finished one is left as is)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.gguf, args.out)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
