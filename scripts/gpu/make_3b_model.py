#!/usr/bin/env python3
"""Build a random-weight model with Llama-3.2-3B's shape, fully offline.

    python scripts/gpu/make_3b_model.py OUTDIR [--backend mlx|torch] [--seed 0] [--tiny]

For speed benchmarks: decode speed depends on the shapes and the dtype, not on
the values. The directory holds

- config.json: llama, hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate
  8192, vocab 128256, rope_theta 500000 (no rope scaling), tied embeddings,
  max_position_embeddings 8192, torch_dtype bfloat16, eos_token_id;
- model*.safetensors (+ index): random bf16 weights, N(0, 0.02) for matrices,
  ones for the RMSNorm scales. Backend ``mlx`` (default) draws them with
  ``mx.random`` and writes them with ``mlx_lm.utils.save_model``; backend
  ``torch`` draws them with ``torch.randn`` (on CUDA when there is one) and
  writes the same tensor names with ``safetensors`` (used where mlx is not
  installed yet);
- a byte-level BPE tokenizer (trained on scripts/make_tiny_model.py's corpus,
  same special tokens: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2
  = EOS; ChatML template) whose vocabulary is padded with plain-ASCII filler
  tokens ("fillNNNNNN", vocabulary entries without merges, so they are never
  produced by encoding but decode to themselves) to exactly vocab_size
  contiguous ids.

It loads with ``mlx_lm.load(OUTDIR)``. ``--tiny`` keeps the vocabulary and
tokenizer but shrinks the layers (2 layers, hidden 256) for a CPU smoke test.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # scripts/ for make_tiny_model

import make_tiny_model as tiny  # noqa: E402

VOCAB = 128256

CONFIG_3B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "vocab_size": VOCAB,
    "torch_dtype": "bfloat16",
}


def build_tokenizer(vocab_size: int):
    """tiny.build_tokenizer's BPE, its vocabulary padded to vocab_size ids."""
    from tokenizers import Tokenizer

    raw = tiny.build_tokenizer(512)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n)), "trained ids must be contiguous"
    i = 0
    while n < vocab_size:
        tok = f"fill{i:06d}"
        i += 1
        if tok in vocab:
            continue
        vocab[tok] = n
        n += 1
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size, tok.get_vocab_size(True)
    return tok


def param_shapes(cfg: dict) -> dict:
    """HF/mlx-lm llama tensor names and shapes (tied embeddings: no lm_head)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def write_weights_mlx(out: str, cfg: dict, seed: int) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.utils import save_model

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    names = dict(tree_flatten(model.parameters()))
    want = param_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in names.items()} == want, "mlx-lm llama names/shapes differ"
    new = []
    for k, v in names.items():
        if v.ndim == 1:
            new.append((k, mx.ones(v.shape, dtype=mx.bfloat16)))
        else:
            new.append((k, (0.02 * mx.random.normal(v.shape)).astype(mx.bfloat16)))
        mx.eval(new[-1][1])
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    n = sum(v.size for _, v in new)
    save_model(out, model, donate_model=True)
    return n


def write_weights_torch(out: str, cfg: dict, seed: int) -> int:
    import torch
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = param_shapes(cfg)
    # Shards of at most ~4 GB, like mlx-lm's save_model (5 GB) does.
    shards, cur, cur_bytes = [], {}, 0
    for k, s in shapes.items():
        b = 2
        for d in s:
            b *= d
        if cur and cur_bytes + b > 4e9:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = s
        cur_bytes += b
    shards.append(cur)
    index = {"metadata": {"total_size": 0, "total_parameters": 0}, "weight_map": {}}
    n = 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k, s in shard.items():
            if len(s) == 1:
                t = torch.ones(s, dtype=torch.bfloat16, device=dev)
            else:
                t = (0.02 * torch.randn(s, generator=g, device=dev, dtype=torch.float32)).to(torch.bfloat16)
            tensors[k] = t.cpu()
            n += t.numel()
            index["metadata"]["total_size"] += t.numel() * 2
            index["weight_map"][k] = name
        save_file(tensors, os.path.join(out, name), metadata={"format": "mlx"})
        del tensors
    index["metadata"]["total_parameters"] = n
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=4)
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--backend", choices=["mlx", "torch"], default="mlx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (CPU smoke test); same tokenizer")
    args = ap.parse_args(argv)

    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)
    cfg = dict(CONFIG_3B)
    if args.tiny:
        cfg.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, intermediate_size=512)

    raw = build_tokenizer(cfg["vocab_size"])
    ids = {s: raw.token_to_id(s) for s in tiny.SPECIALS}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = tiny.CHAT_TEMPLATE
    hf.model_max_length = cfg["max_position_embeddings"]
    hf.save_pretrained(out)
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    t_tok = time.time() - t0

    writer = write_weights_mlx if args.backend == "mlx" else write_weights_torch
    n = writer(out, cfg, args.seed)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"wrote {out}: {n:,} parameters ({n * 2 / 1e9:.4f} GB bf16; safetensors files {size / 1e9:.4f} GB), "
          f"vocab {cfg['vocab_size']}, eos {cfg['eos_token_id']}, backend {args.backend}, "
          f"tokenizer {t_tok:.1f}s, total {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
