"""TensorRT optimization profiles from the graph contract: pure functions, no TensorRT.

Two optimization profiles, one per phase, derived from the contract's axes:
::
    profile 0 "prefill": input_ids / position_ids (B, T), attention_mask (B, 0+T), past (B, kvh, 0, hs)
                         B 1..max_batch, T 1..max_context
    profile 1 "decode":  input_ids / position_ids (B, 1), attention_mask (B, P+1), past (B, kvh, P, hs)
                         B 1..max_batch, P 1..max_context-1
Every min / opt / max shape is built from one set of axis values, so the equal-dimension rules
(one batch everywhere, mask length = past + seq, position_ids shaped as input_ids) hold in each.
A 0-length past in a profile is legal: IOptimizationProfile::setDimensions requires
`0 <= minDims.d[i] <= optDims.d[i] <= maxDims.d[i]` (NvInferRuntime.h, TensorRT 8+; 7.x said 1 <=).
"""

from __future__ import annotations

import math

from gptdeploy import contract as io
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import ExportError

PHASES = ("prefill", "decode")  # profile index = position here
Triple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

# build-engine's limits when --max-context is not given. A RoPE model's context is its
# max_position_embeddings (Mistral 131072, Qwen2 32768), and the tensorrt runtime allocates every
# buffer at the engine's limits (buffer_shapes): Mistral-7B's fp16 KV cache is 64 GiB at batch 4 and
# 131072 positions, held twice (ping and pong). So the default context is the model's, at most
# DEFAULT_MAX_CONTEXT, and halved until those buffers fit DEFAULT_BUFFER_BUDGET, which leaves a
# 24 GB card room for a 7B model's fp16 weights (14.5 GB) and TensorRT's activations. --max-context
# raises it.
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_BUFFER_BUDGET = 4 << 30  # bytes
_ITEMSIZE = {"int64": 8, "float32": 4, "float16": 2}


# ------------------------------------------------------------------------------------ profiles


