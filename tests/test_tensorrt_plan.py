"""TensorRT planning without a GPU: optimization profiles and their equal-dimension constraints,
engine names and manifest entries, and the compatibility check on load. The static graph checks
are in tests/test_gpu_paths_checks.py, the CLI's errors without TensorRT in test_gpu_paths_cli.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptdeploy import contract as io
from gptdeploy import engines
from gptdeploy.contract import GraphSignature
from gptdeploy.engines import (
    compat_check,
    engine_filename,
    engine_manifest_entry,
    select_engine,
    trt_release,
)
from gptdeploy.errors import BundleError, ExportError
from gptdeploy.profiles import (
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_MAX_CONTEXT,
    PHASES,
    buffer_bytes,
    buffer_shapes,
    check_limits,
    check_profiles,
    default_max_context,
    profile_shapes,
)

SIGS = [
    GraphSignature(n_layer=2, n_head=2, kv_heads=2, head_dim=16, vocab_size=297),
    GraphSignature(n_layer=3, n_head=8, kv_heads=2, head_dim=8, vocab_size=320, kv_dtype="float16"),  # GQA
    GraphSignature(n_layer=12, n_head=12, kv_heads=12, head_dim=64, vocab_size=50257, attentions=False),
    GraphSignature(n_layer=1, n_head=4, kv_heads=4, head_dim=4, vocab_size=64, last_logits_only=True),
]


# ------------------------------------------------------------------------------ profiles


def _axis_values(sig, shapes, k):
    """{axis name: set of values} over every input's k-th (min/opt/max) shape."""
    seen = {}
    for spec in sig.inputs():
        for axis, value in zip(spec.axes, shapes[spec.name][k]):
            if isinstance(axis, str):
                seen.setdefault(axis, set()).add(value)
    return seen


@pytest.mark.parametrize("sig", SIGS, ids=["gpt2-tiny", "gqa-fp16", "gpt2-124m", "last-logits"])
@pytest.mark.parametrize("max_batch", [1, 2, 4, 7])
@pytest.mark.parametrize("max_context", [2, 3, 16, 1024])
def test_profiles_respect_every_constraint_over_a_grid(sig, max_batch, max_context):
    profiles = profile_shapes(sig, max_batch, max_context)
    assert check_profiles(sig, profiles, max_context) == []
    assert list(profiles) == list(PHASES)
    for phase, shapes in profiles.items():
        assert list(shapes) == [s.name for s in sig.inputs()]  # every input, graph order
        for k in range(3):
            seen = _axis_values(sig, shapes, k)
            assert all(len(v) == 1 for v in seen.values()), (phase, k, seen)  # one batch, one past, ...
            (b,), (t,), (p,), (total,) = (seen[a] for a in (io.BATCH, io.SEQ, io.PAST, io.TOTAL))
            assert total == p + t and b >= 1 and t >= 1
            assert shapes[io.POSITION_IDS][k] == shapes[io.INPUT_IDS][k]
            assert shapes[io.ATTENTION_MASK][k] == (b, p + t)
            for past in sig.past_names():
                assert shapes[past][k] == (b, sig.kv_heads, p, sig.head_dim)
            if phase == "prefill":
                assert p == 0
            else:
                assert t == 1 and p >= 1
    pre, dec = profiles["prefill"], profiles["decode"]
    assert pre[io.INPUT_IDS][2] == (max_batch, max_context) and pre[io.INPUT_IDS][0] == (1, 1)
    assert dec[sig.past_names()[0]][2][2] == max_context - 1 and dec[sig.past_names()[0]][0][2] == 1
    assert dec[io.ATTENTION_MASK][2] == (max_batch, max_context)


