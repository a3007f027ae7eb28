"""Train tiny-llama: a chat-formatted Llama (RoPE, GQA, SwiGLU, RMSNorm) on samples/corpus.

    python samples/train_llama.py [--out samples/tiny-llama] [--steps N] [--seed S] [--threads T]

Trains a byte-level BPE tokenizer with the chat special tokens and a transformers
LlamaForCausalLM from scratch on the story corpus (train.txt) mixed with chat dialogues
(chat_train.jsonl, rendered through the chat template the tokenizer ships; see llama_chat.py).
Writes a standard Hugging Face Llama directory (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) and the sample.json card, then reloads
the directory with transformers to record greedy chat answers and the learned attention pattern.
Deterministic for a given seed, step count and thread count on the same torch build. About
9 minutes on 2 idle CPU cores (0.25 s/step); 22 minutes measured on the shared, busy machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # why: see train_sample.py (2x slower steps when spinning)

import torch
from llama_chat import CHAT_TEMPLATE, EOT, IM_END, IM_START, SPECIAL_TOKENS, build_tokenizer, dialogue_ids
from tokenizers import Tokenizer
from training import (
    RECIPE,
    arguments,
    byte_level_bpe,
    check_round_trip,
    corpus_files,
    mean_loss,
    rel,
    sampled_windows,
    sha256,
    tiled_windows,
    train,
    training_record,
    write_card,
)
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

HP = {
    "vocab_size": 2048,
    "n_layer": 4,
    "n_head": 4,
    "n_kv_head": 2,  # grouped-query attention: each K/V head serves two query heads
    "n_embd": 128,
    "head_dim": 32,
    "intermediate_size": 384,  # SwiGLU width: Llama's 8/3 x n_embd, rounded up to a multiple of 64
    "n_positions": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    **RECIPE,
    "activation": "silu (SwiGLU)",
    "dropout": 0.0,
}


def train_tokenizer(corpus_lines: list[str], dialogues: list[list[dict]], vocab_size: int) -> Tokenizer:
    """tiny-gpt's byte-level BPE (training.byte_level_bpe: CJK characters split off first), with the chat
    special tokens as ids 0-2, trained on the corpus and on every chat message (role line + content)."""
    tok, trainer = byte_level_bpe(vocab_size, SPECIAL_TOKENS)
    chat_text = [f"{m['role']}\n{m['content']}" for d in dialogues for m in d]
    tok.train_from_iterator(corpus_lines + chat_text, trainer)
    return tok


def read_dialogues(path: Path) -> list[dict]:
    """make_chat.py's records: {"kind": ..., "messages": [...]}."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def flat(docs: list[list[int]], eot: int) -> torch.Tensor:
    """One token stream: the documents in order, each starting with bos (<|endoftext|>), plus a final one."""
    return torch.tensor([i for d in docs for i in d] + [eot], dtype=torch.long)  # (N,)


@torch.no_grad()
def answer_loss(model: LlamaForCausalLM, encoded: list[tuple[list[int], list[bool]]]) -> float:
    """Mean cross-entropy on answer tokens only (assistant content and its <|im_end|>)."""
    model.eval()
    total, count = 0.0, 0
    for ids, answer in encoded:
        x = torch.tensor([ids])  # (1, S)
        logits = model(input_ids=x[:, :-1]).logits[0]  # (S-1, V)
        mask = torch.tensor(answer[1:])  # (S-1,) targets that are answer tokens
        loss = torch.nn.functional.cross_entropy(logits[mask], x[0, 1:][mask], reduction="sum")
        total, count = total + loss.item(), count + int(mask.sum())
    model.train()
    return total / count


