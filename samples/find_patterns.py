"""Find the attention pattern the sample learned and record the evidence in sample.json.

    python samples/find_patterns.py [--model samples/tiny-gpt]

The pattern is a name-copy head: when the next token is a story character's name, one head
puts most of its attention on the earlier mentions of that name, which is where the model
copies the name from (most names in the corpus are invented, so they cannot be memorized).
train_sample.py calls find_patterns() after training; run this file alone to re-measure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
from make_corpus import Writer

# Hand-written. Ben is one of the corpus's 32 English names, any of which could be the hero, and
# the friend Tom is in the prompt too; 林思桃 is an invented name found nowhere in the corpus.
PATTERN_EN = (
    "Once upon a time, there was a brave fox named Ben. Ben lived in the forest with "
    "his friend Tom. Every morning, Ben went to the lake to swim. One day,"
)
PATTERN_ZH = "从前，有一只勇敢的狐狸，名字叫林思桃。林思桃住在森林，她有一个好朋友叫小明。每天早上，林思桃都会去湖边游泳。有一天，"
PROMPTS = {
    "en": [
        "Once upon a time, there was a",
        "Tom is 8 years old. Every morning Tom",
        "Lily likes to eat",
        "What does Max like to eat?",
    ],
    "zh": ["从前，有一只", "他喜欢吃", "小明每天早上", "小红喜欢吃"],
    "pattern": {
        "en": PATTERN_EN,
        "zh": PATTERN_ZH,
        "en_name": "Ben",
        "zh_name": "林思桃",
        "note": "name copy: the next token starts the main character's name (greedy: ' Ben', '林'); "
        "the name-copy head (see patterns) attends from the last prompt token to the name's "
        "earlier mentions.",
    },
}
N_PROBE = 32  # generated stories per language used to rank heads (seed 7: apart from the corpus seeds)


def attentions(model: GPT2LMHeadModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (L, nh, S, S) and next-token logits at the last position (V,)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]), out.logits[0, -1]


def name_positions(tok: Tokenizer, prompt: str, name: str) -> tuple[list[int], list[int]]:
    """ids of the prompt and the token positions that lie inside earlier mentions of name."""
    enc = tok.encode(prompt)
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(name), prompt)]
    pos = [i for i, (s, e) in enumerate(enc.offsets) if any(s < b and a < e for a, b in spans)]  # " Tom" too
    return enc.ids, pos


def probe_prompts(n: int, english: bool, seed: int = 7) -> list[tuple[str, str]]:
    """(prompt, name): a generated story cut just before its main character's 4th mention."""
    w, out = Writer(seed), []
    while len(out) < n:
        text = w.en_story() if english else w.zh_story()
        name = re.search(r"named (\w+)\." if english else r"名字叫(.+?)。", text).group(1)
        cuts = [m.start() for m in re.finditer((" " if english else "") + re.escape(name), text)]
        if len(cuts) >= 4:
            out.append((text[: cuts[3]], name))
    return out


def name_copy_scores(
    model: GPT2LMHeadModel, tok: Tokenizer, prompt: str, name: str
) -> tuple[torch.Tensor, bool]:
    """Per-head attention mass (L, nh) from the last token on earlier mentions of name, and
    whether the model's top next token is the first token of the name."""
    ids, pos = name_positions(tok, prompt, name)
    att, logits = attentions(model, ids)
    first = tok.encode((" " if name.isascii() else "") + name).ids[0]  # English names follow a space
    return att[:, :, -1, pos].sum(-1), int(logits.argmax()) == first


def best_other_head(scores: torch.Tensor, layer: int, head: int) -> tuple[int, int]:
    """The (layer, head) with the highest score in (L, nh) `scores`, the chosen one left out."""
    others = scores.clone()
    others[layer, head] = -1
    return divmod(int(others.argmax()), scores.shape[1])


def name_mass(att: torch.Tensor, ids: list[int], pos: list[int], layer: int, head: int) -> dict:
    """The attention keys of a name-copy record: the chosen head's mass from the last token on the
    name positions, against a uniform spread and against the best other head."""
    scores = att[:, :, -1, pos].sum(-1)  # (L, nh)
    ol, oh = best_other_head(scores, layer, head)
    return {
        "tokens": len(ids),
        "query_position": len(ids) - 1,
        "name_positions": pos,
        "mass_on_name": round(scores[layer, head].item(), 4),
        "mass_per_position": [round(att[layer, head, -1, p].item(), 4) for p in pos],
        "uniform_baseline": round(len(pos) / len(ids), 4),
        "best_other_head": {"layer": ol, "head": oh, "mass_on_name": round(scores[ol, oh].item(), 4)},
    }


def top_tokens(tok: Tokenizer, logits: torch.Tensor, skip_special_tokens: bool = True) -> list:
    """The three likeliest next tokens, decoded, with their probabilities."""
    top = torch.softmax(logits, -1).topk(3)
    return [
        [tok.decode([i], skip_special_tokens=skip_special_tokens), round(p, 4)]
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]


def evidence(model: GPT2LMHeadModel, tok: Tokenizer, prompt: str, name: str, layer: int, head: int) -> dict:
    ids, pos = name_positions(tok, prompt, name)
    att, logits = attentions(model, ids)
    return {
        "prompt": prompt,
        "name": name,
        **name_mass(att, ids, pos, layer, head),
        "top_next_tokens": top_tokens(tok, logits),
    }


def find_patterns(model: GPT2LMHeadModel, tok: Tokenizer) -> list[dict]:
    """Rank heads on probe stories, per language, and return sample.json's "patterns" list."""
    model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    model.eval()
    patterns = []
    for lang, prompt, name in (("en", PATTERN_EN, "Ben"), ("zh", PATTERN_ZH, "林思桃")):
        probes = probe_prompts(N_PROBE, english=lang == "en")
        runs = [name_copy_scores(model, tok, p, n) for p, n in probes]
        scores = torch.stack([s for s, _ in runs])  # (N, L, nh)
        mean = scores.mean(0)  # (L, nh)
        layer, head = divmod(int(mean.argmax()), mean.shape[1])
        patterns.append(
            {
                "kind": "name-copy",
                "lang": lang,
                "layer": layer,
                "head": head,
                "prompt": prompt,
                "evidence": {
                    "definition": "attention mass from the last prompt token (the next token starts the name) "
                    "on the token positions of the name's earlier mentions; positions index the "
                    "prompt encoded with tokenizer.json, no special tokens added",
                    **evidence(model, tok, prompt, name, layer, head),
                    "probe_stories": len(probes),
                    "probe_mean_mass": round(mean[layer, head].item(), 4),
                    "probe_min_mass": round(scores[:, layer, head].min().item(), 4),
                    "probe_mean_mass_all_heads": [[round(v, 3) for v in r] for r in mean.tolist()],
                    "probe_name_top1": f"{sum(hit for _, hit in runs)}/{len(probes)}",
                },
            }
        )
    return patterns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tiny-gpt")
    args = ap.parse_args()
    model = GPT2LMHeadModel.from_pretrained(args.model, attn_implementation="eager")
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    patterns = find_patterns(model, tok)
    meta_path = args.model / "sample.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["prompts"], meta["patterns"] = PROMPTS, patterns
    meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(patterns, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
