"""Build the one graph a bundle ships, for each precision, and prove it before it is kept.

    fp32   trace ─ parity vs source ─[unless --portable: fuse ─ parity vs source]────────── ship
    fp16   to_fp16 ─ trace ─ static check (fp32 islands, no contrib ops) ─ parity vs source,
           run by a CPU evaluator that computes in fp16 ───────────────────────────────── ship
    int8   trace fp32 ─ parity vs source ─ fuse ─ parity ─ quantize ─[--kv-cache int8: scales
           calibrated on the fp32 graph]─ agreement vs fp32 ────────────────────────────── ship
    int4   as int8, with MatMulNBits

A fused graph that fails parity (or that onnxruntime cannot run) is dropped for the unfused one,
and the report says so. Any other failure raises ParityError and nothing is written (export.py
owns the directory).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import ExportError, ParityError
from gptdeploy.parity import GREEDY_STEPS, ParityReport, check_parity

log = logging.getLogger(__name__)


@dataclass
class BuiltGraph:
    signature: GraphSignature
    data_file: str | None
    report: object  # ParityReport (fp32, fp16) or AgreementReport (int8, int4)
    graph_info: dict = field(default_factory=dict)  # how it was built: fusion, quantization, fp32 islands

    @property
    def kv_shared_buffer(self) -> bool:
        """Every layer's attention is GroupQueryAttention, which can write the KV cache in place."""
        fusion = self.graph_info.get("fusion", {})
        return bool(self.graph_info.get("fused")) and fusion.get("GroupQueryAttention (gptdeploy pass)", 0) > 0


def ort_session(path: Path, config: GPTConfig):
    """A session running the kernels the `ort` runtime runs for `config`'s model, for the checks
    of a built graph (GroupQueryAttention's kernel: runtimes/ort_session.py)."""
    import onnxruntime as ort

    from gptdeploy.runtimes.ort import tiled_attention
    from gptdeploy.runtimes.ort_session import open_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return open_session(path, opts, flash_default=tiled_attention(config))


@dataclass(frozen=True)
class ParityInputs:
    prompts: list[list[int]]
    steps: int
    pad_id: int
    vocab: int


def parity_inputs(source) -> ParityInputs:
    from gptdeploy.exporters.export import parity_prompts

    tok, cfg = source.tokenizer, source.config
    prompts = parity_prompts(tok.json, tok.vocab_size, cfg.block_size)
    steps = min(GREEDY_STEPS, cfg.block_size - max(len(p) for p in prompts))
    return ParityInputs(prompts, steps, tok.pad_token_id or 0, tok.vocab_size)


def source_parity(session, sig, reference, inputs: ParityInputs, precision: str) -> ParityReport:
    return check_parity(
        session, sig, reference, inputs.prompts, precision=precision, pad_id=inputs.pad_id,
        greedy_steps=inputs.steps, vocab_limit=inputs.vocab,
    )


def build_graph(
    source, options, path: Path, *, external_data: bool | None, eval_text: Path | None,
    stage: Callable[[str], None],
) -> BuiltGraph:
    import torch

    from gptdeploy.modeling import GPT, load_state

    with torch.device("meta"):  # no random init: load_state assigns the source's own tensors
        model = GPT(source.config)
    load_state(model, source.state)
    model.eval()
    reference = source.reference()
    inputs = parity_inputs(source)
    if options.precision == "fp16":
        return _fp16(model, options, path, external_data, reference, inputs, stage)
    with tempfile.TemporaryDirectory(prefix=".fp32-", dir=path.parent) as work:
        fp32_path = path if options.precision == "fp32" else Path(work) / "fp32.onnx"
        built = fp32_graph(model, options, fp32_path, external_data, reference, inputs, stage)
        del model
        if options.precision == "fp32":
            return built
        return _quantized(source, options, fp32_path, built, path, eval_text, inputs, stage)


