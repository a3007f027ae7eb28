"""`gptdeploy export` and `gptdeploy verify`: a bundle made, and a bundle checked again."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to create.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (or a dir with vocab.json + merges.txt) for sources without one.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--fp16", is_flag=True, help="fp16 graph for GPUs / TensorRT (LayerNorm, softmax and logits stay fp32).")
@click.option("--int8", is_flag=True, help="int8 graph for CPUs (dynamic quantization of the linear layers).")
@click.option("--int4", is_flag=True, help="int4 graph for CPUs, smallest (block-wise MatMulNBits).")
@click.option("--no-attentions", is_flag=True, help="Leave attention outputs out (no audit); fastest.")
@click.option("--portable", is_flag=True, help="fp32: standard ONNX ops only, for TensorRT, onnxruntime's CUDA provider and other runtimes (the default graph is fused for onnxruntime on CPUs).")
@click.option("--all-logits", is_flag=True, help="Return logits for every position, not only the last (for scoring text).")
@click.option("--eval-text", type=click.Path(path_type=Path), help="Held-out UTF-8 text for the --int8/--int4 perplexity check (default: the sample corpus's validation split).")
@click.option("--external-data", is_flag=True, help="Store weights in model.onnx.data even under 32 MiB (the default from there up).")
@click.option("--kv-cache", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="int8: keep the KV cache in int8 (with --int8 / --int4; checked by their perplexity and margin bounds).")
def export(
    source: Path, out: Path, tokenizer: Path | None, force: bool, fp16: bool, int8: bool, int4: bool,
    no_attentions: bool, portable: bool, all_logits: bool, eval_text: Path | None, external_data: bool, kv_cache: str,
) -> None:
    """Export SOURCE (HF GPT-2 directory, nanoGPT ckpt.pt, or the gptdeploy sample) to a bundle."""
    from rich.console import Console

    from gptdeploy.exporters.export import export_bundle  # torch only when exporting

    chosen = [name for name, flag in (("fp16", fp16), ("int8", int8), ("int4", int4)) if flag]
    if len(chosen) > 1:
        raise click.UsageError(f"--{' and --'.join(chosen)} are mutually exclusive; choose one precision")
    if eval_text is not None and not (int8 or int4):
        raise click.UsageError("--eval-text is used by --int8 and --int4 only")
    console = Console(stderr=True)
    with console.status("exporting") as status:
        result = export_bundle(
            source, out, tokenizer=tokenizer, force=force, precision=chosen[0] if chosen else "fp32",
            attentions=not no_attentions, last_logits_only=not all_logits, eval_text=eval_text,
            external_data=external_data or None, kv_cache=kv_cache, portable=portable, on_stage=lambda s: status.update(s),
        )
    graph = result.bundle.graph()
    p = result.parity
    if graph.precision in ("int8", "int4"):
        size = result.bundle.manifest.parity[graph.name]["graph"]["size"]["ratio"]
        evidence = f"{size:.2f}x the fp32 graph's size; vs the fp32 graph: {p.describe()}"
    else:
        evidence = (f"parity vs {p.reference}: max |logit diff| {p.worst('logits'):.1e}, "
                    f"greedy tokens agree {p.greedy_agree}/{p.greedy_steps}")
    click.echo(f"wrote {result.bundle.path} ({graph.name} graph; {evidence})")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), help="Source to compare with (default: the one recorded at export).")
@click.option("--integrity-only", is_flag=True, help="Check hashes and graph IO only; do not re-run parity.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify(bundle: Path, source: Path | None, integrity_only: bool, as_json: bool) -> None:
    """Check BUNDLE's files and re-run parity against its source framework."""
    from gptdeploy.exporters.verify import verify_bundle

    result = verify_bundle(bundle, source=source, integrity_only=integrity_only)
    if as_json:
        click.echo(json.dumps({
            "bundle": str(result.bundle.path), "passed": result.passed, "io_problems": result.io_problems,
            "tensorrt_parser_check": result.tensorrt,
            "parity": {k: r.to_dict() for k, r in result.parity.items()},
        }, indent=2))
    else:
        _print_verify(result)
    if not result.passed:
        problems = result.io_problems + [f"{k}: {r.describe_failures()}" for k, r in result.parity.items() if not r.passed]
        raise click.ClickException("verification failed: " + "; ".join(problems))


def _print_verify(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptdeploy.exporters.tensorrt.operators import TRT_VERSION

    console = Console()
    m = result.bundle.manifest
    console.print(f"bundle {result.bundle.path}: {len(m.files)} files, SHA-256 ok; graph IO "
                  + ("ok" if not result.io_problems else "; ".join(result.io_problems)))
    for name, found in result.tensorrt.items():
        verdict = ("not checked: a CPU graph for onnxruntime (quantized or fused), never a TensorRT input" if found is None
                   else "ok, every op and type is in the operator table" if not found
                   else f"{len(found)} problem(s), listed above")
        console.print(f"{name} graph, TensorRT {TRT_VERSION} parser check: {verdict}")
    for name, report in result.parity.items():
        table = Table(title=f"{name} graph vs {report.reference} (source {result.source})")
        for col in ("output", "max |diff|", "tolerance", "ok"):
            table.add_column(col)
        for kind, s in report.summary().items():
            ok = s["max_abs_diff"] <= s["tolerance"]
            table.add_row(kind, f"{s['max_abs_diff']:.2e}", f"{s['tolerance']:.0e}", "yes" if ok else "NO")
        table.add_row("greedy tokens", f"{report.greedy_agree}/{report.greedy_steps} agree", "all", 
                      "yes" if report.greedy_ok else "NO")
        console.print(table)
    if not result.parity:
        console.print("parity not re-run (--integrity-only); recorded at export: "
                      + ", ".join(f"{k}: {'passed' if v.get('passed') else 'FAILED'}" for k, v in m.parity.items()))
