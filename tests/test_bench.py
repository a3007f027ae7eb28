"""`gptdeploy bench`: statistics, the JSON schema, equal tokens across backends, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gptdeploy.bench import llama_worker
from gptdeploy.bench import plan as bench_plan
from gptdeploy.bench.plan import (
    BenchPlan,
    Row,
    add_ratios,
    latency_percentiles,
    model_bytes,
    prompt_ids,
    run_plan,
    stats,
    to_json,
)
from gptdeploy.bench.plot import plot_rows
from gptdeploy.bundle import Bundle
from gptdeploy.cli import cli
from gptdeploy.exporters.export import export_bundle
from gptdeploy.machine import KERNEL_FLAGS
from tests.factories import make_hf_gpt2_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = make_hf_gpt2_dir(root / "src", n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=5)
    export_bundle(src, root / "bundle")
    return src, root / "bundle"


@pytest.fixture(scope="module")
def tiny_int8(tiny):
    """The same model's int8 bundle, beside the fp32 one (`bundle`)."""
    src, bundle = tiny
    export_bundle(src, bundle.parent / "int8", precision="int8")
    return bundle.parent / "int8"


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
    plan = BenchPlan((bundle,), ("ort", "torch"), (1, 2), (6,), new_tokens=6, runs=2, warmup=1, threads=(1,),
                     baselines=("hf",), source=src)
    rows = run_plan(plan)
    doc = json.loads(json.dumps(to_json(plan, rows)))
    assert doc["schema"] == 2 and doc["complete"] is True
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
    (["--threads", "1,0"], "--threads must be at least 1"),
    (["--baseline", "llama.cpp"], "--baseline llama.cpp needs --gguf"),
    (["--baseline", "llama.cpp", "--gguf", "/nonexistent.gguf"], "--gguf /nonexistent.gguf does not exist"),
    (["--gguf", "/nonexistent.gguf"], "--gguf is for --baseline llama.cpp"),
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


def test_ratios_per_configuration_and_against_llama_cpp_of_the_same_precision():
    def row(label, kind, precision, tps, ttft, threads=1):
        return Row(label, kind, None, 1, 32, 8, threads, precision=precision, ttft_s={"median": ttft},
                   decode_tps={"median": tps})

    rows = [row("llama.cpp f32", "llama.cpp", "f32", 10.0, 0.1), row("llama.cpp q4_0", "llama.cpp", "q4_0", 40.0, 0.1),
            row("ort fp32", "ort", "fp32", 20.0, 0.05), row("ort int4", "ort", "int4", 60.0, 0.2),
            row("ort int8", "ort", "int8", 30.0, 0.1), row("ort fp32", "ort", "fp32", 30.0, 0.05, threads=2),
            row("llama.cpp f32", "llama.cpp", "f32", 15.0, 0.1, threads=2)]
    add_ratios(rows)
    assert [r.ratio["vs"] for r in rows] == ["llama.cpp f32"] * 7
    assert rows[3].ratio["decode_tps"] == 6.0
    assert rows[2].same_precision == {"vs": "llama.cpp f32", "decode_tps": 2.0, "ttft": 0.5}
    assert rows[3].same_precision == {"vs": "llama.cpp q4_0", "decode_tps": 1.5, "ttft": 2.0}  # int4 ~ q4_0
    assert rows[4].same_precision == {} and rows[0].same_precision == {}  # no q8_0 row; llama.cpp rows: none
    assert rows[5].ratio["decode_tps"] == 2.0 and rows[5].same_precision["decode_tps"] == 2.0  # vs threads 2