@settings(max_examples=150, deadline=None)
@given(
    max_batch=st.integers(1, 64),
    max_context=st.integers(2, 8192),
    opt_batch=st.integers(1, 64),
    opt_context=st.integers(1, 8192),
    sig=st.sampled_from(SIGS),
)
def test_profiles_property(max_batch, max_context, opt_batch, opt_context, sig):
    if opt_batch > max_batch or opt_context > max_context:
        with pytest.raises(ExportError, match="opt batch"):
            profile_shapes(sig, max_batch, max_context, opt_batch, opt_context)
        return
    profiles = profile_shapes(sig, max_batch, max_context, opt_batch, opt_context)
    assert check_profiles(sig, profiles, max_context) == []
    assert profiles["prefill"][io.INPUT_IDS][1] == (opt_batch, opt_context)
    assert profiles["decode"][io.ATTENTION_MASK][1] == (opt_batch, min(opt_context, max_context - 1) + 1)


def _tamper(profiles, phase, name, k, shape):
    out = {ph: {n: list(t) for n, t in shapes.items()} for ph, shapes in profiles.items()}
    out[phase][name][k] = shape
    return {ph: {n: tuple(t) for n, t in shapes.items()} for ph, shapes in out.items()}


def test_check_profiles_reports_every_broken_rule():
    sig = SIGS[0]
    good = profile_shapes(sig, 4, 16)
    past0 = sig.past_names()[0]
    cases = [
        (_tamper(good, "decode", io.ATTENTION_MASK, 2, (4, 15)), "length 15 != past 15 \\+ seq 1"),
        (_tamper(good, "prefill", io.POSITION_IDS, 1, (2, 8)), "axis batch_size differs"),
        (
            _tamper(good, "prefill", past0, 0, (1, 2, 1, 16)),
            "past must be 0|axis past_sequence_length differs",
        ),
        (_tamper(good, "decode", io.INPUT_IDS, 2, (4, 2)), "axis sequence_length differs|needs seq 1"),
        (_tamper(good, "prefill", io.INPUT_IDS, 0, (2, 1)), "breaks 0 <= min <= opt <= max"),
        (_tamper(good, "decode", past0, 1, (1, 3, 7, 16)), "has 3 where the graph fixes 2"),
    ]
    for profiles, pattern in cases:
        problems = check_profiles(sig, profiles)
        assert problems and any(re.search(pattern, p) for p in problems), (pattern, problems)
    missing = {ph: {n: t for n, t in shapes.items() if n != past0} for ph, shapes in good.items()}
    assert "missing or unexpected" in check_profiles(sig, missing)[0]
    assert "exceed max context 8" in " ".join(check_profiles(sig, good, max_context=8))
    assert check_profiles(sig, {"prefill": good["prefill"]})[0].startswith("profiles must be exactly")


@pytest.mark.parametrize(
    "batch, context, model, pattern",
    [
        (0, 16, None, "max batch must be an integer >= 1"),
        (1, 1, None, "max context must be an integer >= 2"),
        (True, 16, None, "max batch"),
        (2, 65, 64, "exceeds the model's 64 positions; use --max-context 64"),
    ],
)
def test_impossible_limits_are_one_line_errors(batch, context, model, pattern):
    with pytest.raises(ExportError, match=pattern):
        check_limits(batch, context, model)


def test_buffers_are_sized_so_pasts_and_presents_can_swap():
    sig = SIGS[1]
    shapes = buffer_shapes(sig, 4, 128)
    for past, present in zip(sig.past_names(), sig.present_names()):
        assert shapes[past] == shapes[present] == (4, 2, 128, 8)
    assert shapes[io.LOGITS] == (4, 128, 320) and shapes[io.attention(0)] == (4, 8, 128, 128)
    assert buffer_shapes(SIGS[3], 2, 8)[io.LOGITS] == (2, 1, 64)


# ----------------------------------------------------- the default context of build-engine

# Mistral-7B's shape (32 layers, 32 heads sharing 8 K/V heads of 128, vocab 32768, fp16 KV cache):
# 131072 positions, its max_position_embeddings, is the context a manifest records for it.
MISTRAL = GraphSignature(n_layer=32, n_head=32, kv_heads=8, head_dim=128, vocab_size=32768, kv_dtype="float16",
                         attentions=False, last_logits_only=True)


