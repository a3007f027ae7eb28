"""`gptdeploy audit ...`: show, verify, report, export. Registered on the group in gptdeploy/cli/main.py.

Exit codes: 0 ok; 1 `verify` found the log altered, reordered, incomplete or truncated (the
findings are printed); 2 the input cannot be used at all (missing file, not an audit log,
a newer format, bad option), via AuditError and the group's one error mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EXIT_INTEGRITY = 1

_LOG = click.argument("log", type=click.Path(path_type=Path))


@click.group()
def audit() -> None:
    """Inspect, check and export audit logs written by `gptdeploy generate --audit FILE`."""


@audit.command()
@_LOG
@click.option("--record", "records", type=click.IntRange(min=0), multiple=True, help="Record to show (from 0; repeatable). Default: all.")
@click.option("--layer", type=click.IntRange(min=0), help="Layer to read. Default: mean of the stored layers.")
@click.option("--head", type=click.IntRange(min=0), help="Head to read. Default: mean of the stored heads.")
@click.option("--top-k", type=click.IntRange(1, 64), default=3, show_default=True, help="Sources listed per generated token.")
def show(log: Path, records: tuple[int, ...], layer: int | None, head: int | None, top_k: int) -> None:
    """Per record: prompt, output, and for each generated token the positions it attended to most
    (for --layer/--head, or averaged) and under attention rollout."""
    from rich.console import Console

    from gptdeploy.audit.record import read_records
    from gptdeploy.audit.verify import verify
    from gptdeploy.audit.views import render_show

    report = verify(log)
    console = Console()
    _warn(report)
    shown = 0
    for rec in read_records(log, list(records) or None, report):
        for part in render_show(rec, layer, head, top_k):
            console.print(part)
        console.print()
        shown += 1
    if not shown:
        click.echo("no intact records to show", err=True)


@audit.command()
@_LOG
@click.option("--expect-head", metavar="SHA256", help="The head hash an earlier verify printed, kept elsewhere: also detects removed last records.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, log: Path, expect_head: str | None, as_json: bool) -> None:
    """Check LOG's hash chain: exit 0 if intact, 1 naming each altered, removed, inserted or
    reordered record and a truncated tail, 2 if LOG is not a readable audit log."""
    from gptdeploy.audit.verify import verify as verify_log

    report = verify_log(log, expect_head=expect_head)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(report.summary())
        for f in report.findings:
            where = f"record {f.position}" if f.position is not None else "log"
            click.echo(f"  {f.kind:<10} {where}: {f.message}")
    if not report.ok:
        ctx.exit(EXIT_INTEGRITY)


@audit.command()
@_LOG
@click.option("-o", "--out", type=click.Path(path_type=Path), help="HTML file to write (one self-contained page).")
@click.option("--png", "png_dir", type=click.Path(path_type=Path), help="Also write PNG heatmaps here (needs matplotlib).")
@click.option("--record", "records", type=click.IntRange(min=0), multiple=True, help="Record to include (from 0; repeatable). Default: all intact.")
@click.option("--layer", type=click.IntRange(min=0), help="With --png: only this layer (with --head: one labelled heatmap).")
@click.option("--head", type=click.IntRange(min=0), help="With --png: only this head.")
def report(log: Path, out: Path | None, png_dir: Path | None, records: tuple[int, ...], layer: int | None,
           head: int | None) -> None:
    """Write an HTML report (heatmaps per layer and head, token-by-token view, rollout) and/or PNGs."""
    from gptdeploy.audit.record import read_records
    from gptdeploy.audit.report import write_report
    from gptdeploy.audit.verify import verify
    from gptdeploy.audit.views import write_pngs

    if out is None and png_dir is None:
        raise click.UsageError("give -o REPORT.html, --png DIR, or both")
    chosen = list(records) or None
    if out is not None:
        path, rep, n = write_report(log, out, chosen)
        _warn(rep)
        click.echo(f"wrote {path} ({n} records; integrity {rep.status})")
    if png_dir is not None:
        rep = verify(log)
        if out is None:
            _warn(rep)
        written = [p for rec in read_records(log, chosen, rep) for p in write_pngs(rec, png_dir, layer, head)]
        click.echo(f"wrote {len(written)} PNG files to {png_dir}")


@audit.command(name="export")
@_LOG
@click.option("--record", type=click.IntRange(min=0), required=True, help="Record to export (from 0).")
@click.option("--format", "fmt", type=click.Choice(["bertviz", "transformerlens"]), required=True,
              help="bertviz: attention_{l} (1, heads, T, T); transformerlens: blocks.{l}.attn.hook_pattern.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="npz file to write.")
def export_(log: Path, record: int, fmt: str, out: Path) -> None:
    """Export one record's attention (float32, full T x T, plus token labels) for other viewers."""
    from gptdeploy.audit.record import read_records
    from gptdeploy.audit.views import export_record

    rec = next(read_records(log, [record]))
    path = export_record(rec, fmt, out)
    click.echo(f"wrote {path} ({fmt}: {len(rec.layers)} layers x {len(rec.heads)} heads x {rec.positions}^2)")


def _warn(report) -> None:
    if not report.ok:
        click.echo(f"warning: {report.summary()}; {len(report.findings)} problems "
                   "(`gptdeploy audit verify` lists them); only intact records are used", err=True)


__all__ = ["audit"]