def test_several_bundles_rows_labelled_with_bundle_and_precision(tiny, tiny_int8, monkeypatch):
    _, fp32 = tiny
    monkeypatch.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "1")  # a kernel switch: recorded with the figures
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    plan = BenchPlan((fp32, tiny_int8), ("ort",), (1, 2), (4,), new_tokens=4, runs=1, warmup=0, threads=(1,))
    doc = json.loads(json.dumps(to_json(plan, run_plan(plan))))
    assert doc["schema"] == 2 and doc["plan"]["bundles"] == [str(fp32), str(tiny_int8)]
    assert doc["plan"]["threads"] == [1] and doc["machine"]["threads"] == 1
    assert isinstance(doc["machine"]["cpu_flags"], list) and set(doc["machine"]["cpu_flags"]) <= set(KERNEL_FLAGS)
    env = doc["machine"]["env"]
    assert env["ORT_GQA_DISABLE_FLASH_ATTENTION"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert all(k.startswith(("ORT_", "OMP_", "MKL_", "OPENBLAS_", "GGML_", "LLAMA_")) for k in env)
    got = [(r["label"], r["bundle"], r["precision"], r["threads"], r["batch"], r["error"]) for r in doc["rows"]]
    assert got == [(f"ort {g} ({b})", str(b), g, 1, batch, None)
                   for batch in (1, 2) for g, b in (("fp32", fp32), ("int8", tiny_int8))]
    for r in doc["rows"]:  # ratios within each batch, to its first row (no baseline here)
        assert r["ratio"]["vs"] == f"ort fp32 ({fp32})" and r["same_precision"] == {}
        graph = Bundle.load(r["bundle"]).graph()
        assert r["model_mb"] == pytest.approx(model_bytes(Bundle.load(r["bundle"]), graph.name, r["batch"], 8) / 2**20)
    assert doc["rows"][0]["ratio"]["decode_tps"] == 1.0


def test_cli_several_bundles_and_thread_list_in_one_table(tiny, tiny_int8, monkeypatch):
    _, fp32 = tiny
    monkeypatch.chdir(fp32.parent)
    r = CliRunner().invoke(cli, ["bench", fp32.name, tiny_int8.name, "--backends", "ort", "--threads", "1,2",
                                 "--new-tokens", "4", "--prompt-len", "4", "--runs", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert "ort fp32 (bundle)" in r.stdout and "ort int8 (int8)" in r.stdout and "kernel flags:" in r.stdout
    assert "threads 1,2" in r.stdout and r.stdout.count("ort int8 (int8)") == 2


def test_plot_shows_decode_against_batch_and_threads(tmp_path):
    rows = [Row(label, "ort", None, b, 32, 8, t, ttft_s={"median": 0.01}, decode_tps={"median": 10.0 * b * t})
            for label in ("ort int8 (a)", "llama.cpp q8_0 (b.gguf)") for t in (1, 2) for b in (1, 4, 8)]
    png = tmp_path / "scaling.png"
    plot_rows(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000


def test_llama_cpp_row_needs_an_interpreter_with_llama_cpp(tiny, tmp_path):
    if subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, check=False).returncode == 0:
        pytest.skip("this interpreter has llama_cpp; the refusal needs one without")
    _, bundle = tiny
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--baseline", "llama.cpp", "--gguf", str(gguf),
                                 "--llama-python", sys.executable, "--new-tokens", "8"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: baseline 'llama.cpp' cannot run under") and "--llama-python" in r.stderr


def test_a_worker_that_dies_becomes_its_rows_error():
    job = {"prompt_ids": [[1, 2, 3]], "new_tokens": 4, "threads": 1, "baseline": "llama.cpp"}
    die = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    row = bench_plan._run_worker(job, die, "llama.cpp (m.gguf)")
    assert row.kind == "llama.cpp" and row.batch == 1 and row.prompt_len == 3
    assert row.error.startswith("worker died (signal SIGSEGV)")


def test_llama_worker_runs_by_path_without_gptdeploy():
    """The llama.cpp row runs under another interpreter, where only numpy and llama_cpp exist: the
    worker, run by path, imports no gptdeploy and reports a missing llama_cpp as its row's error."""
    path = llama_worker.__file__
    code = ("import runpy, sys; sys.modules['gptdeploy'] = None; sys.modules['llama_cpp'] = None; "
            f"sys.path.insert(0, {str(bench_plan.llama.WORKER.parent)!r}); runpy.run_path({path!r}, run_name='__main__')")
    job = {"gguf": "m.gguf", "prompt_ids": [[1, 2]], "new_tokens": 4, "runs": 1, "warmup": 0, "threads": 1, "vocab": 9}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                          check=False)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["kind"] == "llama.cpp" and "llama_cpp" in row["error"], done.stderr
