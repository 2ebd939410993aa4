"""The ``q`` command. Each command parses options, calls one q API function, prints the result."""

from __future__ import annotations

import sys

import click

from ..errors import QError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="q-quant", prog_name="q")
def cli():
    """q: quantize Hugging Face LLMs into FP8 / int8 / int4 checkpoints that load in vLLM,
    SGLang, transformers and LMDeploy."""


def _build() -> click.Group:
    from . import client, convert, generate, info, quantize, serve
    from . import eval as eval_cmd

    for module in (quantize, convert, info, generate, eval_cmd, serve, client):
        module.add_commands(cli)
    try:
        from ..plugin_manager import get_plugin_manager

        get_plugin_manager().hook.register_commands(cli=cli)
    except QError as exc:
        # A broken plugin must not take `q --help` down with it; commands that need plugins
        # will raise the same error when they run.
        click.secho(f"warning: {exc}", fg="yellow", err=True)
    return cli


def main(argv=None) -> None:
    group = _build()
    try:
        group.main(args=argv, prog_name="q", standalone_mode=False)
    except QError as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # outputs are built under a temporary name, so an interrupted run leaves nothing
        click.echo("Interrupted; no output was written.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
