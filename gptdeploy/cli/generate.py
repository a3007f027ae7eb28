"""`gptdeploy generate`: text from a bundle. Registered on the group in gptdeploy/cli/main.py.

Library errors (GptDeployError) propagate to the group, which prints one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from gptdeploy.errors import GenerationError


def read_prompt(prompt: str) -> str:
    """PROMPT itself, or stdin for "-" (UTF-8; one trailing newline dropped, as `echo` adds it)."""
    if prompt != "-":
        return prompt
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        raise GenerationError("PROMPT is '-' but there is no stdin to read it from")
    data = stdin.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GenerationError(
            f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); pipe UTF-8 text"
        ) from None
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def sampling_options(command):
    """The sampling options every generating command takes (generate, chat, serve)."""
    for decorator in reversed((
        click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate at most."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sample."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass in (0, 1] (1: off)."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="> 1 discourages repeats."),
        click.option("--seed", type=int, help="Seed for sampling (same seed, same text)."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
    )):
        command = decorator(command)
    return command


def runtime_options(command):
    """Where and how the bundle runs."""
    for decorator in reversed((
        click.option("--backend", default="auto", show_default=True, help="auto, ort, ort-cuda, tensorrt, torch or torch-cuda."),
        click.option("--graph", help="Graph of the bundle to run (default: its only one)."),
        click.option("--threads", type=int, help="CPU threads (default: physical cores)."),
        click.option("--no-verify-hashes", is_flag=True, help="Skip the SHA-256 check of bundle files (large bundles)."),
    )):
        command = decorator(command)
    return command


def chat_options(command):
    """The chat template options (generate --chat, chat)."""
    for decorator in reversed((
        click.option("--system", help="System message before the user's (kept when old turns are dropped)."),
        click.option("--chat-template", "template_file", type=click.Path(path_type=Path), metavar="FILE",
                     help="Jinja chat template file to use instead of the bundle's (for models that shipped none)."),
    )):
        command = decorator(command)
    return command


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@sampling_options
@runtime_options
@click.option("--chat", is_flag=True, help="Render PROMPT as one user turn with the model's chat template.")
@chat_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids and timings as JSON.")
@click.option(
    "--audit", "audit_log", type=click.Path(path_type=Path),
    help="Append an audit record (prompt, output, sampling, model, attention of every layer and head) to this log.",
)
@click.option("--audit-float32", is_flag=True, help="Store audited attention as float32 (exact; ~2x the float16 size).")
def generate(bundle: Path, prompt: str, backend: str, graph: str | None, threads: int | None,
             no_verify_hashes: bool, chat: bool, system: str | None, template_file: Path | None, stream: bool,
             as_json: bool, audit_log: Path | None, audit_float32: bool, **sampling) -> None:
    """Generate text from BUNDLE for PROMPT ("-" reads the prompt from stdin)."""
    from gptdeploy.generate import Generator  # numpy + onnxruntime only, and only when generating

    if stream and as_json:
        raise click.BadParameter("--stream and --json cannot be combined", param_hint="--json")
    if not chat and (system is not None or template_file is not None):
        raise click.UsageError("--system and --chat-template are used with --chat")
    text = read_prompt(prompt)
    with Generator.load(bundle, backend=backend, graph=graph, threads=threads,
                        verify_hashes=not no_verify_hashes) as gen:
        options = dict(sampling, record_attention=audit_log is not None)
        if chat:
            from gptdeploy import chat as chats

            messages = chats.chat_messages(text, system)
            ids = chats.chat_prompt_ids(gen, messages, chats.ChatTemplate.from_bundle(gen.bundle, template_file))
            result = _run_ids(gen, ids, stream, options)
        else:
            result = _run(gen, text, stream, options)
        if audit_log is not None:
            from gptdeploy.audit.record import AuditOptions, append_generation

            append_generation(audit_log, gen, result, max_new_tokens=sampling["max_new_tokens"],
                              stop=sampling["stop"], options=AuditOptions(dtype="float32" if audit_float32 else "float16"))
        if as_json:
            click.echo(json.dumps(_as_dict(result, gen), ensure_ascii=False, indent=2))
            return
        if not stream:
            click.echo(result.text)
    click.echo(footer(result, gen.runtime.name), err=True)


def _run(gen, text: str, stream: bool, options: dict):
    """The result; with `stream`, its text is printed piece by piece on the way."""
    if not stream:
        return gen.generate(text, **options)
    with gen.stream(text, **options) as pieces:
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
        return pieces.result


def _run_ids(gen, ids: list[int], stream: bool, options: dict):
    """`_run` for a prompt given as token ids (a rendered chat)."""
    if not stream:
        return gen.generate_ids([ids], **options)[0]
    with gen.stream_ids(ids, **options) as pieces:
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
        return pieces.result


def _as_dict(result, gen) -> dict:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_token_ids": result.prompt_token_ids,
        "finish_reason": result.finish_reason,
        "timings": result.timings.to_dict(),
        "sampling": dataclasses.asdict(result.sampling),
        "backend": gen.runtime.name,
        "graph": gen.runtime.graph.name,
    }


def footer(result, backend: str) -> str:
    """One line on stderr: tokens, why it stopped, speed, backend (and the seed of a sampled text)."""
    t = result.timings
    seed = "" if result.sampling.greedy else f", seed {result.sampling.seed}"
    return (f"[{t.tokens} tokens, {result.finish_reason}; first token {t.time_to_first_token_s * 1e3:.0f} ms, "
            f"{t.decode_tokens_per_s:.1f} tokens/s; {backend}{seed}]")


__all__ = ["chat_options", "footer", "generate", "read_prompt", "runtime_options", "sampling_options"]
