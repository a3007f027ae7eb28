"""Source -> verified bundle, all or nothing.

Everything is written into a hidden temporary directory beside the output and moved into
place only after parity passed: an interrupted or failed export leaves no bundle behind.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from gptdeploy import bundle as bundle_mod
from gptdeploy.bundle import Bundle, GraphEntry, Manifest, TokenizerEntry
from gptdeploy.errors import ExportError, ParityError
from gptdeploy.parity import GREEDY_STEPS, ParityReport, check_parity

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
GRAPH_FILE = "model.onnx"
# Parity prompts: English, Chinese (byte-level BPE splits its characters), digits, and
# lengths that differ so the batch needs left padding.
PARITY_TEXTS = ("Once upon a time, there was", "他喜欢吃苹果。", "The 3 dogs ran", "hi")
PARITY_STEPS_MIN = 8


@dataclass
class ExportResult:
    bundle: Bundle
    parity: ParityReport


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("gptdeploy", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def parity_prompts(tokenizer_json: str, vocab_limit: int, block_size: int) -> list[list[int]]:
    """Token ids for the parity batch: the fixed texts the tokenizer can encode, plus one
    seeded random prompt so that any vocabulary is exercised."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    prompts = []
    for text in PARITY_TEXTS:
        try:
            ids = tok.encode(text, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - a char vocabulary may lack these characters
            continue
        if ids and max(ids) < vocab_limit:
            prompts.append(ids)
    rng = np.random.default_rng(0)
    prompts.append(rng.integers(0, vocab_limit, size=5).tolist())
    longest = max(1, block_size - PARITY_STEPS_MIN - 1)
    return [p[:longest] for p in prompts]


def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} is not empty; choose another or pass --force to replace it")
    if not out.parent.exists():
        raise ExportError(f"parent directory {out.parent} does not exist")


def export_bundle(
    source_path: Path,
    out: Path,
    *,
    tokenizer: Path | None = None,
    force: bool = False,
    attentions: bool = True,
    external_data: bool | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `source_path` to a bundle at `out`; raises ParityError (nothing written) if parity fails."""
    from gptdeploy.exporters.sources import load_source

    stage = on_stage or (lambda s: log.info("%s", s))
    out = Path(out)
    _check_output_dir(out, force)
    stage(f"loading {source_path}")
    source = load_source(Path(source_path), tokenizer=tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        report = _write_bundle(source, tmp, attentions, external_data, stage)
        _move_into_place(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"no space left on device while writing {out}; nothing was written") from None
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(Bundle.load(out), report)


def _write_bundle(source, tmp: Path, attentions: bool, external_data: bool | None, stage) -> ParityReport:
    import onnxruntime as ort
    import torch

    from gptdeploy.exporters.onnx import export_onnx
    from gptdeploy.modeling import GPT, load_state

    cfg = source.config
    with torch.device("cpu"):
        model = GPT(cfg)
    load_state(model, source.state)
    model.eval()
    stage(f"tracing {cfg.n_layer}-layer model to ONNX")
    sig, data_file = export_onnx(model, tmp / GRAPH_FILE, attentions=attentions, external_data=external_data)
    del model
    (tmp / TOKENIZER_FILE).write_text(source.tokenizer.json, encoding="utf-8")

    stage("checking parity against the source framework")
    reference = source.reference()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(tmp / GRAPH_FILE), opts, providers=["CPUExecutionProvider"])
    prompts = parity_prompts(source.tokenizer.json, source.tokenizer.vocab_size, cfg.block_size)
    steps = min(GREEDY_STEPS, cfg.block_size - max(len(p) for p in prompts))
    report = check_parity(
        session, sig, reference, prompts, pad_id=source.tokenizer.pad_token_id or 0,
        greedy_steps=steps, vocab_limit=source.tokenizer.vocab_size,
    )
    del session, reference
    if not report.passed:
        raise ParityError(f"parity failed against {report.reference}: {report.describe_failures()}", report)

    stage("writing manifest")
    files = [GRAPH_FILE, TOKENIZER_FILE] + ([data_file] if data_file else [])
    tok = source.tokenizer
    manifest = Manifest(
        config=cfg,
        graphs={"fp32": GraphEntry("fp32", GRAPH_FILE, "fp32", sig, data_file)},
        tokenizer=TokenizerEntry(TOKENIZER_FILE, tok.vocab_size, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id),
        files={f: bundle_mod.sha256_file(tmp / f) for f in files},
        source={"kind": source.kind, "path": str(Path(source.path).resolve()), **source.description},
        tools=tool_versions(),
        parity={"fp32": report.to_dict()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    bundle_mod.write_manifest(tmp, manifest)
    _fsync_tree(tmp)
    return report


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename that publishes them (crash safety)."""
    for p in root.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _move_into_place(tmp: Path, out: Path) -> None:
    """Publish `tmp` as `out` by rename; an existing `out` (empty, or replaced with --force)
    is moved aside first and removed only after the new bundle is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
