"""Tiny, seeded, in-process sources for tests: HF directories of every family (GPT-2, Llama, Mistral,
Qwen2, Qwen3, GPT-NeoX) made by transformers itself, and nanoGPT checkpoints."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import torch

EOT = "<|endoftext|>"
# Fixed training text for the test tokenizer: English, punctuation, digits, newlines and Chinese.
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Attention is all you need!\n"
    "A deploy bundle carries its model, its tokenizer and the evidence that they agree.\n"
    'Numbers 0123456789, quotes "like this" and (brackets) are text too; so: are tabs\tand spaces.\n'
    "你好，世界。我们一起学习语言模型，注意力机制很有用。\n"
    "今天天气很好。模型导出以后也要验证。\n"
)
# Weight std: 0.02 (GPT-2's init) except where it would hide bugs. At 0.02 the MLP's inputs sit
# near 0.1, where tanh and exact GELU differ by < 1e-6, so a mixed-up GELU kind passed a 1e-5
# parity check (measured); c_fc at 0.2 moves them to ~1 and c_attn at 0.1 makes attention peaked.
# The other families: peaked attention (q, k at 0.15) so that a wrong rotary, window or mask shows,
# and gate/up at 0.2 so that SwiGLU is not near-linear; embeddings and heads at 0.1 so that the
# logits spread (greedy choices are not near-ties).
STD = {
    "attn.c_attn.weight": 0.1, "mlp.c_fc.weight": 0.2,
    "q_proj.weight": 0.15, "k_proj.weight": 0.15, "v_proj.weight": 0.1, "query_key_value.weight": 0.15,
    "gate_proj.weight": 0.2, "up_proj.weight": 0.2, "dense_h_to_4h.weight": 0.2,
    "embed_tokens.weight": 0.1, "embed_in.weight": 0.1, "lm_head.weight": 0.1, "embed_out.weight": 0.1,
}
TOKENIZER_MERGED = 296  # BPE size before <|endoftext|>: 297 tokens in all, not a multiple of 64
META_CHARS = (
    "\n !\"'(),-.:;?0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz你好世界我们学习模型"
)


@functools.lru_cache(maxsize=1)
def _bpe() -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """(vocab with <|endoftext|> last, merges, tokenizer.json) shaped like GPT-2's own files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_MERGED, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab[EOT] = len(vocab)  # as in GPT-2: the last id, in the BPE vocabulary and an added special token
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    final = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
    )
    final.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    final.decoder = decoders.ByteLevel()
    final.post_processor = processors.ByteLevel(trim_offsets=False)
    final.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return vocab, merges, final.to_str()


def tokenizer_json() -> str:
    return _bpe()[2]


def make_hf_gpt2_dir(
    path: Path,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    vocab_size: int | None = None,
    n_positions: int = 64,
    seed: int = 0,
    tokenizer: str | None = "json",
    weights: str = "safetensors",
    **config_overrides,
) -> Path:
    """A random GPT2LMHeadModel saved with save_pretrained, plus a byte-level BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, merges, tok_json = _bpe()
    n_tok = len(vocab)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the test tokenizer's {n_tok}")
    path = Path(path)
    settings = dict(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=vocab[EOT],
        eos_token_id=vocab[EOT],
    )
    config = GPT2Config(**{**settings, **config_overrides})
    model = GPT2LMHeadModel(config).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    if weights == "bin":  # transformers 5 always writes safetensors; older fine-tunes ship .bin
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
        torch.save(state, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    elif weights != "safetensors":
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    if tokenizer == "json":
        (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    elif tokenizer == "vocab_merges":
        (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif tokenizer is not None:
        raise ValueError(f"tokenizer must be 'json', 'vocab_merges' or None, got {tokenizer!r}")
    return path


# Per family: a tiny shape that breaks an assumption (GQA 3:1, MQA, head_dim != hidden / heads,
# partial rotary), in transformers' own config names. Tests override any key.
FAMILY_CONFIGS = {
    "llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=48,
                    sliding_window=5),
    "qwen2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  tie_word_embeddings=True),
    "qwen3": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  intermediate_size=48, tie_word_embeddings=True),
    "gpt_neox": dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, rotary_pct=0.25),
}


def make_hf_dir(
    path: Path,
    family: str,
    *,
    seed: int = 0,
    n_layer: int = 2,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """A random transformers model of `family` (its model_type) saved with save_pretrained, plus
    the test tokenizer. dtype "bfloat16"/"float16" saves the weights so; max_shard_size shards them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab, _, tok_json = _bpe()
    eot = vocab[EOT]
    settings = {"vocab_size": len(vocab), "num_hidden_layers": n_layer, "max_position_embeddings": 64,
                "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": False, **FAMILY_CONFIGS[family]}
    config = AutoConfig.for_model(family, **{**settings, **config_overrides})
    torch.manual_seed(seed)  # transformers' own init of anything _randomize leaves alone
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    _randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    return path