def test_buffer_bytes_count_every_buffer_the_runtime_holds():
    kv = 32 * 2 * 4 * 8 * 4096 * 128 * 2  # layers x (key, value) x batch x kv heads x positions x hs x fp16
    ids = 3 * 4 * 4096 * 8  # input_ids, position_ids, attention_mask (int64)
    assert buffer_bytes(MISTRAL, 4, 4096) == 2 * kv + ids + 4 * 32768 * 4  # past + present, last logits


@pytest.mark.parametrize("sig, batch, model, want", [
    (MISTRAL, 1, 131072, DEFAULT_MAX_CONTEXT),  # capped at 4096: 2 GiB of buffers
    (MISTRAL, 4, 131072, 2048),  # 4096 would need 4.0008 GiB
    (replace(MISTRAL, attentions=True), 4, 131072, 256),  # attention outputs grow with the square
    (SIGS[0], 4, 1024, 1024),  # a model's own smaller context stays
])
def test_the_default_context_is_capped_and_fits_the_buffer_budget(sig, batch, model, want):
    got = default_max_context(sig, model, batch)
    assert got == want
    assert buffer_bytes(sig, batch, got) <= DEFAULT_BUFFER_BUDGET
    assert got == min(model, DEFAULT_MAX_CONTEXT) or buffer_bytes(sig, batch, 2 * got) > DEFAULT_BUFFER_BUDGET


def test_build_engine_caps_the_default_context_says_so_and_takes_a_larger_one(tmp_path, monkeypatch):
    """On the fake TensorRT: a bundle whose manifest records a RoPE model's 131072 positions gets a
    4096-position engine by default, the output says so, and --max-context 8192 builds 8192."""
    import sys

    from click.testing import CliRunner

    from gptdeploy.cli import cli
    from gptdeploy.manifest import MANIFEST
    from tests.fake_tensorrt import FakeCudart, install_cudart, make_tensorrt
    from tests.runtime_bundles import copy_bundle, made

    cudart = FakeCudart()
    install_cudart(monkeypatch, cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart))
    b = copy_bundle(made("small").bundle, tmp_path / "b")
    data = json.loads((b / MANIFEST).read_text())
    data["model"]["block_size"] = 131072  # the graph itself does not read it; the limits do
    (b / MANIFEST).write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["build-engine", str(b)])
    assert r.exit_code == 0, r.output
    limits = json.loads((b / MANIFEST).read_text())["engines"][-1]["limits"]
    assert limits == {"max_batch": 4, "max_context": DEFAULT_MAX_CONTEXT}
    assert "note: 4096 of the model's 131072 positions by default" in r.stdout
    assert "--max-context N raises it" in r.stdout
    r = CliRunner().invoke(cli, ["build-engine", str(b), "--max-context", "8192"])
    assert r.exit_code == 0 and "note:" not in r.stdout, r.output
    assert json.loads((b / MANIFEST).read_text())["engines"][-1]["limits"]["max_context"] == 8192


# -------------------------------------------------------------------- names, entries, compat


def test_engine_names_say_gpu_tensorrt_release_and_precision():
    assert engine_filename("9.0", "10.13.0.35", "fp16") == "sm90-trt10.13.0-fp16.engine"
    assert engine_filename((8, 6), "10.8.0", "fp32") == "sm86-trt10.8.0-fp32.engine"
    assert engine_filename("12.0", "11.1", "fp16") == "sm120-trt11.1.0-fp16.engine"
    assert (
        engine_filename("8.9", "10.13.0.35", "fp16", hardware_compat=True)
        == "sm80plus-trt10.13.0-fp16.engine"
    )
    assert trt_release("10.13.0.35") == "10.13.0" and trt_release("10") == "10.0.0"
    assert engines.timing_cache_filename("9.0", "10.13.0.35") == "engines/timing-sm90-trt10.13.0.cache"


