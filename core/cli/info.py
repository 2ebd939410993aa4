"""``q inspect``, ``q plugins`` and ``q default-model``."""

from __future__ import annotations

import json

import click
from rich.table import Table

from .. import api
from .render import console, engine_lines, human, inspect_table


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("checkpoint", type=click.Path(file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    def inspect(checkpoint, as_json):
        """Show CHECKPOINT's format, recipe, per-layer quantization and sizes."""
        report = api.inspect(checkpoint)
        if as_json:
            click.echo(json.dumps(report, indent=1))
            return
        out = console()
        if report["layers"]:
            out.print(inspect_table(report))
        recipe = report.get("recipe", {}).get("data")
        click.echo(f"format: {report['format']}  architecture: {report['architecture']}")
        if recipe:
            click.echo(f"scheme: {recipe['scheme']} {recipe['args']}  "
                       f"scales: {recipe['scale_dtype']}")
            click.echo(f"quantized Linears: {len(report['layers'])}  kept in model dtype: "
                       f"{len(report['skipped'])}")
        click.echo(f"tensors: {report['tensors']}  size: {human(report['bytes'])}")
        if report["engines"]:
            click.echo("runs on:")
            click.echo("\n".join(engine_lines(report)))

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    def plugins(as_json):
        """List schemes, formats and engines, and which plugin provides each."""
        from ..plugin_manager import get_plugin_manager, get_registries, plugin_distribution

        pm, regs = get_plugin_manager(), get_registries()
        rows = []
        for kind, registry in (("scheme", regs.schemes), ("format", regs.formats),
                               ("engine", regs.engines)):
            for name, entry in registry:
                rows.append({"kind": kind, "name": name, "aliases": list(entry.aliases),
                             "plugin": entry.owner,
                             "distribution": plugin_distribution(pm, entry.owner),
                             "description": getattr(entry.obj, "description", ""),
                             "moe": getattr(entry.obj, "moe", "") if kind == "engine" else ""})
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        table = Table(title="q plugins")
        for col in ("kind", "name", "aliases", "provided by", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["kind"], r["name"], ", ".join(r["aliases"]),
                          f"{r['distribution']} ({r['plugin']})", r["description"])
        console().print(table)
        engines = [r for r in rows if r["kind"] == "engine"]
        if engines:
            moe = Table(title="MoE models, per engine")
            for col in ("engine", "MoE support"):
                moe.add_column(col, overflow="fold")
            for r in engines:
                moe.add_row(r["name"], r["moe"] or "(the engine does not say)")
            console().print(moe)

    @cli.command("default-model")
    @click.option("--refresh", is_flag=True, help="rebuild the cached directory")
    def default_model(refresh):
        """Materialize the embedded SmolLM2-135M-Instruct as an HF directory; print its path."""
        from ..embedded import default_model as materialize

        click.echo(str(materialize(refresh=refresh)))
