"""How well tiny-llama chats: greedy answers to the card's prompts, and accuracy on held-out dialogues.

    python samples/llama_eval.py [--model samples/tiny-llama] [--per-kind 24]

Loads the directory the way a user does (AutoModelForCausalLM, AutoTokenizer), renders each
conversation with the shipped chat template (add_generation_prompt=True) and generates greedily
with transformers' generate until an eos of generation_config.json. train_llama.py records the
result in sample.json ("prompts.chat", "metrics.chat"); run this file alone to re-measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from llama_chat import CHAT_PROMPTS, IM_END, greedy_answer

HERE = Path(__file__).resolve().parent
PER_KIND = 24  # held-out dialogues scored per kind (8 kinds): ~1 minute on 2 CPU cores


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def chat_report(model_dir: Path, val: list[dict], per_kind: int = PER_KIND) -> dict:
    """{"examples": the card's prompts with their greedy answers, "accuracy": per dialogue kind}.

    A held-out dialogue is scored on its last assistant turn, with every earlier turn given:
    exact (the answer is the reference, character for character), first_token (the first answer
    token is right: for story-qa the start of the character's name, which must be copied from the
    story) and ended_turn (the model closed its turn with <|im_end|>)."""
    model, tok = load(model_dir)
    examples = []
    for messages in CHAT_PROMPTS:
        got = greedy_answer(model, tok, messages)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        examples.append(
            {"messages": messages, "prompt": prompt, "answer": got["answer"], "stop": got["stop"]}
        )

    by_kind: dict[str, list[dict]] = {}
    for d in val:
        by_kind.setdefault(d["kind"], []).append(d)
    accuracy = {}
    for kind in sorted(by_kind):
        runs, wrong = [], []
        for d in by_kind[kind][:per_kind]:
            context, ref = d["messages"][:-1], d["messages"][-1]["content"]
            got = greedy_answer(model, tok, context)
            ref_first = tok(ref, add_special_tokens=False).input_ids[0]
            runs.append((got["answer"] == ref, got["answer_ids"][:1] == [ref_first], got["stop"] == IM_END))
            if got["answer"] != ref and len(wrong) < 2:
                wrong.append(
                    {"question": context[-1]["content"][-60:], "reference": ref, "answer": got["answer"]}
                )
        n = len(runs)
        accuracy[kind] = {
            "dialogues": n,
            "exact": f"{sum(r[0] for r in runs)}/{n}",
            "first_token": f"{sum(r[1] for r in runs)}/{n}",
            "ended_turn": f"{sum(r[2] for r in runs)}/{n}",
            "wrong_examples": wrong,
        }
    return {"examples": examples, "accuracy": accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=HERE / "tiny-llama")
    ap.add_argument("--val", type=Path, default=HERE / "corpus" / "chat_val.jsonl")
    ap.add_argument("--per-kind", type=int, default=PER_KIND)
    ap.add_argument("--write", action="store_true", help="store the result in the model's sample.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    val = [json.loads(line) for line in args.val.read_text(encoding="utf-8").splitlines()]
    report = chat_report(args.model, val, args.per_kind)
    if args.write:
        card_path = args.model / "sample.json"
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["prompts"]["chat"], card["metrics"]["chat"] = report["examples"], report["accuracy"]
        card_path.write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