def _entry(**over) -> dict:
    sig = SIGS[0]
    kw = dict(
        file="engines/sm90-trt10.13.0-fp16.engine",
        sha256="ab" * 32,
        graph="fp16",
        precision="fp16",
        compute_capability="9.0",
        trt_version="10.13.0.35",
        profiles=profile_shapes(sig, 4, 1024),
        max_batch=4,
        max_context=1024,
        workspace_bytes=4 << 30,
        hardware_compat=False,
        version_compat=False,
        flags=["STRONGLY_TYPED", "no TF32"],
        timing_cache="engines/timing-sm90-trt10.13.0.cache",
        device_name="NVIDIA H100 80GB HBM3",
        build_seconds=41.5,
    )
    kw.update(over)
    return engine_manifest_entry(**kw)


def test_manifest_entry_records_file_hash_target_profiles_and_settings():
    e = _entry()
    again = json.loads(json.dumps(e))  # plain JSON, as the manifest stores it
    assert again == e
    assert (
        e["compute_capability"] == "9.0" and e["trt_version"] == "10.13.0" and e["trt_build"] == "10.13.0.35"
    )
    assert e["limits"] == {"max_batch": 4, "max_context": 1024}
    assert e["hardware_compat"] == "none" and e["version_compatible"] is False
    assert e["profiles"]["decode"][io.ATTENTION_MASK] == [[1, 2], [1, 513], [4, 1024]]
    assert e["workspace_bytes"] == 4 << 30 and e["flags"] == ["STRONGLY_TYPED", "no TF32"]
    assert set(engines.ENTRY_FIELDS) <= set(e)


REBUILD = "gptdeploy build-engine out/fp16 --graph fp16 --max-batch 4 --max-context 1024"


def test_compat_check_accepts_the_same_target_and_explains_every_other():
    e = _entry()
    assert compat_check(e, "9.0", "10.13.0.40", "out/fp16") is None  # another build of the same release
    gpu = compat_check(e, (8, 6), "10.13.0", "out/fp16")
    assert "built for compute capability 9.0; this GPU is 8.6" in gpu and gpu.endswith(REBUILD)
    ver = compat_check(e, "9.0", "10.14.1", "out/fp16")
    assert "built with TensorRT 10.13.0; this machine has 10.14.1" in ver and ver.endswith(REBUILD)
    vc = _entry(version_compat=True)
    assert compat_check(vc, "9.0", "10.15.0", "b") is None
    assert "needs TensorRT 10.13.0 or later" in compat_check(vc, "9.0", "10.12.0", "b")
    assert compat_check(vc, "9.0", "10.12.0", "b").endswith("--version-compat")
    hw = _entry(hardware_compat=True, compute_capability="8.9")
    assert compat_check(hw, "8.0", "10.13.0") is None and compat_check(hw, "12.0", "10.13.0") is None
    assert "Ampere or newer" in compat_check(hw, "7.5", "10.13.0") and "--hardware-compat" in compat_check(
        hw, "7.5", "10.13.0"
    )
    bad = {"file": "engines/x.engine", "graph": "fp32"}
    assert "malformed (missing sha256" in compat_check(bad, "9.0", "10.13.0")
    assert "malformed (trt_version" in compat_check({**e, "trt_version": "ten"}, "9.0", "10.13.0")


def test_select_engine_picks_the_one_that_runs_here():
    h100, a10 = _entry(), _entry(file="engines/sm86-trt10.13.0-fp16.engine", compute_capability="8.6")
    assert select_engine([h100, a10], "fp16", "8.6", "10.13.0") is a10
    with pytest.raises(
        BundleError, match=r"no TensorRT engine for graph 'fp32'; build one: gptdeploy build-engine b"
    ):
        select_engine([h100, a10], "fp32", "9.0", "10.13.0", "b")
    with pytest.raises(BundleError, match=r"no engine in the bundle runs here: .*9\.0.*\| .*8\.6"):
        select_engine([h100, a10], "fp16", "7.5", "10.13.0")