def _shape(axes: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(a if isinstance(a, int) else dims[a] for a in axes)


def _dims(b: int, t: int, p: int) -> dict[str, int]:
    return {io.BATCH: b, io.SEQ: t, io.PAST: p, io.TOTAL: p + t}


def check_limits(max_batch: int, max_context: int, model_context: int | None = None) -> None:
    """Raise ExportError (one line) for limits no engine can have."""
    for name, value, least in (("max batch", max_batch, 1), ("max context", max_context, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ExportError(
                f"{name} must be an integer >= {least}, got {value!r}"
                + (" (decode needs at least one past position)" if least == 2 else "")
            )
    if model_context is not None and max_context > model_context:
        raise ExportError(
            f"max context {max_context} exceeds the model's {model_context} positions; "
            f"use --max-context {model_context} or less"
        )


def profile_shapes(
    sig: GraphSignature,
    max_batch: int,
    max_context: int,
    opt_batch: int | None = None,
    opt_context: int | None = None,
) -> dict[str, dict[str, Triple]]:
    """{"prefill": {input: (min, opt, max)}, "decode": {...}} for every graph input.

    opt defaults: batch 1 (the latency case), context max_context // 2 (prompt length for prefill,
    past length for decode, capped at max_context - 1)."""
    check_limits(max_batch, max_context)
    ob = 1 if opt_batch is None else opt_batch
    oc = max(1, max_context // 2) if opt_context is None else opt_context
    if not 1 <= ob <= max_batch or not 1 <= oc <= max_context:
        raise ExportError(f"opt batch {ob} / opt context {oc} must lie in 1..{max_batch} / 1..{max_context}")
    prefill = (_dims(1, 1, 0), _dims(ob, oc, 0), _dims(max_batch, max_context, 0))
    decode = (_dims(1, 1, 1), _dims(ob, 1, min(oc, max_context - 1)), _dims(max_batch, 1, max_context - 1))
    return {
        phase: {s.name: tuple(_shape(s.axes, d) for d in triple) for s in sig.inputs()}
        for phase, triple in zip(PHASES, (prefill, decode))
    }


def check_profiles(sig: GraphSignature, profiles: dict, max_context: int | None = None) -> list[str]:
    """Every way `profiles` breaks TensorRT's rules or the graph's equal-dimension constraints."""
    problems = []
    specs = {s.name: s for s in sig.inputs()}
    if sorted(profiles) != sorted(PHASES):
        return [f"profiles must be exactly {PHASES}, got {sorted(profiles)}"]
    for phase in PHASES:
        shapes = profiles[phase]
        if sorted(shapes) != sorted(specs):
            problems.append(f"{phase}: inputs {sorted(set(specs) ^ set(shapes))} missing or unexpected")
            continue
        for name, triple in shapes.items():
            if len(triple) != 3 or any(len(s) != len(specs[name].axes) for s in triple):
                problems.append(f"{phase}: {name} needs (min, opt, max) of rank {len(specs[name].axes)}")
                continue
            for i in range(len(specs[name].axes)):
                lo, mid, hi = (s[i] for s in triple)
                if not 0 <= lo <= mid <= hi:
                    problems.append(
                        f"{phase}: {name} axis {i} breaks 0 <= min <= opt <= max ({lo}, {mid}, {hi})"
                    )
        if any(p.startswith(f"{phase}: ") and "rank" in p for p in problems):
            continue
        for k, which in enumerate(("min", "opt", "max")):
            seen: dict[str, set] = {}
            for name, spec in specs.items():
                for axis, value in zip(spec.axes, shapes[name][k]):
                    if isinstance(axis, int):
                        if value != axis:
                            problems.append(
                                f"{phase} {which}: {name} has {value} where the graph fixes {axis}"
                            )
                    else:
                        seen.setdefault(axis, set()).add(value)
            for axis, values in seen.items():
                if len(values) > 1:
                    problems.append(f"{phase} {which}: axis {axis} differs between inputs {sorted(values)}")
            b, t, p, total = (min(seen.get(a, {0})) for a in (io.BATCH, io.SEQ, io.PAST, io.TOTAL))
            if total != p + t:
                problems.append(f"{phase} {which}: {io.ATTENTION_MASK} length {total} != past {p} + seq {t}")
            if b < 1 or t < 1:
                problems.append(f"{phase} {which}: batch and sequence must be >= 1 (got {b}, {t})")
            if phase == "prefill" and p != 0:
                problems.append(f"prefill {which}: past must be 0, got {p}")
            if phase == "decode" and (t != 1 or p < 1):
                problems.append(f"decode {which}: needs seq 1 and past >= 1, got seq {t}, past {p}")
            if max_context is not None and total > max_context:
                problems.append(f"{phase} {which}: {total} positions exceed max context {max_context}")
    return problems


def buffer_bytes(sig: GraphSignature, max_batch: int, max_context: int) -> int:
    """Bytes of the device buffers the tensorrt runtime holds at these limits: every input and
    output at its largest (a past and its present are the runtime's two KV buffers per tensor)."""
    shapes = buffer_shapes(sig, max_batch, max_context)
    specs = [*sig.inputs(), *sig.outputs()]
    return sum(math.prod(shapes[s.name]) * _ITEMSIZE[s.dtype] for s in specs)


def default_max_context(
    sig: GraphSignature, model_context: int, max_batch: int, budget: int = DEFAULT_BUFFER_BUDGET
) -> int:
    """The engine's context when none is asked for: the model's, at most DEFAULT_MAX_CONTEXT,
    halved while the runtime's buffers (an audit graph's attention outputs grow with its square)
    would pass `budget` bytes; never below 2 (one past position for decode)."""
    context = min(model_context, DEFAULT_MAX_CONTEXT)
    while context > 2 and buffer_bytes(sig, max_batch, context) > budget:
        context = max(2, context // 2)
    return context


def buffer_shapes(sig: GraphSignature, max_batch: int, max_context: int) -> dict[str, tuple[int, ...]]:
    """The largest shape of every graph input and output over both profiles; a past buffer is sized
    as a present so that the two can swap (present of step n is the past of step n+1)."""
    d = {io.BATCH: max_batch, io.SEQ: max_context, io.PAST: max_context, io.TOTAL: max_context}
    return {s.name: _shape(s.axes, d) for s in [*sig.inputs(), *sig.outputs()]}
