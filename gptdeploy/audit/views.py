"""Reading attention out of audit records: top-k sources per generated token, attention
rollout, the terminal summary, PNG heatmaps, and exports for bertviz and TransformerLens.

Convention: generated token k was produced by the output of position `record.query_for(k)`
(the position before it), so "what token k attended to" is that row of the matrix.
Shapes: S positions, nh stored heads.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptdeploy.audit.record import AuditRecord
from gptdeploy.errors import AuditError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("bertviz", "transformerlens")


def head_matrix(rec: AuditRecord, layer: int | None = None, head: int | None = None) -> np.ndarray:
    """(S, S): one layer/head, or the mean over stored layers and/or heads (None = mean)."""
    if layer is not None and layer not in rec.layers:
        raise AuditError(f"layer {layer} is not in this record; it stores layers {_span(rec.layers)}")
    if head is not None and head not in rec.heads:
        raise AuditError(f"head {head} is not in this record; it stores heads {_span(rec.heads)}")
    stack = np.stack(rec.attention) if layer is None else rec.attention[rec.layers.index(layer)][None]
    per_layer = stack.mean(1) if head is None else stack[:, rec.heads.index(head)]  # (L', S, S)
    return per_layer.mean(0)


def rollout(rec: AuditRecord) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, eq. 1): per layer the head-mean A, the residual
    as 0.5 A + 0.5 I, rows renormalised, multiplied from the first layer up. (S, S), rows sum to 1."""
    S = rec.positions
    out = np.eye(S)
    for att in rec.attention:  # stored layers, ascending
        a = 0.5 * att.mean(0).astype(np.float64) + 0.5 * np.eye(S)  # (S, S)
        a /= a.sum(-1, keepdims=True)
        out = a @ out
    return out


def rollout_is_partial(rec: AuditRecord) -> bool:
    """Rollout needs every layer and head; over a subset it is only an approximation."""
    n_layer, n_head = rec.model.get("config", {}).get("n_layer"), rec.model.get("config", {}).get("n_head")
    return rec.layers != list(range(n_layer or 0)) or rec.heads != list(range(n_head or 0))


@dataclass(frozen=True)
class Attended:
    position: int
    label: str
    weight: float


def top_sources(rec: AuditRecord, matrix: np.ndarray, k: int) -> list[list[Attended]]:
    """For each generated token, the k positions its producing row weights most."""
    labels = rec.labels
    out = []
    for g in range(len(rec.output.ids)):
        row = matrix[rec.query_for(g)]  # (S,)
        order = np.argsort(-row, kind="stable")[:k]
        out.append([Attended(int(p), labels[p], float(row[p])) for p in order if row[p] > 0])
    return out


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}


def show_text(label: str) -> str:
    """A token label on one line: newlines, tabs and other control characters escaped."""
    return label.translate(_CONTROL)


