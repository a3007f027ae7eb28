"""`gptdeploy bench`: options in, one library call, a table / JSON / PNG out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gptdeploy.bench.plan import BenchPlan, Row


def _ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backends", default="", help="Comma-separated: ort, torch, ort-cuda, tensorrt; ort@int8 names a graph. For every bundle. Default: every one available, per bundle.")
@click.option("--batch", "batches", default="1", callback=_ints, help="Batch sizes, comma-separated (decode tok/s is the batch's aggregate).")
@click.option("--prompt-len", "prompt_lens", default="32", callback=_ints, help="Prompt lengths, comma-separated.")
@click.option("--new-tokens", default=128, show_default=True, help="Tokens generated per run (no early stop).")
@click.option("--runs", default=3, show_default=True, help="Timed runs per row (median and spread).")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs first.")
@click.option("--threads", default="", callback=_ints, help="Thread counts, comma-separated (1,2: every row at each). Default: physical cores.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["hf", "optimum", "llama.cpp"]), help="Baseline rows: transformers' generate (hf), Optimum's ORTModelForCausalLM, llama.cpp (one row per --gguf).")
@click.option("--source", type=click.Path(path_type=Path), help="The model the bundles were exported from (for hf / optimum).")
@click.option("--optimum-python", type=click.Path(dir_okay=False), help="Python with optimum[onnxruntime] installed, for --baseline optimum (Optimum pins transformers < 4.58; keep it in its own venv).")
@click.option("--gguf", multiple=True, type=click.Path(path_type=Path), help="A GGUF of the same model for --baseline llama.cpp; repeat for each precision (f32, q8_0, q4_0).")
@click.option("--llama-python", type=click.Path(dir_okay=False), help="Python with llama-cpp-python and numpy (gptdeploy not needed), for --baseline llama.cpp. Default: this one.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and the machine facts as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG: decode tok/s and TTFT against prompt length, batch and threads.")
def bench(bundles, backends, batches, prompt_lens, new_tokens, runs, warmup, threads, baselines, source,
          optimum_python, gguf, llama_python, as_json, plot):
    """Time each BUNDLE on every backend (and optional baselines) with the same inputs, side by side."""
    from rich.console import Console
    from rich.progress import Progress

    from gptdeploy.bench import plan as lib
    from gptdeploy.machine import physical_cores

    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    plan = BenchPlan(tuple(bundles), names, batches, prompt_lens, new_tokens, runs, warmup,
                     threads or (physical_cores(),), tuple(baselines), source, optimum_python=optimum_python,
                     gguf=tuple(gguf), llama_python=llama_python)
    loaded = lib.check_plan(plan)
    err = Console(stderr=True)
    rows: list[Row] = []
    total = len(plan.threads) * len(batches) * len(prompt_lens) * len(lib.targets(plan, loaded))
    complete = True
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("benchmarking", total=total)

            def on_row(row: Row) -> None:
                rows.append(row)
                progress.update(task, advance=1,
                                description=f"done: {row.label} t{row.threads} b{row.batch} p{row.prompt_len}")

            lib.run_plan(plan, on_row, loaded)
    except KeyboardInterrupt:
        complete = False
        lib.add_ratios(rows)
        err.print(f"[yellow]interrupted: showing the {len(rows)} of {total} rows measured so far[/]")
    if as_json:
        click.echo(json.dumps(lib.to_json(plan, rows, complete), indent=2))
    else:
        _table(rows, plan)
    if plot:
        from gptdeploy.bench.plot import plot_rows

        plot_rows(rows, plot)
        err.print(f"wrote {plot}")


def _fmt(d: dict, key: str = "median", scale: float = 1.0, digits: int = 1) -> str:
    return f"{d[key] * scale:.{digits}f}" if d else "-"


def _vs(ratio: dict) -> str:
    return f"{ratio['decode_tps']:.2f}x, {ratio['ttft']:.2f}x" if ratio else ""


def _table(rows: list[Row], plan: BenchPlan) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptdeploy.bench.plan import machine_facts

    facts = machine_facts(plan.threads)
    flags = " ".join(facts["cpu_flags"]) or "unknown"
    table = Table(title=f"{facts['cpu']} (kernel flags: {flags}) · threads {','.join(map(str, plan.threads))} · "
                        f"{plan.new_tokens} new tokens · median of {plan.runs} runs")
    same = any(r.same_precision for r in rows)
    cols = ["row (bundle or file)", "precision", "threads", "batch", "prompt", "TTFT ms", "decode tok/s",
            "token p50/p90/p99 ms", "e2e tok/s", "peak RSS MB (x model)", "vs first baseline (tok/s, TTFT)"]
    for col in cols + (["vs llama.cpp, same precision"] if same else []):
        table.add_column(col, justify="left" if col.startswith("row") else "right")
    for r in rows:
        head = [r.label, r.precision or "", str(r.threads), str(r.batch), str(r.prompt_len)]
        if r.error:
            table.add_row(*head, "", f"[red]{r.error}[/]", *[""] * (len(cols) - 7 + same))
            continue
        lat = r.token_latency_ms
        spread = f" ±{r.decode_tps['stdev']:.1f}" if r.decode_tps.get("n", 0) > 1 else ""
        table.add_row(
            *head, _fmt(r.ttft_s, scale=1e3), _fmt(r.decode_tps) + spread,
            f"{lat['p50']:.1f}/{lat['p90']:.1f}/{lat['p99']:.1f}" if lat else "-",
            _fmt(r.e2e_tps),
            f"{r.peak_rss_mb:.0f} ({r.peak_rss_mb / r.model_mb:.2f}x)" if r.model_mb else f"{r.peak_rss_mb:.0f}",
            _vs(r.ratio), *([_vs(r.same_precision)] if same else []),
        )
    # Piped into a log or CI dashboard: don't fold the table into 80 columns.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
