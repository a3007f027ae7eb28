"""`gptdeploy chat`: a conversation with a bundle's model, one message per line. Registered on the
group in gptdeploy/cli/main.py; library errors propagate to it (one line, exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gptdeploy.cli.generate import chat_options, runtime_options, sampling_options
from gptdeploy.errors import GenerationError

COMMANDS = {"/reset": "clear the history", "/exit": "quit"}


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@chat_options
@sampling_options
@runtime_options
def chat(bundle: Path, system: str | None, template_file: Path | None, backend: str, graph: str | None,
         threads: int | None, no_verify_hashes: bool, **sampling) -> None:
    """Chat with BUNDLE's model: each line you type is a message, the reply streams back.

    The history is kept within the model's context: the oldest turns are dropped (never the
    system message) when it would not fit, and stderr says so. /reset clears the history;
    /exit or the end of input quits. A message the model cannot take (too long to fit even
    alone, characters its vocabulary lacks, ...) is refused with an `error:` line on stderr,
    and the chat goes on.
    """
    from gptdeploy.chat import ChatTemplate
    from gptdeploy.conversation import Conversation
    from gptdeploy.generate import Generator  # numpy + onnxruntime only

    with Generator.load(bundle, backend=backend, graph=graph, threads=threads,
                        verify_hashes=not no_verify_hashes) as gen:
        convo = Conversation(gen, ChatTemplate.from_bundle(gen.bundle, template_file), system)
        interactive = sys.stdin.isatty()
        if interactive:
            click.echo(f"chatting with {bundle} ({gen.runtime.name}); "
                       + ", ".join(f"{c}: {what}" for c, what in COMMANDS.items()), err=True)
        while (line := _read_line(interactive)) is not None:
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                convo.reset()
                click.echo("[history cleared]", err=True)
                continue
            if not text:
                continue
            _answer(convo, line, sampling)


def _answer(convo, line: str, sampling: dict) -> None:
    try:
        reply = convo.reply(line, **sampling)
    except GenerationError as exc:  # this message is refused; the conversation goes on
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        return
    if reply.dropped:
        click.echo(f"[dropped the {reply.dropped} oldest turn(s) to fit the model's "
                   f"{convo.generator.max_context}-position context]", err=True)
    with reply:
        for piece in reply:
            click.echo(piece, nl=False)
    click.echo()


def _read_line(interactive: bool) -> str | None:
    """The next message line (None at the end of input); "> " is shown on a terminal only."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
    except EOFError:
        return None
    except UnicodeDecodeError as exc:
        raise GenerationError(f"stdin is not UTF-8 text ({exc.reason} at offset {exc.start}); type or pipe UTF-8") from None
    if not line:
        return None
    return line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")


__all__ = ["chat"]
