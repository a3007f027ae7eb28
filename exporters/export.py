"""Source -> verified bundle, all or nothing.

Everything is written into a hidden temporary directory beside the output and moved into
place only after parity passed: an interrupted or failed export leaves no bundle behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptdeploy import machine
from gptdeploy.bundle import Bundle, write_manifest
from gptdeploy.errors import ExportError
from gptdeploy.exporters.agreement import AgreementReport
from gptdeploy.exporters.kv_quant import KV_CACHE
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import QUANTIZED, GraphEntry, Manifest
from gptdeploy.parity import ParityReport

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
GRAPH_FILE = "model.onnx"
# Parity prompts: English, Chinese (byte-level BPE splits its characters), digits, and
# lengths that differ so the batch needs left padding.
PARITY_TEXTS = ("Once upon a time, there was", "他喜欢吃苹果。", "The 3 dogs ran", "hi")
PARITY_STEPS_MIN = 8


PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class GraphOptions:
    """What kind of graph to build; the manifest records each of these."""

    precision: str = "fp32"
    attentions: bool = True  # audit graphs return attention probabilities
    last_logits_only: bool = True  # prefill computes logits at the last position only
    kv_cache: str = "float"  # "int8": int8 KV cache in a fused int8 / int4 graph (exporters/kv_quant.py)
    portable: bool = False  # fp32: standard ONNX ops only (TensorRT, onnxruntime's CUDA provider), not fused

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.kv_cache not in KV_CACHE:
            raise ExportError(f"unknown KV cache type {self.kv_cache!r}; choose {' or '.join(KV_CACHE)}")
        if self.kv_cache == "int8" and self.precision not in QUANTIZED:
            raise ExportError("an int8 KV cache is for int8 and int4 graphs (their perplexity and margin bounds "
                              "measure it); add --int8 or --int4")
        if self.portable and self.precision in QUANTIZED:
            raise ExportError(f"--portable keeps an fp32 graph standard ONNX (fp16 graphs always are); "
                              f"{self.precision} graphs use onnxruntime's quantized CPU ops and cannot be")

    @property
    def fused(self) -> bool:
        """Graphs for onnxruntime's CPU provider are fused: fp32 unless `portable`, and every int8 / int4
        graph (GroupQueryAttention returns the attention outputs of an audit graph). fp16 graphs and
        portable fp32 graphs stay standard ONNX, for TensorRT and other runtimes."""
        return self.precision in QUANTIZED or (self.precision == "fp32" and not self.portable)


@dataclass
class ExportResult:
    bundle: Bundle
    parity: ParityReport | AgreementReport  # the shipped graph's: against the source, or (int8/int4) the fp32 graph


def tool_versions() -> dict[str, str]:
    return machine.versions(("gptdeploy", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"))


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
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"{parent} is not a directory, so {out} cannot be created")
        if parent.exists():
            break


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p `directory`; returns the directories made, outermost first (removed again when
    the export fails, so that a failed export leaves nothing behind)."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        missing.append(d)
    missing.reverse()
    try:
        for d in missing:
            d.mkdir()
    except OSError as exc:
        _remove_empty(missing)
        raise ExportError(f"cannot create {directory}: {exc.strerror or exc}") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for d in reversed(directories):
        try:
            d.rmdir()
        except OSError:
            pass


def export_bundle(
    source_path: Path,
    out: Path,
    *,
    tokenizer: Path | None = None,
    force: bool = False,
    precision: str = "fp32",
    attentions: bool = True,
    last_logits_only: bool = True,
    eval_text: Path | None = None,
    external_data: bool | None = None,
    kv_cache: str = "float",
    portable: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `source_path` to a bundle at `out`; raises ParityError (nothing written) if parity fails.

    precision: "fp32"; "fp16" (for GPUs / TensorRT); "int8" or "int4" (for CPUs). fp32, int8 and int4
    graphs are fused for onnxruntime's CPU provider (exporters/fusion.py), audit graphs included.
    portable: keep an fp32 graph standard ONNX (TensorRT, onnxruntime's CUDA provider, other runtimes).
    last_logits_only: the graph returns logits for the last position only, which is all that
    generation reads; False keeps every position's (for scoring text).
    eval_text: held-out text for the perplexity check of int8/int4 (see exporters/evaltext.py).
    kv_cache: "float" (the graph's dtype), or "int8" for int8 / int4 graphs (exporters/kv_quant.py).
    """
    from gptdeploy.exporters.sources import load_source

    options = GraphOptions(precision, attentions, last_logits_only, kv_cache, portable)
    stage = on_stage or (lambda s: log.info("%s", s))
    out = Path(out)
    _check_output_dir(out, force)
    stage(f"loading {source_path}")
    source = load_source(Path(source_path), tokenizer=tokenizer)
    created = _make_parents(out.parent)
    _remove_stale_partials(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        _remove_empty(created)
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a published bundle gets the user's usual mode
    try:
        report = _write_bundle(source, tmp, options, external_data, eval_text, stage)
        _move_into_place(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"no space left on device while writing {out}; nothing was written") from None
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return ExportResult(Bundle.load(out), report)


def _write_bundle(source, tmp: Path, options: GraphOptions, external_data, eval_text, stage):
    from gptdeploy.exporters.onnx import declare_output_shapes
    from gptdeploy.exporters.variants import build_graph
    from gptdeploy.exporters.weights_map import graph_weights

    cfg, tok = source.config, source.tokenizer
    built = build_graph(source, options, tmp / GRAPH_FILE, external_data=external_data, eval_text=eval_text, stage=stage)
    # The contract's output axes, whatever the tracer and the passes named them (onnxruntime-genai
    # reads a fixed 1 as last-position logits); declared shapes only, the parity evidence stands.
    declare_output_shapes(tmp / GRAPH_FILE, built.signature)
    from gptdeploy.exporters.sources.tokenizer_files import write_bundle_files

    tok_entry, tok_files = write_bundle_files(tok, tmp, TOKENIZER_FILE)  # tokenizer.json (+ chat_template.jinja)
    from gptdeploy.exporters.interop import write_interop_files

    # config.json, generation_config.json, genai_config.json: Optimum and onnxruntime-genai load the bundle
    interop = write_interop_files(source, tmp, tok_entry, GRAPH_FILE, built.signature)

    stage("writing manifest")
    name = options.precision
    weights = graph_weights(cfg, source.state, options.precision, tmp / GRAPH_FILE)  # for the torch runtime
    files = [GRAPH_FILE, *tok_files, *interop.files] + ([built.data_file] if built.data_file else [])
    manifest = Manifest(
        config=cfg,
        graphs={name: GraphEntry(name, GRAPH_FILE, options.precision, built.signature, built.data_file, weights,
                                 kv_shared_buffer=built.kv_shared_buffer)},
        tokenizer=tok_entry,
        files={f: sha256_file(tmp / f) for f in files},
        source={"kind": source.kind, "path": str(Path(source.path).resolve()), **source.description,
                "interop": interop.notes},
        tools=tool_versions(),
        parity={name: built.report.to_dict() | {"graph": built.graph_info}},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(tmp, manifest)
    _fsync_tree(tmp)
    return built.report


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename that publishes them (crash safety)."""
    for p in root.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary directories of earlier exports to `out` that were killed (their pid is gone)."""
    for stale in out.parent.glob(f".{out.name}.*.partial"):
        pid = stale.name[len(out.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


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
