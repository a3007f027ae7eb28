"""`gptdeploy bench`: statistics, the JSON schema, equal tokens across backends, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gptdeploy.bench.plan import (
    BenchPlan,
    Row,
    add_ratios,
    latency_percentiles,
    prompt_ids,
    run_plan,
    stats,
    to_json,
)
from gptdeploy.bundle import Bundle
from gptdeploy.cli import cli
from gptdeploy.exporters.export import export_bundle
from tests.factories import make_hf_gpt2_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = make_hf_gpt2_dir(root / "src", n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=5)
    export_bundle(src, root / "bundle")
    return src, root / "bundle"


def test_stats_median_spread():
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["stdev"] == pytest.approx((50 / 3) ** 0.5)  # sample stdev: squares 1+9+4+36 over n-1
    assert stats([5.0]) == {"median": 5.0, "min": 5.0, "max": 5.0, "stdev": 0.0, "n": 1}
    assert stats([]) == {}


def test_latency_percentiles_in_ms():
    p = latency_percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)


def test_same_prompt_ids_for_everyone():
    assert prompt_ids(100, 2, 5, 0) == prompt_ids(100, 2, 5, 0)
    ids = prompt_ids(50, 3, 7, 0)
    assert len(ids) == 3 and all(len(r) == 7 and max(r) < 50 for r in ids)


def test_ratios_are_against_the_first_baseline_row():
    def row(label, kind, tps, ttft):
        return Row(label, kind, None, 1, 32, 8, ttft_s={"median": ttft}, decode_tps={"median": tps})

    rows = [row("ort", "ort", 40.0, 0.1), row("hf", "hf", 20.0, 0.2), row("torch", "torch", 22.0, 0.25)]
    add_ratios(rows)
    assert rows[0].ratio == {"vs": "hf", "decode_tps": 2.0, "ttft": 0.5}
    assert rows[1].ratio["decode_tps"] == 1.0


def test_json_schema_and_equal_tokens_across_torch_ort_hf(tiny):
    src, bundle = tiny
    plan = BenchPlan(bundle, ("ort", "torch"), (1, 2), (6,), new_tokens=6, runs=2, warmup=1, threads=1,
                     baselines=("hf",), source=src)
    rows = run_plan(plan)
    doc = json.loads(json.dumps(to_json(plan, rows)))
    assert doc["schema"] == 1 and doc["complete"] is True
    assert {"cpu", "logical_cores", "physical_cores", "threads", "versions", "gpu", "platform"} <= set(doc["machine"])
    assert doc["machine"]["versions"]["onnxruntime"]
    assert len(doc["rows"]) == 6  # (hf, ort, torch) x batch (1, 2)
    for r in doc["rows"]:
        assert r["error"] is None, r["error"]
        for metric in ("ttft_s", "decode_tps", "e2e_tps"):
            assert set(r[metric]) == {"median", "min", "max", "stdev", "n"} and r[metric]["n"] == 2
            assert r[metric]["min"] <= r[metric]["median"] <= r[metric]["max"]
        assert set(r["token_latency_ms"]) == {"p50", "p90", "p99"}
        assert r["peak_rss_mb"] > 10 and r["load_s"] > 0
        assert len(r["tokens"]) == r["batch"] and all(len(t) == 6 for t in r["tokens"])
        assert r["ratio"]["vs"].startswith("hf")
    for batch in (1, 2):
        tokens = {r["kind"]: r["tokens"] for r in doc["rows"] if r["batch"] == batch}
        assert tokens["ort"] == tokens["torch"] == tokens["hf"], tokens
    b = Bundle.load(bundle)
    sig = b.graph().signature
    weights = b.file("model.onnx").stat().st_size
    for r in doc["rows"]:  # 4-byte KV entries of (6 prompt + 6 new) positions, every layer, K and V
        kv = r["batch"] * 12 * sig.n_layer * 2 * sig.kv_heads * sig.head_dim * 4
        assert r["model_mb"] == pytest.approx((weights + kv) / 2**20)
    ort_row = next(r for r in doc["rows"] if r["kind"] == "ort")
    hf_row = next(r for r in doc["rows"] if r["kind"] == "hf")
    assert ort_row["peak_rss_mb"] < hf_row["peak_rss_mb"]  # the ort worker never loads torch


@pytest.mark.parametrize("args, fragment", [
    (["--backends", "nope"], "unknown backend 'nope'"),
    (["--backends", "ort-cuda"], "CUDAExecutionProvider"),
    (["--backends", "tensorrt"], "tensorrt"),
    (["--batch", "0"], "batch must be at least 1"),
    (["--batch", "x"], "comma-separated integers"),
    (["--prompt-len", "60"], "the model has 64. Lower --prompt-len"),
    (["--baseline", "hf"], "needs --source"),
    (["--baseline", "hf", "--source", "/nonexistent"], "does not exist"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--backends", "ort@int4"], "no graph 'int4'"),
])
def test_bad_input_one_line_exit_2(tiny, args, fragment):
    _, bundle = tiny
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--new-tokens", "8", *args])
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.output


def test_cli_table_json_and_plot(tiny, tmp_path):
    _, bundle = tiny
    png = tmp_path / "bench.png"
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--backends", "ort", "--prompt-len", "4,8",
                                 "--new-tokens", "4", "--runs", "1", "--threads", "1", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["prompt_len"] for row in doc["rows"]] == [4, 8]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--backends", "ort", "--new-tokens", "4", "--runs", "1"])
    assert r.exit_code == 0 and "decode tok/s" in r.stdout and "ort fp32" in r.stdout


def test_gpu_rows_report_device_memory_held_beyond_the_baseline(monkeypatch):
    """ort-cuda / tensorrt rows: cudaMemGetInfo in use after each run, less the use before the
    runtime was opened (fake cudart: 1000 MiB in use before, 1300 and 1250 MiB after runs)."""
    import types

    from gptdeploy.bench import worker as bench_worker
    from gptdeploy.errors import BackendUnavailable
    from gptdeploy.runtimes import cuda

    MiB, total = 2**20, 80_000 * 2**20
    used = iter([1000 * MiB, 1300 * MiB, 1250 * MiB])

    class FakeCudart:
        cudaError_t = types.SimpleNamespace(cudaSuccess=0)

        def cudaMemGetInfo(self):
            return 0, total - next(used), total

    monkeypatch.setattr(cuda, "load_cudart", FakeCudart)
    mem = bench_worker._DeviceMemory()
    mem.sample()
    mem.sample()
    assert mem.mb() == 300.0

    def no_cuda():
        raise BackendUnavailable("cuda-python is not installed")

    monkeypatch.setattr(cuda, "load_cudart", no_cuda)
    mem = bench_worker._DeviceMemory()
    mem.sample()
    assert mem.mb() is None
