"""The `gptdeploy` command: a thin face over the library. Errors become one line and exit code 2."""

from __future__ import annotations

import sys

import click

from gptdeploy import __version__
from gptdeploy.errors import GptDeployError

EXIT_USAGE = 2


class _Group(click.Group):
    """Maps every GptDeployError, usage error and missing optional dependency to one line,
    `error: ...`, and exit code 2 — here, and nowhere else."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.UsageError as exc:  # bad option values: one line, not click's usage block
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            fail(exc.format_message() + hint)
        except click.ClickException as exc:
            fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GptDeployError as exc:
            fail(str(exc))
        except ModuleNotFoundError as exc:
            hint = "pip install 'gptdeploy[export]'" if exc.name in ("torch", "transformers", "onnx") else ""
            fail(f"{exc.name} is not installed{'; ' + hint if hint else ''}")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def fail(message: str) -> None:
    one_line = " ".join(message.split())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="gptdeploy")
def cli() -> None:
    """Export trained GPTs to verified deploy bundles, generate with them, audit what they attended to."""


def _register() -> None:
    from gptdeploy.cli.audit import audit
    from gptdeploy.cli.bench import bench
    from gptdeploy.cli.chat import chat
    from gptdeploy.cli.engine import build_engine, doctor
    from gptdeploy.cli.export import export, verify
    from gptdeploy.cli.generate import generate
    from gptdeploy.cli.serve import serve

    for command in (export, verify, generate, chat, serve, audit, bench, build_engine, doctor):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="gptdeploy")


if __name__ == "__main__":
    main()