def fp32_graph(model, options, path: Path, external_data, reference, inputs: ParityInputs, stage) -> BuiltGraph:
    """The fp32 graph, proven against the source; fused for onnxruntime unless portable."""
    import onnx

    from gptdeploy.exporters.fusion import fuse_graph
    from gptdeploy.exporters.gqa import attention_params
    from gptdeploy.exporters.graph_files import save_graph
    from gptdeploy.exporters.onnx import export_onnx
    from gptdeploy.runtimes.ort_session import ORT_ERRORS

    cfg = model.config
    stage(f"tracing {cfg.n_layer}-layer model to ONNX (fp32)")
    sig, data_file = export_onnx(
        model, path, attentions=options.attentions, last_logits_only=options.last_logits_only,
        external_data=external_data,
    )
    stage("checking parity against the source framework")
    report = source_parity(ort_session(path, cfg), sig, reference, inputs, "fp32")
    if not report.passed:
        raise ParityError(f"parity failed against {report.reference}: {report.describe_failures()}", report)
    built = BuiltGraph(sig, data_file, report, {"fused": False})
    if not options.fused:
        return built
    stage("fusing attention, norms and GELU for onnxruntime")
    params = attention_params({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    fused, fusion = fuse_graph(onnx.load(str(path)), cfg, sig, params=params)
    built.graph_info["fusion"] = fusion.to_dict()
    with tempfile.TemporaryDirectory(prefix=".fused-", dir=path.parent) as tmp:
        fused_path = Path(tmp) / path.name  # same names, so the graph's external-data link stays valid
        fused_data = save_graph(fused, fused_path, external_data=data_file is not None)
        del fused
        stage("checking parity of the fused graph")
        try:
            fused_report = source_parity(ort_session(fused_path, cfg), sig, reference, inputs, "fp32")
            why = None if fused_report.passed else fused_report.describe_failures()
        except ORT_ERRORS as exc:  # a kernel refused a shape the pass did not foresee
            why = f"onnxruntime could not run it: {str(exc).strip().splitlines()[0]}"
        if why:
            built.graph_info["fusion"]["kept"] = f"unfused: the fused graph failed parity ({why})"
            log.warning("fused graph failed parity; keeping the unfused graph: %s", why)
            return built
        for name in filter(None, (path.name, fused_data)):
            os.replace(Path(tmp) / name, path.parent / name)
    built.report, built.graph_info["fused"] = fused_report, True
    return built


def _fp16(model, options, path, external_data, reference, inputs, stage) -> BuiltGraph:
    import onnx

    from gptdeploy.exporters.fp16 import Fp16CpuSession, check_precision, precision_islands, typed_graph
    from gptdeploy.exporters.onnx import export_onnx
    from gptdeploy.modeling import to_fp16

    stage(f"tracing {model.config.n_layer}-layer model to ONNX (fp16, fp32 norms/rotary/softmax/logits)")
    sig, data_file = export_onnx(
        to_fp16(model), path, attentions=options.attentions, last_logits_only=options.last_logits_only,
        external_data=external_data,
    )
    typed = typed_graph(onnx.load(str(path), load_external_data=False))
    problems = check_precision(typed, "fp16").problems
    if problems:  # a bug of ours, not of the user's model
        raise ExportError(f"the fp16 graph breaks its own contract: {'; '.join(problems)}")
    islands = {k: sorted(set(v)) for k, v in precision_islands(typed).items()}
    del typed
    stage("checking fp16 parity on the CPU (onnx reference evaluator, fp16 arithmetic)")
    report = source_parity(Fp16CpuSession(path), sig, reference, inputs, "fp16")
    if not report.passed:
        raise ParityError(f"fp16 parity failed against {report.reference}: {report.describe_failures()}", report)
    return BuiltGraph(sig, data_file, report, {"fused": False, "computes_in": islands})


def _quantized(source, options, fp32_path: Path, fp32: BuiltGraph, path: Path, eval_text, inputs, stage) -> BuiltGraph:
    import onnx

    from gptdeploy.exporters.agreement import check_agreement
    from gptdeploy.exporters.evaltext import held_out_text, sampled_text
    from gptdeploy.exporters.graph_files import save_graph
    from gptdeploy.exporters.quantize import quantize_graph

    stage(f"quantizing to {options.precision}")
    proto, quant = quantize_graph(onnx.load(str(fp32_path)), options.precision, path.parent)
    cfg, tok = source.config, source.tokenizer
    ref_session = ort_session(fp32_path, cfg)
    sig = fp32.signature
    if options.kv_cache == "int8":
        sig = _int8_kv_cache(fp32, ref_session, proto, inputs, cfg, stage)
    data_file = save_graph(proto, path)  # once, after every edit
    del proto
    stage(f"measuring the {options.precision} graph against the fp32 graph")
    session = ort_session(path, cfg)
    text = held_out_text(source, tok.json, tok.vocab_size, cfg.block_size, explicit=eval_text)
    if text is None:
        text = sampled_text(ref_session, fp32.signature, inputs.prompts, tok.vocab_size, cfg.block_size)
    report = check_agreement(
        ref_session, fp32.signature, session, sig, precision=options.precision,
        prompts=inputs.prompts, eval_text=text, pad_id=inputs.pad_id, vocab=inputs.vocab,
        greedy_steps=inputs.steps,
    )
    if not report.passed:
        raise ParityError(f"{options.precision} graph out of bounds against the fp32 graph: "
                          f"{report.describe_failures()}", report)
    sizes = {"fp32_bytes": _graph_bytes(fp32_path, fp32.data_file), "bytes": _graph_bytes(path, data_file)}
    sizes["ratio"] = round(sizes["bytes"] / sizes["fp32_bytes"], 3)
    info = {
        "fused": fp32.graph_info["fused"],
        **({"fusion": fp32.graph_info["fusion"]} if "fusion" in fp32.graph_info else {}),
        "quantization": quant.to_dict() | ({"kv_cache": "int8, one fp32 scale per KV head and channel, "
                                             "calibrated on the fp32 graph's sampled text"}
                                            if options.kv_cache == "int8" else {}),
        "size": sizes,
        "fp32_parity": {"reference": fp32.report.reference, "passed": fp32.report.passed,
                        "summary": fp32.report.summary(),
                        "greedy_agree": f"{fp32.report.greedy_agree}/{fp32.report.greedy_steps}"},
    }
    return BuiltGraph(sig, data_file, report, info)


def _int8_kv_cache(fp32: BuiltGraph, ref_session, proto, inputs: ParityInputs, cfg, stage) -> GraphSignature:
    """The quantized graph `proto` rewritten in place to keep an int8 KV cache (exporters/kv_quant.py)."""
    from gptdeploy.exporters.kv_quant import calibrate, int8_kv_cache

    if not fp32.kv_shared_buffer:
        why = "; ".join(fp32.graph_info.get("fusion", {}).get("notes", [])) or "the graph was not fused"
        raise ExportError(f"--kv-cache int8 needs the fused attention, which this model did not get ({why}); "
                          "export without --kv-cache")
    stage("calibrating the int8 KV cache on the fp32 graph")
    scales = calibrate(ref_session, fp32.signature, inputs.prompts, inputs.pad_id, inputs.vocab, cfg.block_size)
    return int8_kv_cache(proto, fp32.signature, scales)


def _graph_bytes(path: Path, data_file: str | None) -> int:
    return path.stat().st_size + (path.with_name(data_file).stat().st_size if data_file else 0)


__all__ = ["BuiltGraph", "ParityInputs", "build_graph", "fp32_graph", "ort_session", "parity_inputs", "source_parity"]
