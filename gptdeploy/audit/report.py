"""`audit report`: one self-contained HTML file (no network, inline CSS/JS, data inline as JSON).

Python writes what must be readable without JavaScript: the integrity result, each record's
provenance, prompt and output, and per generated token its top sources (mean of the stored
heads, and rollout) with exact weights. The page's script draws the heatmaps (per layer and
head, mean, rollout) with token labels and the interactive token-by-token view from an 8-bit
copy of the matrices (display only: +-0.002). Text enters the page only as escaped HTML or
through textContent, so a prompt holding markup stays text.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptdeploy.audit.page import PAGE
from gptdeploy.audit.record import AuditRecord, read_records
from gptdeploy.audit.verify import VerifyReport, verify
from gptdeploy.audit.views import head_matrix, rollout, rollout_is_partial, show_text, top_sources
from gptdeploy.errors import AuditError

TOP_K = 8


def _u8(mat: np.ndarray) -> str:
    """(S, S) probabilities -> base64 of the row-major lower triangle as uint8 (value * 255)."""
    i, j = np.tril_indices(mat.shape[-1])
    q = np.rint(np.clip(mat[i, j], 0.0, 1.0) * 255).astype(np.uint8)  # (S(S+1)/2,)
    return base64.b64encode(q.tobytes()).decode("ascii")


def record_data(rec: AuditRecord) -> dict:
    mean, roll = head_matrix(rec), rollout(rec)
    top = lambda m: [[[a.position, round(a.weight, 4)] for a in row] for row in top_sources(rec, m, TOP_K)]
    return {
        "index": rec.index, "positions": rec.positions, "n_prompt": len(rec.prompt.ids),
        "labels": rec.prompt.labels + rec.output.labels, "layers": rec.layers, "heads": rec.heads,
        "att": [[_u8(a[h]) for h in range(len(rec.heads))] for a in rec.attention],
        "mean": _u8(mean), "rollout": _u8(roll), "top_mean": top(mean), "top_rollout": top(roll),
    }


def build_report(report: VerifyReport, records: Sequence[AuditRecord]) -> str:
    data = {"log": str(report.path), "status": report.status, "records": [record_data(r) for r in records]}
    # "<" escaped so no string in the data can close the script element.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    body = _integrity(report) + "".join(_record_html(r, n == 0) for n, r in enumerate(records))
    if not records:
        body += "<p>No intact record to show.</p>"
    return (PAGE.replace("%TITLE%", html.escape(f"Audit report: {report.path.name}"))
            .replace("%BODY%", body).replace("%DATA%", payload))


def write_report(log_path: str | os.PathLike, out: str | os.PathLike,
                 positions: Sequence[int] | None = None) -> tuple[Path, VerifyReport, int]:
    """Verify the log, then write the report of its intact records (or those at `positions`)."""
    report = verify(log_path)
    records = list(read_records(log_path, positions, report))
    out = Path(out)
    try:
        out.write_text(build_report(report, records), encoding="utf-8")
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, report, len(records)


def _integrity(report: VerifyReport) -> str:
    cls = "ok" if report.ok else "bad"
    items = "".join(f"<li>{html.escape(f.message)}</li>" for f in report.findings)
    head = f"; head sha256 <code>{report.head}</code>" if report.head else ""
    return (f'<section class="integrity {cls}"><h1>{html.escape(str(report.path))}</h1>'
            f"<p>Integrity: <b>{report.status}</b> — {report.records} records, {report.intact} intact{head}</p>"
            f"<ul>{items}</ul></section>")


def _record_html(rec: AuditRecord, open_: bool) -> str:
    e = html.escape
    m, s, src = rec.model, rec.sampling, rec.model.get("source", {})
    facts = {
        "time (UTC)": rec.time, "record sha256": rec.sha256,
        "model": f"{src.get('kind', '?')} {src.get('name', '')}", "source sha256": src.get("sha256"),
        "bundle manifest sha256": m.get("bundle_manifest_sha256"), "graph": f"{m.get('graph')} ({m.get('precision')})",
        "backend": rec.runtime.get("backend"),
        "versions": ", ".join(f"{k} {v}" for k, v in rec.runtime.get("versions", {}).items()),
        "sampling": ", ".join(f"{k} {json.dumps(v, ensure_ascii=False)}" for k, v in s.items()),
        "finish": rec.finish_reason, "batch": f"row {rec.batch.get('row')} of {rec.batch.get('size')}",
        "stored": f"layers {rec.layers[0]}..{rec.layers[-1]} ({len(rec.layers)}), {len(rec.heads)} heads, "
                  f"{rec.dtype}, {rec.positions} positions",
    }
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in facts.items())
    mean, roll = top_sources(rec, head_matrix(rec), 3), top_sources(rec, rollout(rec), 3)
    fmt = lambda items: " · ".join(f"{show_text(a.label)}@{a.position} {a.weight:.3f}" for a in items)
    rows = "".join(
        f"<tr><td>{g}</td><td class='tok'>{e(show_text(rec.output.labels[g]))}</td>"
        f"<td>{e(fmt(a))}</td><td>{e(fmt(r))}</td></tr>" for g, (a, r) in enumerate(zip(mean, roll))
    )
    partial = " (partial: not every layer and head is stored)" if rollout_is_partial(rec) else ""
    return f"""
<details class="record" data-record="{rec.index}"{' open' if open_ else ''}>
<summary>Record {rec.index}: <span class="prompt">{e(_clip(rec.prompt.text))}</span> → <span class="out">{e(_clip(rec.output.text))}</span></summary>
<dl>{dl}</dl>
<h3>Prompt</h3><p class="text">{e(rec.prompt.text)}</p>
<h3>Output</h3><p class="text">{e(rec.output.text)}</p>
<div class="interactive"></div>
<h3>Top sources of each generated token</h3>
<p class="note">Row of the position that produced the token; mean over stored layers and heads, and attention
rollout (Abnar &amp; Zuidema 2020){partial}. Weights are exact ({e(rec.dtype)} as stored).</p>
<table class="tops"><thead><tr><th>#</th><th>token</th><th>mean attention</th><th>rollout</th></tr></thead>
<tbody>{rows}</tbody></table>
</details>"""


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
