#!/usr/bin/env python3
"""Generate a tiny random-weight llama model directory for tests, fully offline.

    python scripts/make_tiny_model.py OUTDIR [--seed 0] [--arch llama|mamba]

The directory holds config.json, model.safetensors (float32, random weights from
``mx.random.seed(seed)``), and a byte-level BPE tokenizer trained with
``tokenizers`` on the inline text below (tokenizer.json, tokenizer_config.json,
chat_template.jinja). Special tokens: ``<|endoftext|>`` (0, also BOS),
``<|im_start|>`` (1), ``<|im_end|>`` (2, EOS). ``config.json`` has
``vocab_size`` equal to the tokenizer size (contiguous ids) and ``eos_token_id``.
Same seed, same files. It loads with ``mlx_lm.load(OUTDIR)``. ``--arch mamba``
makes a state-space model instead (its cache, ``ArraysCache``, cannot be trimmed:
the prompt cache tests use it).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A few KB of text to train the BPE merges on (ASCII plus some multi-byte UTF-8,
# so the streaming detokenizer sees split characters).
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Once upon a time there was a little model that wanted to speak. It read every
book in the library, one token at a time, and learned that words are made of
pieces, and pieces are made of bytes.
User: What is the capital of France?
Assistant: The capital of France is Paris. Paris is a city on the Seine.
User: Tell me a story about a robot.
Assistant: A small robot lived in a garden. Every morning it watered the
flowers, counted the bees and sang a song about the weather.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 42.
Code: def add(a, b): return a + b  # adds two numbers
for i in range(10): print(i)
if x > 0 and y < 1: z = x * y - 2 / 3
Café, naïve, résumé, crème brûlée, déjà vu, jalapeño, façade, Zürich.
Grüße aus München! Straße, Größe, schön, Übung, Ärger, Öl.
日本語のテキストも少しあります。東京は大きな都市です。
Emoji: 🙂 🚀 🎉 ❤️ 👍 — and punctuation: “quotes”, ‘single’, ellipsis…
The model streams text to the client while it generates, so the server must
never split a character in half and must never leak a stop string.
Stop strings like "\\n\\n" or "User:" end the answer early.
Hello world! Hello again, world. Goodbye, world.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
A journey of a thousand miles begins with a single step.
To be or not to be, that is the question.
All that glitters is not gold. Actions speak louder than words.
The early bird catches the worm. Better late than never.
"""


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines * 4, trainer=trainer)
    # BOS only when the caller asks for special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))],
    )
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=512, help="target BPE vocab size")
    ap.add_argument("--arch", choices=("llama", "mamba"), default="llama")
    args = ap.parse_args(argv)

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from transformers import PreTrainedTokenizerFast

    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)

    raw = build_tokenizer(args.vocab)
    vocab = raw.get_vocab()
    n_vocab = raw.get_vocab_size()
    assert sorted(vocab.values()) == list(range(n_vocab)), "token ids must be contiguous"
    ids = {s: raw.token_to_id(s) for s in SPECIALS}

    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 2048
    hf.save_pretrained(out)
    # Make sure transformers keeps our ByteLevel pre-tokenizer/decoder on load.
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")

    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "vocab_size": n_vocab,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": "float32",
    }
    if args.arch == "mamba":
        from mlx_lm.models import mamba

        cfg = {
            "model_type": "mamba",
            "architectures": ["MambaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "state_size": 8,
            "num_hidden_layers": 2,
            "conv_kernel": 4,
            "use_bias": False,
            "use_conv_bias": True,
            "time_step_rank": 8,
            "tie_word_embeddings": False,
            "max_position_embeddings": 2048,
            "vocab_size": n_vocab,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "torch_dtype": "float32",
        }
        mx.random.seed(args.seed)
        model = mamba.Model(mamba.ModelArgs.from_dict(cfg))
    else:
        mx.random.seed(args.seed)
        model = llama.Model(llama.ModelArgs.from_dict(cfg))
    params = dict(tree_flatten(model.parameters()))
    # Untied lm_head: with tied embeddings a random model just repeats its last
    # token, which makes stop-string and resume tests meaningless.
    params = {k: v.astype(mx.float32) for k, v in sorted(params.items())}
    mx.eval(params)
    mx.save_safetensors(os.path.join(out, "model.safetensors"), params, metadata={"format": "mlx"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {out}: vocab {n_vocab}, eos {cfg['eos_token_id']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
