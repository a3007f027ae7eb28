"""`gptdeploy bench --plot`: decode tokens/s and TTFT against prompt length, one series per backend."""

from __future__ import annotations

from pathlib import Path

from gptdeploy.bench.plan import Row
from gptdeploy.errors import GptDeployError


def plot_rows(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptDeployError("--plot needs matplotlib: pip install 'gptdeploy[audit]'") from None
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[Row]] = {}
    for r in rows:
        if not r.error:
            series.setdefault(f"{r.label} (batch {r.batch})", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.prompt_len)
        x = [r.prompt_len for r in rs]
        ax_tps.plot(x, [r.decode_tps["median"] for r in rs], marker="o", label=label)
        ax_ttft.plot(x, [r.ttft_s["median"] * 1e3 for r in rs], marker="o", label=label)
    ax_tps.set(xlabel="prompt length (tokens)", ylabel="decode tokens/s (median)", title="Decode throughput")
    ax_ttft.set(xlabel="prompt length (tokens)", ylabel="time to first token (ms, median)", title="Prefill latency")
    for ax in (ax_tps, ax_ttft):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise GptDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
