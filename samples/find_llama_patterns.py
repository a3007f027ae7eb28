"""Find the attention patterns tiny-llama learned and record the evidence in its sample.json.

    python samples/find_llama_patterns.py [--model samples/tiny-llama]

Three measurements, each ranking every (layer, head) on generated probes (seed 7, apart from the
corpus seeds) and recording the winner with find_patterns.py's kind of evidence:
  name-copy        plain story text, as for tiny-gpt: from the last prompt token, whose next token
                   starts the hero's name, to the name's earlier mentions
  chat-name-copy   the same in a chat: "<story>\\nWho found the ball?" + the generation prompt; the
                   answer starts with the name, read from the story
  chat-repeat-copy "Please repeat: <text>": from each answer position to the source token that the
                   answer copies next (an induction head), teacher-forced with the right answer
Measured with attn_implementation="eager" and output_attentions=True.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
from find_patterns import (
    PATTERN_EN,
    PATTERN_ZH,
    attentions,
    best_other_head,
    name_mass,
    name_positions,
    probe_prompts,
    top_tokens,
)
from find_patterns import PROMPTS as GPT_PROMPTS
from llama_chat import CHAT_PROMPTS, IM_END
from make_chat import ChatWriter

N_PROBE = 32  # probes per language and kind
PROMPTS = {
    "en": GPT_PROMPTS["en"],
    "zh": GPT_PROMPTS["zh"],
    "pattern": {
        "en": PATTERN_EN, "zh": PATTERN_ZH, "en_name": "Ben", "zh_name": "林思桃",
        "note": "plain text (no chat template), encoded with tokenizer.json's post-processor (bos at 0): "
        "the next token starts the main character's name; see patterns[kind=name-copy]",
    },
}  # fmt: skip
# the card's story questions (llama_chat.CHAT_PROMPTS) and one repeat request, as pattern prompts
CHAT_PATTERN = {"en": (CHAT_PROMPTS[7], "Ben"), "zh": (CHAT_PROMPTS[8], "林思桃")}
REPEAT_PATTERN = {
    "en": [
        CHAT_PROMPTS[4][0],
        {"role": "assistant", "content": "The green owl sleeps under the old bridge."},
    ],
    "zh": [CHAT_PROMPTS[6][0], {"role": "assistant", "content": "红色的小猫在大树下面唱歌。"}],
}


def chat_text(hf_tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def spans_to_positions(
    tok: Tokenizer, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """ids of rendered chat text (no special tokens added: the template wrote bos) and the token
    positions that overlap the character spans."""
    enc = tok.encode(text, add_special_tokens=False)
    return enc.ids, [i for i, (s, e) in enumerate(enc.offsets) if any(s < b and a < e for a, b in spans)]


def chat_name_positions(
    tok: Tokenizer, hf_tok, messages: list[dict], name: str
) -> tuple[list[int], list[int]]:
    text = chat_text(hf_tok, messages, add_generation_prompt=True)
    return spans_to_positions(tok, text, [m.span() for m in re.finditer(re.escape(name), text)])


def repeat_targets(
    tok: Tokenizer, hf_tok, messages: list[dict]
) -> tuple[list[int], list[int], list[int]] | None:
    """For [request, answer]: ids, the query positions (the generation prompt's last token, then each
    answer token but the last) and, per query, the source position of the token the answer copies
    next. None when source and answer do not tokenize alike (an English first word gains a space)."""
    text = chat_text(hf_tok, messages, add_generation_prompt=False)
    copy = messages[-1]["content"]
    src_end = text.index(IM_END)  # the request ends with the text to repeat
    ans_start = text.rindex(copy + IM_END)
    ids, src = spans_to_positions(tok, text, [(src_end - len(copy), src_end)])
    _, ans = spans_to_positions(tok, text, [(ans_start, ans_start + len(copy))])
    if len(src) != len(ans) or [ids[p] for p in src[1:]] != [ids[p] for p in ans[1:]]:
        return None
    return ids, [ans[0] - 1] + ans[:-1], src


def head_scores(model, ids: list[int], queries: list[int], targets: list[list[int]]) -> torch.Tensor:
    """(L, nh) attention mass from each query position on its target positions, averaged over queries."""
    att, _ = attentions(model, ids)  # (L, nh, S, S)
    return torch.stack([att[:, :, q, t].sum(-1) for q, t in zip(queries, targets)]).mean(0)


def name_evidence(model, tok: Tokenizer, ids: list[int], pos: list[int], layer: int, head: int) -> dict:
    """find_patterns.evidence's record (same keys as tiny-gpt's card) for prompt ids and name positions."""
    att, logits = attentions(model, ids)
    scores = att[:, :, -1, pos].sum(-1)  # (L, nh)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads  # query heads per K/V head
    group = [h for h in range(head - head % rep, head - head % rep + rep) if h != head]
    return {
        **name_mass(att, ids, pos, layer, head),
        "top_next_tokens": top_tokens(tok, logits, skip_special_tokens=False),
        # GQA: these query heads read the same keys and values, so they can learn the same pattern
        "same_kv_heads": {str(h): round(scores[layer, h].item(), 4) for h in group},
    }


def copy_evidence(model, tok: Tokenizer, ids: list[int], queries: list[int], src: list[int], layer: int,
                  head: int) -> dict:  # fmt: skip
    """The repeat-copy record: per query, the mass on the source token the answer copies next."""
    att, _ = attentions(model, ids)
    per_query = att[:, :, queries, src]  # (L, nh, Q): query k against its own target src[k]
    scores = per_query.mean(-1)  # (L, nh)
    ol, oh = best_other_head(scores, layer, head)
    return {
        "tokens": len(ids),
        "query_positions": queries,
        "source_positions": src,
        "mean_mass_on_source": round(scores[layer, head].item(), 4),
        "mass_per_query": [round(v, 4) for v in per_query[layer, head].tolist()],
        "uniform_baseline": round(sum(1 / (q + 1) for q in queries) / len(queries), 4),
        "best_other_head": {"layer": ol, "head": oh, "mean_mass_on_source": round(scores[ol, oh].item(), 4)},
        "top_next_tokens": top_tokens(
            tok, attentions(model, ids[: queries[0] + 1])[1], skip_special_tokens=False
        ),  # the answer's first token
    }


DEFINITIONS = {
    "name-copy": "attention mass from the last prompt token (the next token starts the name) on the token "
    "positions of the name's earlier mentions; positions index the prompt encoded with tokenizer.json, "
    "special tokens added (its post-processor puts bos at 0)",
    "chat-name-copy": "attention mass from the generation prompt's last token (the answer starts with the name) "
    "on the token positions of the name's mentions in the story; positions index apply_chat_template's ids "
    "(rendered with add_generation_prompt=True; the template writes bos, no other special tokens added)",
    "chat-repeat-copy": "mean over the answer's query positions (the generation prompt's last token, then each "
    "answer token but the last; the right answer teacher-forced) of the attention on the one source token that "
    "the answer copies next (source_positions[k] for query_positions[k]); positions index apply_chat_template's "
    "ids of the whole dialogue; top_next_tokens is the answer's first token",
}


def first_token_hit(model, ids: list[int], want: int) -> bool:
    return int(attentions(model, ids)[1].argmax()) == want


def probes(
    kind: str, english: bool, tok: Tokenizer, hf_tok
) -> list[tuple[list[int], list[int], list[list[int]], int]]:
    """(ids, query positions, target positions per query, the right token after the first query) x N_PROBE."""
    out = []
    if kind == "name-copy":
        for prompt, name in probe_prompts(N_PROBE, english):
            ids, pos = name_positions(tok, prompt, name)
            want = tok.encode((" " if english else "") + name, add_special_tokens=False).ids[0]
            out.append((ids, [len(ids) - 1], [pos], want))
    elif kind == "chat-name-copy":
        w = ChatWriter(7)
        while len(out) < N_PROBE:
            story = w.en_story() if english else w.zh_story()
            name = re.search(r"named (\w+)\." if english else r"名字叫(.+?)。", story).group(1)
            obj = re.search(r"found an? (\w+)" if english else r"找到了一.(\w+?)。", story).group(1)
            q = f"Who found the {obj}?" if english else f"谁找到了{obj}？"
            ids, pos = chat_name_positions(tok, hf_tok, [{"role": "user", "content": f"{story}\n{q}"}], name)
            out.append((ids, [len(ids) - 1], [pos], tok.encode(name, add_special_tokens=False).ids[0]))
    else:
        w = ChatWriter(7)
        while len(out) < N_PROBE:
            found = repeat_targets(tok, hf_tok, w.en_repeat_turn() if english else w.zh_repeat_turn())
            if found is not None:
                ids, queries, src = found
                out.append((ids[: queries[-1] + 1], queries, [[s] for s in src], ids[queries[0] + 1]))
    return out


def find_patterns(model_dir: Path) -> list[dict]:
    """Rank heads on probes, per kind and language, and return sample.json's "patterns" list."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    )  # sdpa: no probabilities
    model.eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    patterns = []
    for kind in ("name-copy", "chat-name-copy", "chat-repeat-copy"):
        for lang in ("en", "zh"):
            runs = probes(kind, lang == "en", tok, hf_tok)
            scores = torch.stack([head_scores(model, ids, q, t) for ids, q, t, _ in runs])  # (N, L, nh)
            mean = scores.mean(0)  # (L, nh)
            layer, head = divmod(int(mean.argmax()), mean.shape[1])
            hits = sum(first_token_hit(model, ids[: q[0] + 1], want) for ids, q, _, want in runs)
            if kind == "name-copy":
                prompt, name = (PATTERN_EN, "Ben") if lang == "en" else (PATTERN_ZH, "林思桃")
                shown = {"prompt": prompt}
                ev = {"prompt": prompt, "name": name, **name_evidence(model, tok, *name_positions(tok, prompt, name),
                                                                      layer, head)}  # fmt: skip
            elif kind == "chat-name-copy":
                messages, name = CHAT_PATTERN[lang]
                prompt = chat_text(hf_tok, messages, True)
                shown = {"prompt": prompt, "messages": messages}
                ids, pos = chat_name_positions(tok, hf_tok, messages, name)
                ev = {"prompt": prompt, "name": name, **name_evidence(model, tok, ids, pos, layer, head)}
            else:
                messages = REPEAT_PATTERN[lang]
                shown = {"prompt": chat_text(hf_tok, messages[:1], True), "messages": messages}
                ids, queries, src = repeat_targets(tok, hf_tok, messages)
                ev = {"dialogue": chat_text(hf_tok, messages, False),
                      **copy_evidence(model, tok, ids[: queries[-1] + 1], queries, src, layer, head)}  # fmt: skip
            what = "answer_first_token_top1" if kind == "chat-repeat-copy" else "probe_name_top1"
            patterns.append({
                "kind": kind, "lang": lang, "layer": layer, "head": head, **shown,
                "evidence": {
                    "definition": DEFINITIONS[kind], **ev,
                    "probe_stories" if kind != "chat-repeat-copy" else "probe_requests": len(runs),
                    "probe_mean_mass": round(mean[layer, head].item(), 4),
                    "probe_min_mass": round(scores[:, layer, head].min().item(), 4),
                    "probe_mean_mass_all_heads": [[round(v, 3) for v in r] for r in mean.tolist()],
                    what: f"{hits}/{len(runs)}",
                },
            })  # fmt: skip
    return patterns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tiny-llama")
    args = ap.parse_args()
    torch.set_num_threads(2)
    patterns = find_patterns(args.model)
    meta_path = args.model / "sample.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["prompts"] = {**PROMPTS, "chat": meta["prompts"].get("chat", [])}
        meta["patterns"] = patterns
        meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(patterns, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
