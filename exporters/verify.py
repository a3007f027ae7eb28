"""Re-check a bundle: integrity, graph IO against the contract, and parity against its source.

Each graph is judged the way export judged it: fp32 with onnxruntime against the source
framework; fp16 with the CPU evaluator that computes in fp16 (and its static fp32-island
check); int8/int4 against an fp32 graph rebuilt from the source (itself checked against the
source first) with the same agreement measures and held-out text.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError, ParityError, SourceError
from gptdeploy.parity import ParityReport


@dataclass
class VerifyResult:
    bundle: Bundle
    io_problems: list[str] = field(default_factory=list)
    # graph name -> what TensorRT's parser would reject (empty: nothing), or None for a CPU graph
    # for onnxruntime (quantized, or fused with contrib ops), which build-engine never takes
    tensorrt: dict[str, list[str] | None] = field(default_factory=dict)
    parity: dict[str, ParityReport] = field(default_factory=dict)  # or AgreementReport for int8/int4
    source: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.io_problems and all(r.passed for r in self.parity.values())


def verify_bundle(path: Path, *, source: Path | None = None, integrity_only: bool = False) -> VerifyResult:
    """Load (hash-checked) and re-run parity of every graph against the source it was exported from.

    `source` overrides the path recorded in the manifest (bundles travel; sources stay behind).
    """
    import onnx

    from gptdeploy.exporters.fp16 import check_precision, typed_graph
    from gptdeploy.exporters.onnx import graph_io_problems
    from gptdeploy.exporters.sources import load_source
    from gptdeploy.exporters.tensorrt.checks import check_trt_operators

    bundle = Bundle.load(path)
    result = VerifyResult(bundle)
    for entry in bundle.manifest.graphs.values():
        graph_path = bundle.file(entry.file)
        result.io_problems += [f"{entry.name}: {p}" for p in graph_io_problems(graph_path, entry.signature)]
        proto = onnx.load(str(graph_path), load_external_data=False)
        if entry.precision == "fp16":
            result.io_problems += [f"{entry.name}: {p}" for p in check_precision(typed_graph(proto), "fp16").problems]
        if entry.precision in ("int8", "int4") or any(n.domain not in ("", "ai.onnx") for n in proto.graph.node):
            result.tensorrt[entry.name] = None  # quantized or fused: a CPU graph for onnxruntime
        else:  # a build-engine input: anything TensorRT's parser would reject is a failure
            found = check_trt_operators(graph_path)
            result.tensorrt[entry.name] = found
            result.io_problems += [f"{entry.name}: TensorRT would reject it: {p}" for p in found]
        del proto
    if integrity_only:
        return result
    recorded = bundle.manifest.source.get("path")
    src_path = Path(source) if source else (Path(recorded) if recorded else None)
    if src_path is None or not src_path.exists():
        raise SourceError(
            f"source {src_path or '(none recorded)'} not found, so parity cannot be re-run; "
            "pass --source PATH, or --integrity-only to check hashes and graph IO alone"
        )
    tokenizer = bundle.file(bundle.manifest.tokenizer.file) if bundle.manifest.source.get("kind") == "nanogpt" else None
    src = load_source(src_path, tokenizer=tokenizer)
    if src.config != bundle.config:
        raise BundleError(f"source {src_path} has a different model config than the bundle; is it the right source?")
    result.source = src_path
    for name, entry in bundle.manifest.graphs.items():
        result.parity[name] = _verify_graph(bundle, entry, src)
    return result


def _verify_graph(bundle: Bundle, entry, src):
    from gptdeploy.exporters.variants import ort_session, parity_inputs, source_parity

    inputs = parity_inputs(src)
    reference = src.reference()
    graph_path = bundle.file(entry.file)
    if entry.precision == "fp16":
        from gptdeploy.exporters.fp16 import Fp16CpuSession

        return source_parity(Fp16CpuSession(graph_path), entry.signature, reference, inputs, "fp16")
    if entry.precision not in ("int8", "int4"):
        return source_parity(ort_session(graph_path, bundle.config), entry.signature, reference, inputs, entry.precision)
    recorded = (bundle.manifest.parity.get(entry.name) or {}).get("eval_text") or {}
    return _verify_quantized(graph_path, entry, src, reference, inputs, _recorded_text(recorded))


def _recorded_text(recorded: dict) -> Path | None:
    """The held-out text export used, if it is still here unchanged (else the default search runs)."""
    import hashlib

    path = Path(recorded["path"]) if recorded.get("path") else None
    if path is None or not path.is_file():
        return None
    return path if hashlib.sha256(path.read_bytes()).hexdigest() == recorded.get("sha256") else None


def _verify_quantized(graph_path: Path, entry, src, reference, inputs, eval_text: Path | None):
    import torch

    from gptdeploy.exporters.agreement import check_agreement
    from gptdeploy.exporters.evaltext import held_out_text, sampled_text
    from gptdeploy.exporters.export import GraphOptions
    from gptdeploy.exporters.variants import fp32_graph, ort_session
    from gptdeploy.modeling import GPT, load_state

    sig, cfg, tok = entry.signature, src.config, src.tokenizer
    with torch.device("meta"):  # no random init: load_state assigns the source's own tensors
        model = GPT(cfg)
    load_state(model, src.state)
    options = GraphOptions("fp32", sig.attentions, sig.last_logits_only)
    with tempfile.TemporaryDirectory(prefix="gptdeploy-verify-") as work:
        fp32_path = Path(work) / "fp32.onnx"
        try:
            fp32 = fp32_graph(model.eval(), options, fp32_path, None, reference, inputs, stage=lambda s: None)
        except ParityError as exc:
            return exc.report  # the rebuilt fp32 graph itself disagrees with the source: report that
        del model
        ref_session = ort_session(fp32_path, cfg)
        text = held_out_text(src, tok.json, tok.vocab_size, cfg.block_size, explicit=eval_text)
        if text is None:
            text = sampled_text(ref_session, fp32.signature, inputs.prompts, tok.vocab_size, cfg.block_size)
        return check_agreement(
            ref_session, fp32.signature, ort_session(graph_path, cfg), sig, precision=entry.precision,
            prompts=inputs.prompts, eval_text=text, pad_id=inputs.pad_id, vocab=inputs.vocab,
            greedy_steps=inputs.steps,
        )
