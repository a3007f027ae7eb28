"""What train_sample.py (tiny-gpt) and train_llama.py (tiny-llama) share: the command line, the
byte-level BPE set-up, the optimization recipe and training loop, the loss measurements, and the
sample.json pieces both cards carry. Each script keeps its model, tokenizer extras and data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent  # repository root: paths in sample.json are relative to it
# CJK ideographs, CJK punctuation and full-width forms are split off one character at a time
# before the GPT-2 byte-level step, so that BPE merges stay inside a character. Without it a
# run like 他喜欢吃苹果 is one pre-token and merges cross character boundaries (measured:
# "他喜欢吃" + the first byte of 苹 became one token), so a prompt ending at a character boundary
# tokenizes unlike anything seen in training. Characters outside the corpus still fall back
# to byte pieces (饕 -> 2 tokens, 🙂 -> 4): the runtime must cope with partial UTF-8 either way.
CJK_CHAR = Regex("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
# The optimization both samples are trained with; each card records it among its hyperparameters.
RECIPE = {
    "block_size": 256,
    "batch_size": 12,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 40,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
}


def rel(path: Path) -> str:
    """A path as sample.json records it: relative to the repository root, with forward slashes."""
    return path.resolve().relative_to(ROOT).as_posix()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arguments(doc: str, name: str, steps: int) -> argparse.Namespace:
    """The training command line; --out defaults to samples/<name>, --steps to `steps`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "samples" / name)
    ap.add_argument("--corpus", type=Path, default=ROOT / "samples" / "corpus")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def byte_level_bpe(vocab_size: int, special_tokens: list[str]) -> tuple[Tokenizer, trainers.BpeTrainer]:
    """An untrained GPT-2 style byte-level BPE (each CJK character split off first) and its trainer,
    which gives the special tokens the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(CJK_CHAR, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def check_round_trip(tok: Tokenizer, lines: list[str]) -> None:
    bad = [s for s, e in zip(lines, tok.encode_batch(lines)) if tok.decode(e.ids) != s]
    if bad:
        raise SystemExit(f"tokenizer does not round-trip {len(bad)} lines, e.g. {bad[0]!r}")


def lr_at(step: int, hp: dict, steps: int) -> float:
    """Linear warmup, then cosine down to min_lr at the last of `steps`."""
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    frac = (step - hp["warmup_steps"]) / max(1, steps - hp["warmup_steps"])
    return hp["min_lr"] + 0.5 * (1 + math.cos(math.pi * frac)) * (hp["lr"] - hp["min_lr"])


def windows_at(stream: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    """The (len(starts), T+1) windows of the stream that begin at `starts`."""
    return torch.stack([stream[s : s + T + 1] for s in starts.tolist()])


def train(
    model: torch.nn.Module,
    decay: list[torch.nn.Parameter],
    no_decay: list[torch.nn.Parameter],
    train_ids: torch.Tensor,
    hp: dict,
    steps: int,
    seed: int,
) -> float:
    """AdamW (weight decay on `decay` only) for `steps` batches of random windows drawn with a
    generator seeded `seed`; prints progress every 25 steps and returns the training seconds."""
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"],
        betas=tuple(hp["betas"]),
    )
    T, B = hp["block_size"], hp["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t_train = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=gen)  # (B,)
        w = windows_at(train_ids, starts, T)  # (B, T+1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp, steps)
        logits = model(input_ids=w[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step, hp, steps):.2e}  "
                f"{time.time() - t_train:6.1f}s",
                flush=True,
            )
    return time.time() - t_train


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> float:
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


def sampled_windows(stream: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """n (T+1)-token windows at starts drawn with their own generator, seeded 0: a fixed sample."""
    starts = torch.randint(0, len(stream) - T - 1, (n,), generator=torch.Generator().manual_seed(0))
    return windows_at(stream, starts, T)


def corpus_files(train_txt: Path, val_txt: Path) -> dict:
    """The start of sample.json's "corpus": the story corpus files, their hashes and generator."""
    return {
        "train": rel(train_txt),
        "val": rel(val_txt),
        "train_sha256": sha256(train_txt),
        "val_sha256": sha256(val_txt),
        "generator": "samples/corpus/make_corpus.py",
    }


def training_record(
    hp: dict,
    args: argparse.Namespace,
    parameters: int,
    script: str,
    train_seconds: float,
    wall_seconds: float,
    **notes,
) -> dict:
    """sample.json's "training": the hyperparameters, the run (`notes` after its token count), the
    library versions and the command that repeats it."""
    return {
        **hp,
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "parameters": parameters,
        "tokens_seen": args.steps * hp["batch_size"] * hp["block_size"],
        **notes,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "command": f"python samples/{script} --steps {args.steps} --seed {args.seed}",
    }


def write_card(out: Path, sample: dict) -> None:
    """Write out/sample.json, its "files" the SHA-256 of every other file in the directory."""
    sample["files"] = {
        name: sha256(out / name) for name in sorted(p.name for p in out.iterdir() if p.name != "sample.json")
    }
    (out / "sample.json").write_text(
        json.dumps(sample, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
