"""The Llama-family sample end to end through the CLI: `export samples/tiny-llama` passes parity
against transformers' LlamaForCausalLM, `generate --chat` and `chat` give the greedy answers its
card (sample.json) records, and the audit of a generation shows its name-copy head.

The card's chat answers were generated with transformers (samples/llama_eval.py); the pattern was
found with eager attention (samples/find_llama_patterns.py). This checks that the deployed bundle
reproduces both, with gptdeploy's own template rendering, EOS handling and attention records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gptdeploy.audit import read_records
from gptdeploy.audit.verify import verify
from gptdeploy.audit.views import head_matrix, top_sources
from gptdeploy.bundle import Bundle
from gptdeploy.cli import cli

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "tiny-llama"
CARD = json.loads((SAMPLE / "sample.json").read_text(encoding="utf-8"))
SINGLE_TURNS = [c for c in CARD["prompts"]["chat"] if len(c["messages"]) == 1]
DIALOGUE = next(c for c in CARD["prompts"]["chat"] if len(c["messages"]) == 3)

pytestmark = pytest.mark.slow


def run(*args, stdin: str | None = None):
    r = CliRunner().invoke(cli, [str(a) for a in args], input=stdin)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama") / "bundle"
    r = run("export", SAMPLE, "-o", out)
    assert "parity vs transformers" in r.stdout and "LlamaForCausalLM" in r.stdout, r.stdout
    return out


def test_export_passes_parity_and_keeps_the_chat_settings(bundle):
    m = Bundle.load(bundle).manifest
    parity = m.parity["fp32"]
    assert parity["passed"] is True and parity["greedy_agree"] == parity["greedy_steps"] == 32
    assert m.source["kind"] == "sample" and m.config.family == "llama" and m.config.kv_heads == 2
    assert m.tokenizer.stop_ids == (2, 0)  # <|im_end|> ends a turn, <|endoftext|> a document
    assert m.tokenizer.chat_template == "chat_template.jinja"
    assert (bundle / "chat_template.jinja").read_text(encoding="utf-8") == CARD["tokenizer"]["chat_template"]


@pytest.mark.parametrize("turn", SINGLE_TURNS, ids=[t["messages"][0]["content"][:24] for t in SINGLE_TURNS])
def test_generate_chat_answers_as_the_card_records(bundle, turn):
    r = run("generate", bundle, turn["messages"][0]["content"], "--chat", "--max-new-tokens", "64")
    assert r.stdout == turn["answer"] + "\n"
    assert ", eos;" in r.stderr  # it ended its turn with <|im_end|>, not at the token limit


def test_chat_remembers_a_name_across_turns(bundle):
    """The card's dialogue: the model's own first answer is the one the card's history holds, and
    the second turn, rendered with that history, names the user."""
    user1, assistant1, user2 = (m["content"] for m in DIALOGUE["messages"])
    r = run("chat", bundle, stdin=f"{user1}\n{user2}\n")
    assert r.stdout.splitlines() == [assistant1, DIALOGUE["answer"]]


def test_the_audit_of_a_generation_shows_the_name_copy_head(bundle, tmp_path):
    """As tests/test_audit.py does for tiny-gpt: from the audit log alone, the card's English
    name-copy head (layer 2, head 0) puts most of the first generated token's attention on the
    earlier mentions of " Ben", more than any other head, and the model continues with the name.
    (The Chinese head is as clear, but the greedy output does not start with the full name.)"""
    pattern = next(p for p in CARD["patterns"] if p["kind"] == "name-copy" and p["lang"] == "en")
    layer, head, ev = pattern["layer"], pattern["head"], pattern["evidence"]
    log = tmp_path / "audit.log"
    run("generate", bundle, pattern["prompt"], "--max-new-tokens", "4", "--audit", log)
    assert verify(log).ok
    (rec,) = read_records(log)
    assert rec.output.text.startswith(" " + ev["name"]), rec.output.text
    names, query = ev["name_positions"], rec.query_for(0)
    assert query == ev["query_position"] and all(rec.labels[p].strip() == ev["name"] for p in names)
    row = head_matrix(rec, layer, head)[query]  # (S,) the row that produced the name
    mass = float(row[names].sum())
    assert mass >= 0.9 and mass >= 5 * len(names) / (query + 1), mass  # card: 0.999, uniform 0.079
    assert top_sources(rec, head_matrix(rec, layer, head), 1)[0][0].position in names
    others = [float(head_matrix(rec, li, h)[query][names].sum())
              for li in rec.layers for h in rec.heads if (li, h) != (layer, head)]
    assert mass > max(others), (mass, max(others))  # this head, not every head (card: next best 0.936)
