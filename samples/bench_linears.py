"""One step's linear layers alone, in every weight layout gptdeploy could ship: decode (one row)
and prefill (many rows) milliseconds, interleaved in one process so that machine noise hits each
layout alike. The weight levers of docs/performance.md are measured with it.

    python samples/bench_linears.py [--shape gpt2-124m|smollm-135m] [--threads 2] [--rounds 15] [--rows 1,512]

A layout is a graph of the shape's Linear layers, each on its own input (c_attn, attn c_proj,
c_fc, mlp c_proj per layer, and the lm_head), built with random weights and quantized by the
same onnxruntime tools the exporter uses: fp32 MatMul (pre-packed), fp32 Gemm(transB=1) on the
stored (N, K) matrix (the fp32 fast graph), int8 DynamicQuantizeMatMul (quantize_dynamic), int8 and
int4 MatMulNBits at several block sizes and accuracy levels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {  # (layers, C, qkv width, MLP in width, MLP out width, vocab)
    "gpt2-124m": (12, 768, 3 * 768, 3072, 3072, 50257),
    "smollm-135m": (30, 576, 576 + 2 * 192, 2 * 1536, 1536, 49152),
}
LAYOUTS = {  # name -> (kind, options)
    "fp32 MatMul": ("fp32", {}),
    "fp32 Gemm(transB)": ("gemv", {}),
    "fp32 FusedMatMul(transB)": ("fusedmatmul", {}),
    "int8 DQMatMul": ("int8-dynamic", {}),
    "int8 NBits b32 acc4": ("nbits", {"bits": 8, "block_size": 32, "accuracy_level": 4}),
    "int8 NBits b128 acc4": ("nbits", {"bits": 8, "block_size": 128, "accuracy_level": 4}),
    "int8 NBits b128 acc0": ("nbits", {"bits": 8, "block_size": 128, "accuracy_level": 0}),
    "int4 NBits b32 acc4": ("nbits", {"bits": 4, "block_size": 32, "accuracy_level": 4}),
    "int4 NBits b32 acc0": ("nbits", {"bits": 4, "block_size": 32, "accuracy_level": 0}),
    "int4 NBits b64 acc4": ("nbits", {"bits": 4, "block_size": 64, "accuracy_level": 4}),
    "int4 NBits b128 acc4": ("nbits", {"bits": 4, "block_size": 128, "accuracy_level": 4}),
    "int4 NBits b256 acc4": ("nbits", {"bits": 4, "block_size": 256, "accuracy_level": 4}),
    "int4 NBits b32 acc1": ("nbits", {"bits": 4, "block_size": 32, "accuracy_level": 1}),
    "int4 NBits b32 acc3": ("nbits", {"bits": 4, "block_size": 32, "accuracy_level": 3}),
    "int4 NBits b128 acc1": ("nbits", {"bits": 4, "block_size": 128, "accuracy_level": 1}),
}


def linears(shape: str) -> tuple[list[tuple[int, int]], int]:
    """(K, N) of every Linear of one step, and C."""
    L, C, qkv, mlp_in, mlp_out, V = SHAPES[shape]
    per_layer = [(C, qkv), (C, C), (C, mlp_in), (mlp_out, C)]
    return per_layer * L + [(C, V)], C


def build(shape: str, transposed: bool | str) -> onnx.ModelProto:
    """Each Linear on its own input x_K (rows, K); weights N(0, 0.02) as the random-init models."""
    rng = np.random.default_rng(0)
    mats, _ = linears(shape)
    ks = sorted({k for k, _ in mats})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in ks]
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(mats):
        w = (rng.standard_normal((k, n), np.float32) * 0.02).astype(np.float32)
        if transposed == "fused":  # com.microsoft.FusedMatMul(transB=1): 3-D inputs, no Reshape around it
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("FusedMatMul", [f"x{k}", f"w{i}"], [f"y{i}"], domain="com.microsoft", transB=1))
        elif transposed:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Gemm", [f"x{k}", f"w{i}"], [f"y{i}"], transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, shape, inputs, outputs, inits)
    if transposed:  # overridable initializers: onnxruntime does not pre-pack them (exporters/onnx.py)
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def make_layout(shape: str, kind: str, options: dict, tmp: Path) -> Path:
    path = tmp / f"{kind}-{'-'.join(f'{k}{v}' for k, v in options.items())}.onnx"
    proto = build(shape, transposed={"gemv": True, "fusedmatmul": "fused"}.get(kind, False))
    if kind == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = tmp / "fp32-src.onnx"
        onnx.save(proto, src)
        quantize_dynamic(src, path, op_types_to_quantize=["MatMul"], per_channel=False, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        return path
    if kind == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(proto, is_symmetric=True, op_types_to_quantize=("MatMul",), **options)
        q.process()
        proto = q.model.model
    onnx.save(proto, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", default="1,512", help="rows of the input: 1 is a decode step, 512 a prefill")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names from LAYOUTS")
    args = ap.parse_args()

    from gptdeploy.runtimes.ort_session import open_session, session_options

    names = args.layouts.split(",")
    mats, _ = linears(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: make_layout(args.shape, *LAYOUTS[n], Path(tmp)) for n in names}
        sessions = {n: open_session(p, session_options(args.threads)) for n, p in paths.items()}
        sizes = {n: (p.stat().st_size / 1e6) for n, p in paths.items()}
        for rows in (int(r) for r in args.rows.split(",")):
            feeds = {f"x{k}": np.random.default_rng(1).standard_normal((rows, k), np.float32) for k in {k for k, _ in mats}}
            times: dict[str, list[float]] = {n: [] for n in names}
            reps = max(1, 20 // rows)
            for r in range(args.rounds + 1):
                for n in (names if r % 2 else names[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        sessions[n].run(None, feeds)
                    if r:  # the first round warms up
                        times[n].append((time.perf_counter() - t0) / reps * 1e3)
            print(f"\n{args.shape}, {rows} row(s), {args.threads} threads: ms per step (median / best of {args.rounds})")
            for n in names:
                best = min(times[n])
                print(f"  {n:<22} {statistics.median(times[n]):8.2f} {best:8.2f}   {sizes[n]:7.1f} MB"
                      f"  {sizes[n] / 1e3 / best * 1e3:6.1f} GB/s at best")


if __name__ == "__main__":
    main()