def main() -> None:
    args = arguments(__doc__, "tiny-llama", steps=2000)
    hp = HP
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    paths = {n: args.corpus / n for n in ("train.txt", "val.txt", "chat_train.jsonl", "chat_val.jsonl")}
    train_lines = paths["train.txt"].read_text(encoding="utf-8").splitlines()
    val_lines = paths["val.txt"].read_text(encoding="utf-8").splitlines()
    chat_val_records = read_dialogues(paths["chat_val.jsonl"])
    chat_train = [r["messages"] for r in read_dialogues(paths["chat_train.jsonl"])]
    chat_val = [r["messages"] for r in chat_val_records]
    bpe = train_tokenizer(train_lines, chat_train, hp["vocab_size"])
    hf_tok = build_tokenizer(bpe, hp["n_positions"])
    tok = hf_tok.backend_tokenizer  # what tokenizer.json will hold: the bos post-processor included
    contents = [m["content"] for d in chat_train + chat_val for m in d]
    check_round_trip(tok, train_lines + val_lines + contents)
    eot, im_start, im_end = (tok.token_to_id(t) for t in SPECIAL_TOKENS)

    # Documents: a corpus line is bos + its ids (the post-processor adds bos); a dialogue is its
    # rendered template, which starts with bos. Shuffled together with a seeded RNG.
    train_docs = [e.ids for e in tok.encode_batch(train_lines)]
    chat_docs = [dialogue_ids(hf_tok, d)[0] for d in chat_train]
    docs = train_docs + chat_docs
    random.Random(args.seed).shuffle(docs)
    train_ids = flat(docs, eot)
    val_ids = flat([e.ids for e in tok.encode_batch(val_lines)], eot)
    chat_val_enc = [dialogue_ids(hf_tok, d) for d in chat_val]
    chat_val_ids = flat([ids for ids, _ in chat_val_enc], eot)
    n_corpus, n_chat = sum(map(len, train_docs)), sum(map(len, chat_docs))
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_ids)} tokens "
          f"({n_corpus} corpus + {n_chat} chat), val {len(val_ids)}, chat val {len(chat_val_ids)}")  # fmt: skip

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hp["n_embd"],
        intermediate_size=hp["intermediate_size"],
        num_hidden_layers=hp["n_layer"],
        num_attention_heads=hp["n_head"],
        num_key_value_heads=hp["n_kv_head"],
        head_dim=hp["head_dim"],
        max_position_embeddings=hp["n_positions"],
        rope_parameters={"rope_type": "default", "rope_theta": hp["rope_theta"]},
        rms_norm_eps=hp["rms_norm_eps"],
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters (tied embeddings)")

    # nanoGPT's split: weight decay on matrices (embedding included), not on the RMSNorm gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    train_seconds = train(model, decay, no_decay, train_ids, hp, args.steps, args.seed)

    # train loss on a fixed, seeded sample of windows the size of the validation set (as train_sample.py)
    T = hp["block_size"]
    val_w, chat_w = tiled_windows(val_ids, T), tiled_windows(chat_val_ids, T)
    train_w = sampled_windows(train_ids, T, len(val_w))
    train_loss, val_loss = mean_loss(model, train_w, 16), mean_loss(model, val_w, 16)
    chat_val_loss, chat_answer_loss = mean_loss(model, chat_w, 16), answer_loss(model, chat_val_enc)
    print(f"train loss {train_loss:.4f}  val loss {val_loss:.4f} (ppl {math.exp(val_loss):.3f})  "
          f"chat val loss {chat_val_loss:.4f}  answer loss {chat_answer_loss:.4f}")  # fmt: skip

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # Llama 3 / Qwen list every id that ends a reply; <|im_end|> first, the chat model's primary eos
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot).save_pretrained(out)
    # save_jinja_files=False: the template goes into tokenizer_config.json ("chat_template"), where
    # every reader of HF directories looks, not only into transformers 5's chat_template.jinja
    hf_tok.save_pretrained(out, save_jinja_files=False)
    wall_train = time.time() - t_start

    from find_llama_patterns import PROMPTS, find_patterns  # samples/ is on sys.path when run as a script
    from llama_eval import chat_report

    chat = chat_report(out, chat_val_records)
    patterns = find_patterns(out)
    sample = {
        "format": "gptdeploy-sample",
        "version": 1,
        "name": "tiny-llama",
        "description": (
            f"A {hp['n_layer']}-layer Llama (transformers LlamaForCausalLM: RoPE, grouped-query attention, "
            f"SwiGLU, RMSNorm; {n_params / 1e6:.2f}M parameters) trained from scratch on the generated "
            "English + Chinese story corpus mixed with chat dialogues in a ChatML template: it greets, "
            "repeats text it is asked to repeat, and answers questions about a short story by naming the character."
        ),
        "corpus": {
            **corpus_files(paths["train.txt"], paths["val.txt"]),
            "chat_train": rel(paths["chat_train.jsonl"]),
            "chat_val": rel(paths["chat_val.jsonl"]),
            "chat_train_sha256": sha256(paths["chat_train.jsonl"]),
            "chat_val_sha256": sha256(paths["chat_val.jsonl"]),
            "chat_generator": "samples/corpus/make_chat.py",
            "stream": f"documents shuffled together (seed {args.seed}), each starting with <|endoftext|> "
            f"(id {eot}, the bos): a corpus line as tokenizer.json encodes it (its post-processor adds "
            "bos), a dialogue as apply_chat_template renders and tokenizes it; one <|endoftext|> at the end",
            "train_tokens": len(train_ids),
            "train_corpus_tokens": n_corpus,
            "train_chat_tokens": n_chat,
            "train_dialogues": len(chat_train),
            "val_tokens": len(val_ids),
            "chat_val_tokens": len(chat_val_ids),
            "chat_val_dialogues": len(chat_val),
        },
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), saved by transformers' PreTrainedTokenizerFast.save_pretrained",
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {EOT: eot, IM_START: im_start, IM_END: im_end},
            "bos_token": EOT,
            "bos_token_id": eot,
            "eos_token": IM_END,
            "eos_token_id": im_end,
            "generation_eos_token_ids": [im_end, eot],
            "pad_token": EOT,
            "add_bos": "tokenizer.json's post-processor puts <|endoftext|> before every encoding with special "
            "tokens; the chat template writes bos itself, so encode rendered chats with add_special_tokens=False",
            "pre_tokenizer": "each CJK character split off, then GPT-2 ByteLevel",
            "chat_template": CHAT_TEMPLATE,
        },
        "training": training_record(
            hp,
            args,
            n_params,
            "train_llama.py",
            train_seconds,
            wall_train,
            loss_on="every token of the stream (user turns and template tokens included)",
        ),
        "metrics": {
            "train_loss": round(train_loss, 4),
            "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 4),
            "chat_val_loss": round(chat_val_loss, 4),
            "chat_val_perplexity": round(math.exp(chat_val_loss), 4),
            "chat_answer_loss": round(chat_answer_loss, 4),
            "loss_definition": "mean next-token cross-entropy (nats) over non-overlapping "
            f"{T}-token windows of the stream (val.txt, chat_val.jsonl); answer loss: over the answer "
            "tokens of the chat val dialogues only (assistant content and <|im_end|>), each dialogue whole",
            "chat": chat["accuracy"],
        },
        "prompts": {**PROMPTS, "chat": chat["examples"]},
        "patterns": patterns,
    }
    write_card(out, sample)
    print(f"wrote {out} in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
