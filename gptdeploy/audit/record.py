"""Audit records: what a deployed model was asked, what it answered, and what it attended to.

    with Generator.load("out/sample") as gen:
        out = gen.generate("他喜欢", max_new_tokens=20, temperature=0.8, seed=7, record_attention=True)
        append_generation("audit.log", gen, out, max_new_tokens=20)
    for rec in read_records("audit.log"): ...

numpy only. A record's attention covers the S = prompt + generated - 1 positions the model
ran (the last generated token was never fed back); stored per layer as the lower triangle of
each head's [S, S] matrix, float16 by default (~3 significant digits; rows sum to 1 within
~5e-4) or float32 (exact). The log format (framing, hash chain) is gptdeploy/audit/log.py.
"""

from __future__ import annotations

import io
import os
import platform
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptdeploy import machine
from gptdeploy.audit.append import append_frames
from gptdeploy.audit.labels import Tokens, token_labels
from gptdeploy.audit.log import Frame, read_payload
from gptdeploy.audit.verify import VerifyReport, verify
from gptdeploy.errors import AuditError

DTYPES = ("float16", "float32")
REPLACEMENT = "\ufffd"
_LABEL_RUN = 8  # tokens joined at most to complete one character for a label
_VERSIONED = ("gptdeploy", "numpy", "tokenizers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "onnx")


@dataclass(frozen=True)
class AuditOptions:
    """What to store of the recorded attention: bounds a record's size."""

    layers: tuple[int, ...] | None = None  # None: every layer
    heads: tuple[int, ...] | None = None  # None: every head (the same heads in each stored layer)
    dtype: str = "float16"  # or "float32" for exact probabilities

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise AuditError(f"audit dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class AuditRecord:
    prompt: Tokens
    output: Tokens
    finish_reason: str
    sampling: dict  # temperature, top_k, top_p, repetition_penalty, seed, max_new_tokens, stop, stop_token_ids
    model: dict  # bundle manifest sha256, source (kind, name, format, sha256), config, graph
    runtime: dict  # backend, library versions, platform
    time: str  # UTC, ISO 8601
    layers: list[int]  # model layers stored, ascending
    heads: list[int]  # heads stored in each of them
    dtype: str  # storage dtype of the probabilities
    attention: list[np.ndarray]  # per stored layer (len(heads), S, S) float32; rows are queries
    batch: dict = field(default_factory=lambda: {"size": 1, "row": 0})
    timings: dict = field(default_factory=dict)
    index: int | None = None  # set when read from a log
    sha256: str | None = None

    @property
    def positions(self) -> int:
        """S: positions the model ran, prompt + generated - 1."""
        return len(self.prompt.ids) + len(self.output.ids) - 1

    @property
    def labels(self) -> list[str]:
        """One label per attention position (the prompt, then every generated token but the last)."""
        return self.prompt.labels + self.output.labels[:-1]

    def query_for(self, k: int) -> int:
        """The attention row whose output produced generated token k (the position before it)."""
        return len(self.prompt.ids) - 1 + k

    def header(self) -> dict:
        return {
            "time": self.time, "prompt": self.prompt.__dict__, "finish_reason": self.finish_reason,
            "output": self.output.__dict__, "sampling": self.sampling, "model": self.model,
            "runtime": self.runtime, "batch": self.batch, "timings": self.timings,
            "attention": {"positions": self.positions, "layers": self.layers, "heads": self.heads,
                          "dtype": self.dtype, "layout": "tril", "key": "attention.{layer}"},
        }


# ---------------------------------------------------------------------------- lower triangle


def pack_tril(att: np.ndarray, dtype: str) -> np.ndarray:
    """(nh, S, S) -> (nh, S(S+1)/2): row-major lower triangle, diagonal included."""
    S = att.shape[-1]
    i, j = np.tril_indices(S)
    return att[:, i, j].astype(dtype)  # (nh, S(S+1)/2)


def unpack_tril(packed: np.ndarray, S: int) -> np.ndarray:
    """(nh, S(S+1)/2) -> (nh, S, S) float32, zeros above the diagonal."""
    i, j = np.tril_indices(S)
    full = np.zeros((packed.shape[0], S, S), dtype=np.float32)  # (nh, S, S)
    full[:, i, j] = packed
    return full


def encode_payload(rec: AuditRecord) -> bytes:
    buf = io.BytesIO()
    arrays = {f"attention.{layer}": pack_tril(a, rec.dtype) for layer, a in zip(rec.layers, rec.attention)}
    np.savez_compressed(buf, **arrays)  # zip + deflate: readable by np.load anywhere
    return buf.getvalue()


def decode_payload(data: bytes, header: dict) -> list[np.ndarray]:
    att = header["attention"]
    S, nh = int(att["positions"]), len(att["heads"])
    expect = nh * S * (S + 1) // 2 * np.dtype(att["dtype"]).itemsize
    out = []
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for layer in att["layers"]:
                name = f"attention.{layer}"
                if z.zip.getinfo(name + ".npy").file_size > expect + 4096:  # refuse a zip bomb
                    raise AuditError(f"payload array {name} is larger than its header says")
                packed = z[name]
                if packed.shape != (nh, S * (S + 1) // 2) or packed.dtype != np.dtype(att["dtype"]):
                    raise AuditError(f"payload array {name} has shape {packed.shape} {packed.dtype}, "
                                     f"not ({nh}, {S * (S + 1) // 2}) {att['dtype']}")
                out.append(unpack_tril(packed, S))
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise AuditError(f"the record's attention payload cannot be read: {exc}") from None
    return out


# ------------------------------------------------------------------------------- building


def _tokens(tokenizer, text: str, ids: Sequence[int]) -> Tokens:
    ids = [int(i) for i in ids]
    vocab = [tokenizer.id_to_token(i) or f"<{i}>" for i in ids]
    return Tokens(text, ids, vocab, token_labels(tokenizer.decode, vocab, ids))


def _versions(backend: str) -> dict:
    out = machine.versions(_VERSIONED) | {"platform": platform.platform(terse=True)}
    if backend != "torch":
        out.pop("torch", None)
        out.pop("onnx", None)
    return out


def build_record(generator, result, *, sampling=None, max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 options: AuditOptions = AuditOptions(), batch: tuple[int, int] = (1, 0)) -> AuditRecord:
    """An AuditRecord for one GenerationResult made with `record_attention=True`. Sampling
    defaults to the result's own (with the seed actually used)."""
    if result.attention is None:
        raise AuditError("the generation was run without record_attention=True: it has no attention to audit")
    sampling = sampling if sampling is not None else getattr(result, "sampling", None)
    if sampling is None:
        raise AuditError("the sampling parameters of this generation are unknown; pass sampling=SamplingParams(...)")
    bundle, tok, rt = generator.bundle, generator.tokenizer, generator.runtime
    c = bundle.config
    layers = _select(options.layers, c.n_layer, "layer")
    heads = _select(options.heads, c.n_head, "head")
    S = len(result.prompt_token_ids) + len(result.token_ids) - 1
    attention = []
    for layer in layers:
        a = np.asarray(result.attention[layer])  # (1, nh, S, S)
        if a.shape != (1, c.n_head, S, S):
            raise AuditError(f"layer {layer} attention has shape {a.shape}, expected (1, {c.n_head}, {S}, {S})")
        if np.triu(a[0], k=1).any():  # the format stores the lower triangle only: refuse to drop weight
            raise AuditError(f"layer {layer} attention has weight above the diagonal; the runtime broke causality")
        attention.append(np.ascontiguousarray(a[0, heads], dtype=np.float32))  # (len(heads), S, S)
    src = bundle.manifest.source
    prompt_text = tok.decode(result.prompt_token_ids)
    return AuditRecord(
        prompt=_tokens(tok, prompt_text, result.prompt_token_ids),
        output=_tokens(tok, result.text, result.token_ids),
        finish_reason=result.finish_reason,
        sampling={"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                  "repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed,
                  "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens), "stop": list(stop),
                  "stop_token_ids": [int(i) for i in stop_token_ids]},
        model={"bundle_manifest_sha256": bundle.manifest_sha256, "bundle": str(Path(bundle.path).resolve()),
               "source": {k: src.get(k) for k in ("kind", "name", "format", "sha256") if k in src},
               "config": c.to_dict(), "graph": rt.graph.name, "precision": rt.graph.precision,
               "created": bundle.manifest.created},
        runtime={"backend": rt.name, "versions": _versions(rt.name)},
        time=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        layers=layers, heads=heads, dtype=options.dtype, attention=attention,
        batch={"size": batch[0], "row": batch[1]}, timings=result.timings.to_dict(),
    )


def _select(chosen: Sequence[int] | None, n: int, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    picked = sorted({int(i) for i in chosen})
    bad = [i for i in picked if not 0 <= i < n]
    if not picked or bad:
        raise AuditError(f"audit {what}s must be a non-empty subset of 0..{n - 1}, got {list(chosen)}")
    return picked


def append_records(log_path: str | os.PathLike, records: Sequence[AuditRecord]) -> list[AuditRecord]:
    """Append records to the log (created if missing); they get their index and sha256."""
    frames = append_frames(log_path, [(r.header(), encode_payload(r)) for r in records])
    for r, f in zip(records, frames):
        r.index, r.sha256 = f.header["index"], f.stored_sha
    return list(records)


def append_generation(log_path: str | os.PathLike, generator, result, *, sampling=None,
                      max_new_tokens: int | None = None, stop: Sequence[str] = (),
                      stop_token_ids: Sequence[int] = (), options: AuditOptions = AuditOptions()) -> list[AuditRecord]:
    """Append one record per result (a GenerationResult or a batch's list of them) to the log;
    the request's max_new_tokens and stop rules are not on the result, so pass them."""
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    recs = [build_record(generator, r, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop,
                         stop_token_ids=stop_token_ids, options=options, batch=(len(results), b))
            for b, r in enumerate(results)]
    return append_records(log_path, recs)


# -------------------------------------------------------------------------------- reading


def record_from(path: Path, frame: Frame) -> AuditRecord:
    """Decode one intact frame."""
    if not frame.intact:
        raise AuditError(f"record at position {frame.position} of {path} is damaged or altered; "
                         "`gptdeploy audit verify` says how")
    h = frame.header
    try:
        att = h["attention"]
        rec = AuditRecord(
            prompt=Tokens(**h["prompt"]), output=Tokens(**h["output"]), finish_reason=h["finish_reason"],
            sampling=h["sampling"], model=h["model"], runtime=h["runtime"], time=h["time"],
            layers=[int(x) for x in att["layers"]], heads=[int(x) for x in att["heads"]], dtype=att["dtype"],
            attention=[], batch=h.get("batch", {}), timings=h.get("timings", {}),
            index=h["index"], sha256=frame.stored_sha,
        )
        if att["dtype"] not in DTYPES or rec.positions != att["positions"] or rec.positions < 1:
            raise AuditError(f"record {frame.position}: attention header does not fit its tokens")
        rec.attention = decode_payload(read_payload(path, frame), h)
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"record at position {frame.position} of {path} is malformed: {exc!r}") from None
    return rec


def read_records(path: str | os.PathLike, positions: Sequence[int] | None = None,
                 report: VerifyReport | None = None) -> Iterator[AuditRecord]:
    """Intact records in file order (or those at `positions`, which must be intact), one at a time."""
    report = report or verify(path)
    frames = report.scan.frames
    if positions is None:
        chosen = [f for f in frames if f.intact]
    else:
        bad = [p for p in positions if not 0 <= p < len(frames)]
        if bad:
            raise AuditError(f"{report.path} has records 0..{len(frames) - 1}; there is no record {bad[0]}")
        chosen = [frames[p] for p in positions]
    for f in chosen:
        yield record_from(report.path, f)

