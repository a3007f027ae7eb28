"""Audit records and the audit log: format round trip, a reader that needs no gptdeploy, the hash
chain against every kind of tampering, crash safety of appends, and recorded attention against
transformers and the torch runtime on real generations."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gptdeploy.audit import (
    AuditOptions,
    append_generation,
    append_records,
    pack_tril,
    read_records,
    token_labels,
    unpack_tril,
)
from gptdeploy.audit.log import GENESIS, scan
from gptdeploy.audit.verify import verify
from gptdeploy.audit.views import head_matrix, rollout, top_sources
from gptdeploy.errors import AuditError
from tests.audit_records import synthetic_record

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "tiny-gpt"


def cli():
    """The gptdeploy group with `audit` on it (registered in cli.py by the lead; added here until then)."""
    from gptdeploy.cli import cli as group
    from gptdeploy.cli.audit import audit

    if "audit" not in group.commands:
        group.add_command(audit)
    return group


def run_cli(*args: str):
    return CliRunner().invoke(cli(), ["audit", *map(str, args)])


@pytest.fixture
def log4(tmp_path):
    """A log of four synthetic records: (path, bytes, frames)."""
    path = tmp_path / "audit.log"
    for seed in range(4):
        append_records(path, [synthetic_record(seed)])
    return path, path.read_bytes(), scan(path).frames


def tampered(tmp_path: Path, data: bytes, name: str = "tampered.log") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def only_finding(path: Path):
    report = verify(path)
    assert len(report.findings) == 1, [f.message for f in report.findings]
    return report, report.findings[0]


# ------------------------------------------------------------------------------- the format


def test_tril_packing_restores_zeros_above_the_diagonal():
    rng = np.random.default_rng(0)
    full = rng.random((3, 7, 7)).astype(np.float32)  # nonzero everywhere, upper half included
    packed = pack_tril(full, "float32")
    assert packed.shape == (3, 7 * 8 // 2)
    back = unpack_tril(packed, 7)
    np.testing.assert_array_equal(back, np.tril(full))
    assert (np.triu(back, k=1) == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_reads_back_what_was_written(tmp_path, dtype):
    rec = synthetic_record(3, n_layer=3, n_head=2, dtype=dtype)
    append_records(tmp_path / "a.log", [rec])
    (back,) = read_records(tmp_path / "a.log")
    assert back.prompt == rec.prompt and back.output == rec.output
    assert (back.sampling, back.model, back.runtime, back.time) == (rec.sampling, rec.model, rec.runtime, rec.time)
    assert back.layers == rec.layers and back.heads == rec.heads and back.dtype == dtype
    assert back.index == 0 and back.sha256 == rec.sha256
    for got, want in zip(back.attention, rec.attention):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(dtype).astype(np.float32))  # exact, up to the storage cast
        assert (np.triu(got, k=1) == 0).all()
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5 if dtype == "float32" else 6e-4)


def test_header_is_one_canonical_json_line_hashed_without_its_own_hash(tmp_path):
    append_records(tmp_path / "a.log", [synthetic_record(0), synthetic_record(1)])
    data = (tmp_path / "a.log").read_bytes()
    line = data.split(b"\n", 1)[0]
    header = json.loads(line)
    assert next(iter(header)) == "sha256"
    assert hashlib.sha256(b"{" + line[77:]).hexdigest() == header["sha256"]
    body = {k: v for k, v in header.items() if k != "sha256"}
    assert json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == b"{" + line[77:]
    assert header["prev"] == GENESIS and header["index"] == 0 and header["format"] == "gptdeploy-audit"
    assert "他喜欢".encode() in line  # CJK stays readable in the file
    second = scan(tmp_path / "a.log").frames[1].header
    assert second["prev"] == header["sha256"] and second["index"] == 1


def test_a_reader_without_gptdeploy_following_the_docs_reads_the_log(tmp_path):
    """Run the reader printed in docs/audit-format.md with gptdeploy made unimportable."""
    doc = (ROOT / "docs" / "audit-format.md").read_text(encoding="utf-8")
    script = re.search(r"```python\n(# read_audit\.py.*?)```", doc, re.DOTALL).group(1)
    (tmp_path / "read_audit.py").write_text(script, encoding="utf-8")
    log = tmp_path / "a.log"
    append_records(log, [synthetic_record(0, dtype="float16"), synthetic_record(1, n_layer=1)])
    boot = "import sys, runpy; sys.modules['gptdeploy'] = None; runpy.run_path('read_audit.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", boot, str(log)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    ours = list(read_records(log))
    assert [r["index"] for r in rows] == [0, 1]
    for row, rec in zip(rows, ours):
        assert row["sha256"] == rec.sha256 and row["prompt"] == rec.prompt.text
        assert row["output_ids"] == rec.output.ids and row["labels"] == rec.labels
        assert row["shapes"] == {str(lay): [len(rec.heads), rec.positions, rec.positions] for lay in rec.layers}
        assert row["checksum"] == pytest.approx(sum(float(a.astype(np.float64).sum()) for a in rec.attention))


def test_token_labels_join_bytes_of_one_character_and_escape_broken_ones():
    from tokenizers import Tokenizer

    from tests.factories import tokenizer_json

    tok = Tokenizer.from_str(tokenizer_json())  # byte-level BPE: 你 is three byte tokens, 好 one
    ids = tok.encode("你好 the").ids
    vocab = [tok.id_to_token(i) for i in ids]
    assert token_labels(tok.decode, vocab, ids) == ["你[1/3]", "你[2/3]", "你[3/3]", "好", " the"]
    assert token_labels(tok.decode, vocab[:1], ids[:1]) == ["\\xe4"]  # a lone first byte of 你


# ------------------------------------------------------------------------- verify: tampering


def test_an_untouched_log_verifies(log4):
    path, _, frames = log4
    report = verify(path)
    assert report.ok and report.status == "ok" and report.records == report.intact == 4
    assert report.head == frames[-1].stored_sha
    result = run_cli("verify", path)
    assert result.exit_code == 0, result.output
    assert "ok: 4 records, 4 intact" in result.output


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("where", ["prefix", "hash", "prompt text", "index", "payload", "closing newline"])
def test_one_changed_byte_is_named(log4, tmp_path, where):
    _, data, frames = log4
    f = frames[1]
    line = data[f.offset : f.payload_offset]
    at = f.offset + {
        "prefix": 2, "hash": 40, "prompt text": line.index("喜欢".encode()), "index": line.index(b'"index":1') + 8,
        "payload": f.payload_size // 2 + (f.payload_offset - f.offset), "closing newline": f.end - 1 - f.offset,
    }[where]
    report, finding = only_finding(tampered(tmp_path, _flip(data, at)))
    assert report.status == "failed"
    assert finding.kind == "altered" and finding.position == 1, finding.message
    assert "position 1" in finding.message
    result = run_cli("verify", tmp_path / "tampered.log")
    assert result.exit_code == 1 and "altered" in result.output and "record 1" in result.output


def test_every_byte_of_a_record_is_covered(log4, tmp_path):
    """Change each 3rd byte of record 2 in turn: every change is found and pinned on record 2."""
    _, data, frames = log4
    f = frames[2]
    for at in range(f.offset, f.end, 3):
        report = verify(tampered(tmp_path, _flip(data, at)))
        assert [(x.kind, x.position) for x in report.findings] == [("altered", 2)], (at - f.offset, report.findings)


@pytest.mark.parametrize("gone", [0, 1, 2])
def test_a_deleted_record_is_named(log4, tmp_path, gone):
    _, data, frames = log4
    f = frames[gone]
    report, finding = only_finding(tampered(tmp_path, data[: f.offset] + data[f.end :]))
    assert finding.kind == "removed" and finding.position == gone
    assert f"(index {gone})" in finding.message
    assert report.intact == 3


def test_deleting_the_last_record_needs_the_kept_head_hash(log4, tmp_path):
    path, data, frames = log4
    head = verify(path).head
    short = tampered(tmp_path, data[: frames[3].offset])
    assert verify(short).ok  # a shorter chain is still a valid chain ...
    report = verify(short, expect_head=head)
    assert not report.ok and report.findings[0].kind == "removed"  # ... unless its head was kept elsewhere
    assert run_cli("verify", short, "--expect-head", head).exit_code == 1
    append_records(path, [synthetic_record(9)])  # a log that grew after the anchor is fine
    assert verify(path, expect_head=head).ok


@pytest.mark.parametrize("pair", [(1, 2), (0, 1), (2, 3)])
def test_two_swapped_records_are_named(log4, tmp_path, pair):
    _, data, frames = log4
    a, b = (frames[i] for i in pair)
    swapped = data[: a.offset] + data[b.offset : b.end] + data[a.offset : a.end] + data[b.end :]
    _, finding = only_finding(tampered(tmp_path, swapped))
    assert finding.kind == "reordered" and finding.position == pair[0]
    assert f"positions {pair[0]} and {pair[1]} are swapped" in finding.message


def test_an_inserted_copy_is_named(log4, tmp_path):
    _, data, frames = log4
    copy = data[frames[0].offset : frames[0].end]
    _, finding = only_finding(tampered(tmp_path, data[: frames[2].offset] + copy + data[frames[2].offset :]))
    assert finding.kind == "inserted" and finding.position == 2
    assert "copy of the record at position 0" in finding.message


def test_an_inserted_forged_record_with_a_valid_link_is_named(log4, tmp_path):
    """A forger who knows the format writes a well-formed record that links to record 1 and
    puts it before record 2: record 2 still links to record 1, so the forged one is outside."""
    _, data, frames = log4
    forge = tampered(tmp_path, data[: frames[2].offset], "forge.log")
    append_records(forge, [synthetic_record(42)])
    forged = forge.read_bytes()[frames[2].offset :]
    _, finding = only_finding(tampered(tmp_path, data[: frames[2].offset] + forged + data[frames[2].offset :]))
    assert finding.kind == "inserted" and finding.position == 2, finding.message
    assert "followed by position 3" in finding.message


def test_a_record_replaced_and_rehashed_is_named(log4, tmp_path):
    _, data, frames = log4
    forge = tampered(tmp_path, data[: frames[1].offset], "forge.log")
    append_records(forge, [synthetic_record(77)])  # a different record 1, correctly hashed
    _, finding = only_finding(tampered(tmp_path, forge.read_bytes() + data[frames[2].offset :]))
    assert finding.kind == "altered" and finding.position == 1 and "re-hashed" in finding.message


@pytest.mark.parametrize("cut", ["in the header", "in the payload", "the closing newline", "after the prefix"])
def test_a_file_truncated_mid_record_is_a_truncated_tail(log4, tmp_path, cut):
    _, data, frames = log4
    f = frames[3]
    end = {"in the header": f.offset + 100, "in the payload": f.payload_offset + f.payload_size // 3,
           "the closing newline": f.end - 1, "after the prefix": f.offset + 5}[cut]
    short = tampered(tmp_path, data[:end])
    report, finding = only_finding(short)
    assert report.status == "truncated" and finding.kind == "truncated" and finding.position == 3
    assert "The 3 records before it are not affected" in finding.message
    assert [r.index for r in read_records(short)] == [0, 1, 2]
    result = run_cli("verify", short)
    assert result.exit_code == 1 and "truncated tail" in result.output


def test_the_next_append_sets_a_torn_tail_aside_and_continues_the_chain(log4, tmp_path):
    path, data, frames = log4
    f = frames[3]
    path.write_bytes(data[: f.payload_offset + 10])
    (new,) = append_records(path, [synthetic_record(5)])
    assert new.index == 3
    report = verify(path)
    assert report.ok and report.records == 4
    aside = path.with_name(f"{path.name}.torn-{f.offset}")
    assert aside.read_bytes() == data[f.offset : f.payload_offset + 10]


def test_an_append_torn_at_any_byte_is_a_truncated_tail_and_the_next_append_recovers(log4, tmp_path):
    """What a crash can leave on disk: any prefix of the last frame. Try 60 cut points across it."""
    _, data, frames = log4
    f = frames[3]
    cuts = sorted({*np.linspace(f.offset + 1, f.end - 1, 57).astype(int), f.offset + 1, f.payload_offset, f.end - 1})
    for cut in cuts:
        p = tampered(tmp_path, data[:cut], "torn.log")
        report = verify(p)
        assert report.status == "truncated" and report.intact == 3, (cut - f.offset, report.findings)
        append_records(p, [synthetic_record(8)])
        assert verify(p).ok and [r.index for r in read_records(p)] == [0, 1, 2, 3]
        for aside in tmp_path.glob("torn.log.torn-*"):
            aside.unlink()


@pytest.mark.slow
def test_killing_an_append_leaves_every_earlier_record_verifiable(tmp_path):
    """SIGKILL a process that appends large records in a loop, at random moments."""
    log = tmp_path / "crash.log"
    child = (
        "import sys; from tests.audit_records import synthetic_record as s; from gptdeploy.audit import append_records\n"
        "labels = [str(i) for i in range(120)]\n"
        "i = 0\n"
        "while True:\n"
        "    append_records(sys.argv[1], [s(i, n_layer=6, n_head=6, prompt_labels=labels)]); i += 1\n"
    )
    rng = np.random.default_rng(0)
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", child, str(log)], cwd=ROOT)
        time.sleep(1.0 + float(rng.random()) * 1.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = verify(log)
        assert report.status in ("ok", "truncated"), [f.message for f in report.findings]
        assert report.intact == report.records - (report.status == "truncated")
        assert len(list(read_records(log))) == report.intact
    assert report.records > 0
    append_records(log, [synthetic_record(1)])
    assert verify(log).ok


def test_appends_from_threads_take_turns(tmp_path):
    log = tmp_path / "threads.log"

    def work(k):
        for i in range(4):
            append_records(log, [synthetic_record(10 * k + i)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(log)
    assert report.ok and report.records == 16
    assert [f.index for f in report.scan.frames] == list(range(16))


# ---------------------------------------------------------------------- unusable input: exit 2


def test_unusable_inputs_are_one_line_errors_with_exit_code_2(tmp_path, log4):
    path, data, _ = log4
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    newer = data.replace(b'"version":1', b'"version":9', 1)
    line_end = newer.index(b"\n")
    body = b"{" + newer[77:line_end]
    newer = newer[:11] + hashlib.sha256(body).hexdigest().encode() + newer[75:]  # a valid header from the future
    (tmp_path / "newer.log").write_bytes(newer)
    cases = {
        "does not exist": ("verify", tmp_path / "missing.log"),
        "not a gptdeploy audit log": ("verify", tmp_path / "notes.txt"),
        "is a directory": ("show", tmp_path),
        "Upgrade gptdeploy": ("verify", tmp_path / "newer.log"),
        "there is no record 7": ("export", path, "--record", "7", "--format", "bertviz", "-o", tmp_path / "x.npz"),
        "layer 5 is not in this record": ("show", path, "--layer", "5"),
    }
    for expected, args in cases.items():
        result = run_cli(*args)
        assert result.exit_code == 2, (expected, result.output)
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_append_refuses_a_file_that_is_not_an_audit_log(tmp_path):
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x08\x07binary graph")
    with pytest.raises(AuditError, match="not a gptdeploy audit log"):
        append_records(other, [synthetic_record(0)])
    assert other.read_bytes() == b"\x08\x07binary graph"


def test_mutated_logs_give_a_report_or_an_audit_error(log4, tmp_path):
    """Random damage (flips, cuts, duplicated and dropped spans) never raises anything else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, data, _ = log4
    n = len(data)
    op = st.tuples(st.sampled_from(["flip", "cut", "dup", "drop"]), st.integers(0, n - 1), st.integers(1, 600))

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(op, min_size=1, max_size=3))
    def check(ops):
        b = bytearray(data)
        for kind, at, length in ops:
            at = min(at, len(b) - 1) if b else 0
            if kind == "flip" and b:
                b[at] ^= 1 << (length % 8)
            elif kind == "cut":
                del b[at:]
            elif kind == "dup":
                b[at:at] = b[at : at + length]
            else:
                del b[at : at + length]
        p = tmp_path / "fuzz.log"
        p.write_bytes(bytes(b))
        try:
            report = verify(p)
        except AuditError:
            return
        for rec in read_records(p, report=report):  # whatever verify calls intact can be read
            assert rec.positions >= 1

    check()