def _span(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def describe_selection(rec: AuditRecord, layer: int | None, head: int | None) -> str:
    lay = f"layer {layer}" if layer is not None else f"mean of layers {_span(rec.layers)}"
    hd = f"head {head}" if head is not None else f"mean of heads {_span(rec.heads)}"
    return f"{lay}, {hd}"


def render_show(rec: AuditRecord, layer: int | None, head: int | None, k: int) -> list:
    """Rich renderables for one record: provenance, prompt, output, and per generated token its
    top-k sources for the selection and under attention rollout."""
    from rich.table import Table
    from rich.text import Text

    m, s = rec.model, rec.sampling
    src = m.get("source", {})
    title = Text.assemble((f"record {rec.index}", "bold"), f"  {rec.time}  sha256 {str(rec.sha256)[:16]}…")
    facts = Text(
        f"model {src.get('kind', '?')} {src.get('name', '')} (source sha256 {str(src.get('sha256', '?'))[:12]}…, "
        f"bundle manifest {str(m.get('bundle_manifest_sha256'))[:12]}…, graph {m.get('graph')}); "
        f"backend {rec.runtime.get('backend')}; temperature {s.get('temperature')}, top_k {s.get('top_k')}, "
        f"top_p {s.get('top_p')}, seed {s.get('seed')}; {rec.finish_reason}; stored {rec.dtype}",
        style="dim",
    )
    prompt = Text.assemble(("prompt  ", "bold"), rec.prompt.text)
    output = Text.assemble(("output  ", "bold"), rec.output.text)
    table = Table(title=f"attended most ({describe_selection(rec, layer, head)}) and under rollout"
                  + (" (partial: not every layer/head stored)" if rollout_is_partial(rec) else ""),
                  title_justify="left", show_lines=False)
    for col in ("#", "token", "attended most", "rollout"):
        table.add_column(col, overflow="fold")
    sel, roll = top_sources(rec, head_matrix(rec, layer, head), k), top_sources(rec, rollout(rec), k)
    for g, (a, r) in enumerate(zip(sel, roll)):
        table.add_row(str(g), Text(show_text(rec.output.labels[g])), Text(_sources(a)), Text(_sources(r)))
    return [title, facts, prompt, output, table]


def _sources(items: list[Attended]) -> str:
    return "  ".join(f"{show_text(a.label)}@{a.position} {a.weight:.2f}" for a in items)


# ------------------------------------------------------------------------------- exports


def export_record(rec: AuditRecord, fmt: str, out: str | os.PathLike) -> Path:
    """Write one record's attention as npz for bertviz or TransformerLens (float32, full [S, S])."""
    if fmt not in EXPORT_FORMATS:
        raise AuditError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    arrays = {
        "tokens": np.array(rec.labels, dtype=str),  # (S,) readable labels, axis order of the matrices
        "token_ids": np.array(rec.prompt.ids + rec.output.ids[:-1], dtype=np.int64),  # (S,)
        "layers": np.array(rec.layers, dtype=np.int64),
        "heads": np.array(rec.heads, dtype=np.int64),
    }
    for layer, att in zip(rec.layers, rec.attention):
        # bertviz: a list of per-layer (batch, heads, query, key); TransformerLens' ActivationCache
        # names the same probabilities blocks.{l}.attn.hook_pattern [batch, head_index, query_pos, key_pos].
        key = f"attention_{layer}" if fmt == "bertviz" else f"blocks.{layer}.attn.hook_pattern"
        arrays[key] = att[None].astype(np.float32)  # (1, nh, S, S)
    out = Path(out)
    try:
        with open(out, "wb") as f:
            np.savez(f, **arrays)
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


# ---------------------------------------------------------------------------------- PNGs

_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
              "WenQuanYi Micro Hei", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "SimHei")
LABELLED_MAX = 64  # more positions than this: heatmaps without tick labels (they would overlap)


def write_pngs(rec: AuditRecord, out_dir: str | os.PathLike, layer: int | None = None,
               head: int | None = None) -> list[Path]:
    """Heatmaps of one record: one PNG per stored layer (a panel per head) and the rollout, or with
    layer and head given, that one head alone. Needs matplotlib (pip install 'gptdeploy[audit]')."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"record{rec.index if rec.index is not None else 0}"
    jobs: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    if layer is not None or head is not None:
        jobs.append((f"{stem}_{_sel_name(layer, head)}.png",
                     [(describe_selection(rec, layer, head), head_matrix(rec, layer, head))]))
    else:
        for lay, att in zip(rec.layers, rec.attention):
            jobs.append((f"{stem}_layer{lay}.png", [(f"layer {lay} head {h}", att[i]) for i, h in enumerate(rec.heads)]))
        jobs.append((f"{stem}_rollout.png", [("attention rollout (Abnar & Zuidema 2020)", rollout(rec))]))
    written = []
    for name, panels in jobs:
        path = out_dir / name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing")  # no CJK font: boxes, said once
            fig = _figure(plt, panels, rec.labels)
            try:
                fig.savefig(path, dpi=110)
            except OSError as exc:
                raise AuditError(f"cannot write {path}: {exc.strerror or exc}") from None
            finally:
                plt.close(fig)
        written.append(path)
    return written


def _sel_name(layer: int | None, head: int | None) -> str:
    return f"layer{'mean' if layer is None else layer}_head{'mean' if head is None else head}"


@functools.lru_cache(maxsize=1)
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AuditError("PNG heatmaps need matplotlib, which is not installed; "
                         "pip install 'gptdeploy[audit]' (or use `gptdeploy audit report` for HTML)") from None
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    have = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in _CJK_FONTS if name in have]
    if not cjk:
        log.warning("no CJK font found for matplotlib: CJK token labels will show as boxes "
                    "(install e.g. fonts-noto-cjk); the HTML report uses the browser's fonts")
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    return plt


def _figure(plt, panels: list[tuple[str, np.ndarray]], labels: list[str]):
    n = len(panels)
    cols = min(n, 4)
    rows = -(-n // cols)
    S = len(labels)
    size = 3.2 if n > 1 else max(5.0, min(14.0, 0.22 * S + 2))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    ticks = S <= (LABELLED_MAX if n == 1 else 24)
    shown = [show_text(t) for t in labels]
    for ax, (title, mat) in zip(axes.flat, panels):
        ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        if ticks:
            ax.set_xticks(range(S), shown, rotation=90, fontsize=7)
            ax.set_yticks(range(S), shown, fontsize=7)
        else:
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig
