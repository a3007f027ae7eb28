"""`gptdeploy bench --plot`: decode tokens/s and TTFT against prompt length, and decode tokens/s
against batch and threads, one series per row label (bundle x backend, or baseline)."""

from __future__ import annotations

from pathlib import Path

from gptdeploy.bench.plan import Row
from gptdeploy.errors import GptDeployError


def _series(rows: list[Row], x: str, fixed: dict[str, int], extra: str | None = None) -> dict[str, list[Row]]:
    """Rows without error whose `fixed` fields match, by label (and `extra` field), sorted along `x`."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if not r.error and r.decode_tps and all(getattr(r, k) == v for k, v in fixed.items()):
            key = r.label + (f" ({extra} {getattr(r, extra)})" if extra else "")
            out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: getattr(r, x)) for k, v in out.items()}


def _line(ax, series: dict[str, list[Row]], x: str, y) -> None:
    for label, rs in series.items():
        ax.plot([getattr(r, x) for r in rs], [y(r) for r in rs], marker="o", label=label)
    ax.set_xticks(sorted({getattr(r, x) for rs in series.values() for r in rs}))  # the measured values only


def _tps(r: Row) -> float:
    return r.decode_tps["median"]


def _ttft_ms(r: Row) -> float:
    return r.ttft_s["median"] * 1e3


def plot_rows(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptDeployError("--plot needs matplotlib: pip install 'gptdeploy[audit]'") from None
    ok = [r for r in rows if not r.error and r.decode_tps]
    if not ok:
        raise GptDeployError(f"nothing to plot: no row was measured without error ({len(rows)} rows)")
    top, batch, prompt = max(r.threads for r in ok), min(r.batch for r in ok), min(r.prompt_len for r in ok)
    panels = []  # (x, series, y, title, x label, y label); panels only where the plan varied x
    one_length = len({r.prompt_len for r in ok}) == 1
    if not one_length or (len({r.batch for r in ok}) == 1 and len({r.threads for r in ok}) == 1):
        by_length = _series(ok, "prompt_len", {"threads": top}, extra="batch")
        panels += [
            ("prompt_len", by_length, _tps,
             f"Decode throughput, {top} threads", "prompt length (tokens)", "decode tokens/s (median)"),
            ("prompt_len", by_length, _ttft_ms,
             f"Prefill latency, {top} threads", "prompt length (tokens)", "time to first token (ms, median)"),
        ]
    if len({r.batch for r in ok}) > 1:
        panels.append(("batch", _series(ok, "batch", {"threads": top, "prompt_len": prompt}), _tps,
                       f"Batch scaling, {top} threads, prompt {prompt}", "batch (sequences)",
                       "decode tokens/s, all sequences (median)"))
    if len({r.threads for r in ok}) > 1:
        panels.append(("threads", _series(ok, "threads", {"batch": batch, "prompt_len": prompt}), _tps,
                       f"Thread scaling, batch {batch}, prompt {prompt}", "threads", "decode tokens/s (median)"))
    n_rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(12, 4.5 * n_rows), squeeze=False)
    for ax, (x, series, y, title, xlabel, ylabel) in zip(axes.flat, panels):
        _line(ax, series, x, y)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise GptDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