# ------------------------------------------------------------------------ analysis and export


def test_rollout_follows_abnar_and_zuidema():
    rec = synthetic_record(1, n_layer=3, n_head=2)
    S = rec.positions
    want = np.eye(S)
    for att in rec.attention:
        a = 0.5 * att.mean(0) + 0.5 * np.eye(S)
        want = (a / a.sum(-1, keepdims=True)) @ want
    got = rollout(rec)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    assert (np.triu(got, k=1) == 0).all()


def test_top_sources_read_the_row_that_produced_each_token():
    rec = synthetic_record(2)
    m = head_matrix(rec, layer=1, head=2)
    np.testing.assert_array_equal(m, rec.attention[1][2])
    tops = top_sources(rec, m, 2)
    assert len(tops) == len(rec.output.ids)
    for k, row in enumerate(tops):
        q = rec.query_for(k)
        assert row[0].weight == pytest.approx(m[q].max()) and row[0].position <= q
        assert row[0].label == rec.labels[row[0].position]


@pytest.mark.parametrize("fmt,key", [("bertviz", "attention_{}"), ("transformerlens", "blocks.{}.attn.hook_pattern")])
def test_exports_hold_full_float32_patterns_per_layer(tmp_path, fmt, key):
    log = tmp_path / "a.log"
    append_records(log, [synthetic_record(0), synthetic_record(1, n_layer=3)])
    result = run_cli("export", log, "--record", "1", "--format", fmt, "-o", tmp_path / "x.npz")
    assert result.exit_code == 0, result.output
    (rec,) = read_records(log, [1])
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert list(z["tokens"]) == rec.labels and list(z["layers"]) == [0, 1, 2]
        for layer in rec.layers:
            arr = z[key.format(layer)]
            assert arr.shape == (1, len(rec.heads), rec.positions, rec.positions) and arr.dtype == np.float32
            np.testing.assert_array_equal(arr[0], rec.attention[layer])


def test_show_lists_prompt_output_and_sources(log4):
    path, _, _ = log4
    result = run_cli("show", path, "--record", "1", "--layer", "0", "--head", "1", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert "他喜欢" in result.output and "record 1" in result.output and "rollout" in result.output
    assert "layer 0, head 1" in result.output and "喜欢[1/2]@1" in result.output.replace("\n", "")


# --------------------------------------------------------------- real generations (Generator)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A random-init GPT-2 exported with export_bundle (its manifest carries the source identity)."""
    from gptdeploy.exporters import export_bundle
    from tests.factories import make_hf_gpt2_dir

    root = tmp_path_factory.mktemp("audit-bundle")
    hf = make_hf_gpt2_dir(root / "hf", n_layer=3, n_head=4, n_embd=64, n_positions=96, seed=3)
    return hf, export_bundle(hf, root / "bundle").bundle


PROMPTS = ["你好，世界。我们一起", "The quick brown fox jumps", "A"]  # lengths differ: left padding


def test_recorded_attention_equals_transformers_and_the_torch_runtime(bundle, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    from gptdeploy.generate import Generator

    hf_dir, b = bundle
    log = tmp_path / "a.log"
    with Generator.load(b.path, threads=1) as gen:
        out = gen.generate(PROMPTS, max_new_tokens=7, record_attention=True)
        append_generation(log, gen, out, max_new_tokens=7, options=AuditOptions(dtype="float32"))
    with Generator.load(b.path, backend="torch") as ref:
        ref_out = ref.generate(PROMPTS, max_new_tokens=7, record_attention=True)
    recs = list(read_records(log))
    assert [r.batch for r in recs] == [{"size": 3, "row": i} for i in range(3)]
    model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    for rec, res, ref_res in zip(recs, out, ref_out):
        seq = rec.prompt.ids + rec.output.ids[:-1]
        assert seq == res.attention_token_ids == ref_res.attention_token_ids
        with torch.no_grad():
            want = model(torch.tensor([seq]), output_attentions=True).attentions  # per layer (1, nh, S, S)
        assert len(rec.attention) == len(want) == 3
        for layer, got in enumerate(rec.attention):
            np.testing.assert_allclose(got, want[layer][0].numpy(), atol=1e-5, rtol=0, err_msg=f"layer {layer}")
            np.testing.assert_allclose(got, ref_res.attention[layer][0], atol=1e-5, rtol=0)
            np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
            assert (np.triu(got, k=1) == 0).all()


def test_padded_positions_get_no_attention(bundle):
    from gptdeploy.generate import Generator

    _, b = bundle
    with Generator.load(b.path, threads=1) as gen:
        ids = [gen.tokenizer.encode(p) for p in PROMPTS]
        L = max(map(len, ids))
        pad = [L - len(x) for x in ids]
        inp = np.array([[0] * p + x for p, x in zip(pad, ids)], dtype=np.int64)  # (B, L)
        mask = (np.arange(L)[None] >= np.array(pad)[:, None]).astype(np.int64)  # (B, L)
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        out = gen.runtime.prefill(inp, mask, pos, record_attention=True)
        step = gen.runtime.decode(np.ones((3, 1), np.int64), np.concatenate([mask, np.ones((3, 1), np.int64)], 1),
                                  pos[:, -1:] + 1, record_attention=True)
        gen.runtime.reset()
    for att in out.attentions:  # (B, nh, L, L)
        for r, p in enumerate(pad):
            real = att[r, :, p:, :]  # rows of real tokens
            assert (real[..., :p] == 0).all()
            np.testing.assert_allclose(real.sum(-1), 1.0, atol=1e-5)
    for att in step.attentions:  # (B, nh, 1, L+1)
        for r, p in enumerate(pad):
            assert (att[r, :, 0, :p] == 0).all()


def test_a_record_identifies_model_runtime_and_sampling_and_reproduces_the_output(bundle, tmp_path):
    """Even an unseeded sampled generation: the record keeps the seed that was drawn."""
    from gptdeploy.generate import Generator
    from gptdeploy.manifest import MANIFEST

    _, b = bundle
    log = tmp_path / "a.log"
    with Generator.load(b.path, threads=1) as gen:
        out = gen.generate("他喜欢", max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, record_attention=True)
        (rec,) = append_generation(log, gen, out, max_new_tokens=6, stop=["。"],
                                   options=AuditOptions(layers=(0, 2), heads=(1, 3)))
        s = rec.sampling
        again = gen.generate(rec.prompt.text, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                             top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"])
    (back,) = read_records(log)
    assert isinstance(back.sampling["seed"], int)
    assert back.output.ids == out.token_ids == again.token_ids  # the record is enough to re-run it
    assert back.prompt.ids == out.prompt_token_ids and back.prompt.text == "他喜欢"
    assert back.sampling == {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.0,
                             "seed": back.sampling["seed"], "max_new_tokens": 6, "stop": ["。"], "stop_token_ids": []}
    m = back.model
    assert m["bundle_manifest_sha256"] == hashlib.sha256((b.path / MANIFEST).read_bytes()).hexdigest()
    assert m["source"]["kind"] == "hf-gpt2" and m["source"]["sha256"] == b.manifest.source["sha256"]
    assert m["config"]["n_layer"] == 3 and m["graph"] == "fp32"
    assert back.runtime["backend"] == "ort" and "onnxruntime" in back.runtime["versions"]
    assert back.layers == [0, 2] and back.heads == [1, 3] and back.dtype == "float16"
    assert [a.shape for a in back.attention] == [(2, back.positions, back.positions)] * 2
    np.testing.assert_allclose(back.attention[1], out.attention[2][0, [1, 3]], atol=1e-3)  # float16 storage


def test_a_generation_without_recorded_attention_is_refused(bundle, tmp_path):
    from gptdeploy.generate import Generator

    with Generator.load(bundle[1].path, threads=1) as gen:
        out = gen.generate("hi", max_new_tokens=2)
        with pytest.raises(AuditError, match="record_attention=True"):
            append_generation(tmp_path / "a.log", gen, out, max_new_tokens=2)
        with pytest.raises(AuditError, match="subset of 0..2"):
            append_generation(tmp_path / "a.log", gen, gen.generate("hi", max_new_tokens=2, record_attention=True),
                              max_new_tokens=2, options=AuditOptions(layers=(5,)))
    assert not (tmp_path / "a.log").exists() or verify(tmp_path / "a.log").records == 0


# ------------------------------------------------------------------------ the trained sample


def _sample_pattern() -> dict:
    patterns = json.loads((SAMPLE / "sample.json").read_text(encoding="utf-8"))["patterns"]
    return next(p for p in patterns if p["kind"] == "name-copy" and p["lang"] == "en")


@pytest.mark.slow
def test_the_audit_of_a_sample_generation_shows_its_name_copy_head(tmp_path):
    """The sample learned to copy a story character's name (samples/find_patterns.py
    found the head; sample.json records it). Generate from the deployed bundle with an audit
    and check, from the audit log alone, that the named head's row for the first generated
    token puts most of its mass on the earlier mentions of the name, and that the model
    indeed continues with the name."""
    from gptdeploy.exporters import export_bundle
    from gptdeploy.generate import Generator

    pattern = _sample_pattern()
    layer, head, ev = pattern["layer"], pattern["head"], pattern["evidence"]
    b = export_bundle(SAMPLE, tmp_path / "sample").bundle
    log = tmp_path / "sample.log"
    with Generator.load(b.path, threads=1) as gen:
        out = gen.generate(pattern["prompt"], max_new_tokens=4, record_attention=True)
        append_generation(log, gen, out, max_new_tokens=4)
    assert verify(log).ok
    (rec,) = read_records(log)
    assert rec.output.text.strip().startswith(ev["name"]), rec.output.text
    names = ev["name_positions"]
    assert all(ev["name"].strip() in rec.labels[p] or rec.labels[p].strip() in ev["name"] for p in names)
    row = head_matrix(rec, layer, head)[rec.query_for(0)]  # (S,) the row that produced the name
    mass = float(row[names].sum())
    uniform = len(names) / (rec.query_for(0) + 1)
    assert mass >= 0.5 and mass >= 5 * uniform, (mass, uniform)
    assert top_sources(rec, head_matrix(rec, layer, head), 1)[0][0].position in names
    others = [float(head_matrix(rec, layer, h)[rec.query_for(0)][names].sum()) for h in rec.heads if h != head]
    assert mass > max(others), (mass, others)  # it is this head, not every head


def test_the_audit_path_needs_no_torch(tmp_path):
    """Writing, verifying, showing and reporting run where only the run-time dependencies are."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'onnx', 'safetensors', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "from tests.audit_records import synthetic_record\n"
        "from gptdeploy.audit import append_records, read_records\n"
        "from gptdeploy.audit.report import write_report\n"
        "from gptdeploy.audit.verify import verify\n"
        "from gptdeploy.audit.views import render_show\n"
        f"log = {str(tmp_path / 'a.log')!r}\n"
        "append_records(log, [synthetic_record(0)])\n"
        "assert verify(log).ok\n"
        "render_show(next(read_records(log)), None, None, 3)\n"
        f"write_report(log, {str(tmp_path / 'r.html')!r})\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
