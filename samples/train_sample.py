"""Train the project's sample model: a byte-level BPE tokenizer and a 4-layer GPT-2 on samples/corpus.

    python samples/train_sample.py [--out samples/tiny-gpt] [--steps N] [--seed S]

Needs the export extras (torch, transformers, safetensors) and tokenizers. Deterministic for a
given seed, step count and thread count on the same torch build. About 4 minutes on 2 idle CPU
cores; 7-9.5 minutes measured on a shared, busy 2-core machine.
Writes config.json, generation_config.json, model.safetensors, tokenizer.json and sample.json.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning. On a shared 2-core machine a spinning worker
# fights the other load: measured 1.84 s/step spinning vs 0.92 s/step passive (0.21 s/step
# either way when the machine is idle). Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tokenizers import Tokenizer, processors
from training import (
    RECIPE,
    arguments,
    byte_level_bpe,
    check_round_trip,
    corpus_files,
    mean_loss,
    sampled_windows,
    tiled_windows,
    train,
    training_record,
    write_card,
)
from transformers import GPT2Config, GPT2LMHeadModel

EOT = "<|endoftext|>"


def train_tokenizer(train_txt: Path, vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE with <|endoftext|> as id 0; checks exact round trips on the corpus."""
    tok, trainer = byte_level_bpe(vocab_size, [EOT])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train([str(train_txt)], trainer)
    return tok


def encode_stream(tok: Tokenizer, lines: list[str]) -> torch.Tensor:
    """The training stream: each document's ids followed by <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for e in tok.encode_batch(lines):
        ids.extend(e.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)  # (N,)


def main() -> None:
    args = arguments(__doc__, "tiny-gpt", steps=700)

    hp = {
        "vocab_size": 2048,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "n_positions": 256,
        **RECIPE,
        "activation": "gelu_new",
        "dropout": 0.0,
    }
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    train_txt, val_txt = args.corpus / "train.txt", args.corpus / "val.txt"
    train_lines = train_txt.read_text(encoding="utf-8").splitlines()
    val_lines = val_txt.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(train_txt, hp["vocab_size"])
    check_round_trip(tok, train_lines + val_lines)
    eot = tok.token_to_id(EOT)
    train_ids, val_ids = encode_stream(tok, train_lines), encode_stream(tok, val_lines)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_ids)} tokens, val {len(val_ids)}")

    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=hp["n_positions"],
        n_embd=hp["n_embd"],
        n_layer=hp["n_layer"],
        n_head=hp["n_head"],
        activation_function=hp["activation"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters (tied embeddings)")

    # nanoGPT's split: weight decay on matrices only, not on biases, LayerNorm or position table
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    train_seconds = train(model, decay, no_decay, train_ids, hp, args.steps, args.seed)

    # train loss on a fixed, seeded sample of windows the size of the validation set
    T = hp["block_size"]
    val_w = tiled_windows(val_ids, T)
    train_w = sampled_windows(train_ids, T, len(val_w))
    train_loss, val_loss = mean_loss(model, train_w, 16), mean_loss(model, val_w, 16)
    print(f"train loss {train_loss:.4f}  val loss {val_loss:.4f}  val ppl {math.exp(val_loss):.3f}")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    wall = time.time() - t_start

    from find_patterns import PROMPTS, find_patterns  # samples/ is on sys.path when run as a script

    patterns = find_patterns(model, tok)
    sample = {
        "format": "gptdeploy-sample",
        "version": 1,
        "name": "tiny-gpt",
        "description": (
            "A 4-layer GPT-2 (transformers GPT2LMHeadModel, ~1.1M parameters) trained from scratch "
            "on a generated English + Chinese corpus of children's-story sentences, daily-life "
            "sentences, and 'say it again' and memory-game documents that make the model copy earlier text."
        ),
        "corpus": {
            **corpus_files(train_txt, val_txt),
            "stream": "one document per line; the token stream is each line's ids followed by "
            f"<|endoftext|> (id {eot}); no newline tokens",
            "train_tokens": len(train_ids),
            "val_tokens": len(val_ids),
        },
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers)",
            "vocab_size": tok.get_vocab_size(),
            "eos_token": EOT,
            "eos_token_id": eot,
            "pre_tokenizer": "each CJK character split off, then GPT-2 ByteLevel",
        },
        "training": training_record(hp, args, n_params, "train_sample.py", train_seconds, wall),
        "metrics": {
            "train_loss": round(train_loss, 4),
            "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 4),
            "loss_definition": "mean next-token cross-entropy (nats) over non-overlapping "
            f"{T}-token windows of the stream",
        },
        "prompts": PROMPTS,
        "patterns": patterns,
    }
    write_card(out, sample)
    print(f"wrote {out} in {wall:.0f}s")


if __name__ == "__main__":
    main()