def meta_vocab() -> dict:
    """nanoGPT's meta.pkl layout (data/shakespeare_char/prepare.py): sorted characters."""
    chars = sorted(set(META_CHARS))
    return {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }


def make_nanogpt_ckpt(
    path: Path,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    vocab_size: int | None = None,
    block_size: int = 64,
    bias: bool = True,
    orig_mod: bool = False,
    meta: bool = True,
    seed: int = 0,
) -> Path:
    """path/ckpt.pt in nanoGPT train.py's format (model, optimizer, model_args, iter_num, ...); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or meta_vocab()["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    C, sd = n_embd, {}

    def normal(*shape, mean=0.0, std=0.02):
        return torch.randn(*shape, generator=g) * std + mean

    def ln(name):
        sd[name + ".weight"] = normal(C, mean=1.0, std=0.1)  # around 1, not 1: no accidental symmetry
        if bias:
            sd[name + ".bias"] = normal(C, std=0.05)

    def linear(name, n_in, n_out):
        sd[name + ".weight"] = normal(n_out, n_in, std=_std(name + ".weight"))  # nn.Linear: (out, in)
        if bias:
            sd[name + ".bias"] = normal(n_out, std=0.05)

    sd["transformer.wte.weight"] = normal(vocab_size, C)
    sd["transformer.wpe.weight"] = normal(block_size, C)
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        ln(p + ".ln_1")
        linear(p + ".attn.c_attn", C, 3 * C)
        linear(p + ".attn.c_proj", C, C)
        ln(p + ".ln_2")
        linear(p + ".mlp.c_fc", C, 4 * C)
        linear(p + ".mlp.c_proj", 4 * C, C)
    ln("transformer.ln_f")
    sd["lm_head.weight"] = sd[
        "transformer.wte.weight"
    ]  # tied: one tensor under two names, as torch.save keeps
    if orig_mod:  # a torch.compile'd model's state dict
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    params = [v for k, v in sd.items() if not k.endswith("lm_head.weight")]
    model_args = dict(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        bias=bias,
        vocab_size=vocab_size,
        dropout=0.0,
    )
    ckpt = {
        "model": sd,
        "optimizer": torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95)).state_dict(),
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": {
            "dataset": "shakespeare_char",
            "batch_size": 12,
            "learning_rate": 6e-4,
            "compile": orig_mod,
            **model_args,
        },
    }
    torch.save(ckpt, path / "ckpt.pt")
    if meta:
        with open(path / "meta.pkl", "wb") as f:
            pickle.dump(meta_vocab(), f)
    return path / "ckpt.pt"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights (std: STD); norm weights near 1 and non-zero biases, so nothing is symmetric."""
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight") and tied:
                continue  # tied to wte
            if ".ln_" in name or name.startswith("transformer.ln_f") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * _std(name))


def _std(name: str) -> float:
    return next((std for suffix, std in STD.items() if name.endswith(suffix)), 0.02)
