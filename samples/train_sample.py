"""Train the project's sample model: a byte-level BPE tokenizer and a 4-layer GPT-2 on samples/corpus.

    python samples/train_sample.py [--out samples/tiny-gpt] [--steps N] [--seed S]

Needs the export extras (torch, transformers, safetensors) and tokenizers. Deterministic for a
given seed, step count and thread count on the same torch build. About 4 minutes on 2 idle CPU
cores; 7-9.5 minutes measured on a shared, busy 2-core machine.
Writes config.json, generation_config.json, model.safetensors, tokenizer.json and sample.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning. On a shared 2-core machine a spinning worker
# fights the other load: measured 1.84 s/step spinning vs 0.92 s/step passive (0.21 s/step
# either way when the machine is idle). Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent  # repository root: paths in sample.json are relative to it
EOT = "<|endoftext|>"
# CJK ideographs, CJK punctuation and full-width forms are split off one character at a time
# before the GPT-2 byte-level step, so that BPE merges stay inside a character. Without it a
# run like 他喜欢吃苹果 is one pre-token and merges cross character boundaries (measured:
# "他喜欢吃" + the first byte of 苹 became one token), so a prompt ending at a character boundary
# tokenizes unlike anything seen in training. Characters outside the corpus still fall back
# to byte pieces (饕 -> 2 tokens, 🙂 -> 4): the runtime must cope with partial UTF-8 either way.
CJK_CHAR = Regex("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def rel(path: Path) -> str:
    """A path as sample.json records it: relative to the repository root, with forward slashes."""
    return path.resolve().relative_to(ROOT).as_posix()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(train_txt: Path, vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE with <|endoftext|> as id 0; checks exact round trips on the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(CJK_CHAR, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_txt)], trainer)
    return tok


def check_round_trip(tok: Tokenizer, lines: list[str]) -> None:
    bad = [s for s, e in zip(lines, tok.encode_batch(lines)) if tok.decode(e.ids) != s]
    if bad:
        raise SystemExit(f"tokenizer does not round-trip {len(bad)} lines, e.g. {bad[0]!r}")


def encode_stream(tok: Tokenizer, lines: list[str]) -> torch.Tensor:
    """The training stream: each document's ids followed by <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for e in tok.encode_batch(lines):
        ids.extend(e.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)  # (N,)


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy over (W, T+1) windows, every target counted once."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]  # (B, T+1)
        logits = model(input_ids=w[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + w[:, 1:].numel()
    model.train()
    return total / count


def tiled_windows(stream: torch.Tensor, T: int) -> torch.Tensor:
    """Non-overlapping (W, T+1) windows covering the stream (targets overlap inputs by one token)."""
    n = (len(stream) - 1) // T
    return torch.stack([stream[i * T : i * T + T + 1] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "samples" / "tiny-gpt")
    ap.add_argument("--corpus", type=Path, default=ROOT / "samples" / "corpus")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    hp = {
        "vocab_size": 2048,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "n_positions": 256,
        "block_size": 256,
        "batch_size": 12,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 40,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
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
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"],
        betas=tuple(hp["betas"]),
    )

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to min_lr
        if step < hp["warmup_steps"]:
            return hp["lr"] * (step + 1) / hp["warmup_steps"]
        frac = (step - hp["warmup_steps"]) / max(1, args.steps - hp["warmup_steps"])
        return hp["min_lr"] + 0.5 * (1 + math.cos(math.pi * frac)) * (hp["lr"] - hp["min_lr"])

    T, B = hp["block_size"], hp["batch_size"]
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=gen)  # (B,)
        w = torch.stack([train_ids[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=w[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                f"{time.time() - t_train:6.1f}s",
                flush=True,
            )
    train_seconds = time.time() - t_train

    # train loss on a fixed, seeded sample of windows the size of the validation set
    val_w = tiled_windows(val_ids, T)
    starts = torch.randint(
        0, len(train_ids) - T - 1, (len(val_w),), generator=torch.Generator().manual_seed(0)
    )
    train_w = torch.stack([train_ids[s : s + T + 1] for s in starts.tolist()])
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
            "train": rel(train_txt),
            "val": rel(val_txt),
            "train_sha256": sha256(train_txt),
            "val_sha256": sha256(val_txt),
            "generator": "samples/corpus/make_corpus.py",
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
        "training": {
            **hp,
            "seed": args.seed,
            "steps": args.steps,
            "threads": args.threads,
            "parameters": n_params,
            "tokens_seen": args.steps * B * T,
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(wall, 1),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "command": f"python samples/train_sample.py --steps {args.steps} --seed {args.seed}",
        },
        "metrics": {
            "train_loss": round(train_loss, 4),
            "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 4),
            "loss_definition": "mean next-token cross-entropy (nats) over non-overlapping "
            f"{T}-token windows of the stream",
        },
        "prompts": PROMPTS,
        "patterns": patterns,
        "files": {
            name: sha256(out / name)
            for name in sorted(p.name for p in out.iterdir() if p.name != "sample.json")
        },
    }
    (out / "sample.json").write_text(
        json.dumps(sample, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    print(f"wrote {out} in {wall:.0f}s")


if __name__ == "__main__":
    main()
