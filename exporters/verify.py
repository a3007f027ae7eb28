"""Re-check a bundle: integrity, graph IO against the contract, and parity against its source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError, SourceError
from gptdeploy.parity import GREEDY_STEPS, ParityReport, check_parity


@dataclass
class VerifyResult:
    bundle: Bundle
    io_problems: list[str] = field(default_factory=list)
    parity: dict[str, ParityReport] = field(default_factory=dict)
    source: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.io_problems and all(r.passed for r in self.parity.values())


def verify_bundle(path: Path, *, source: Path | None = None, integrity_only: bool = False) -> VerifyResult:
    """Load (hash-checked) and re-run parity of every graph against the source it was exported from.

    `source` overrides the path recorded in the manifest (bundles travel; sources stay behind).
    """
    import onnxruntime as ort

    from gptdeploy.exporters.export import parity_prompts
    from gptdeploy.exporters.onnx import graph_io_problems
    from gptdeploy.exporters.sources import load_source

    bundle = Bundle.load(path)
    result = VerifyResult(bundle)
    for entry in bundle.manifest.graphs.values():
        result.io_problems += [f"{entry.name}: {p}" for p in graph_io_problems(bundle.file(entry.file), entry.signature)]
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
    reference = src.reference()
    cfg, tok = bundle.config, bundle.manifest.tokenizer
    prompts = parity_prompts(src.tokenizer.json, tok.vocab_size, cfg.block_size)
    steps = min(GREEDY_STEPS, cfg.block_size - max(len(p) for p in prompts))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name, entry in bundle.manifest.graphs.items():
        session = ort.InferenceSession(str(bundle.file(entry.file)), opts, providers=["CPUExecutionProvider"])
        result.parity[name] = check_parity(
            session, entry.signature, reference, prompts, precision=entry.precision,
            pad_id=tok.pad_token_id or 0, greedy_steps=steps, vocab_limit=tok.vocab_size,
        )
    return result
