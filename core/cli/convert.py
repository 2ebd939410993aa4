"""``q export`` and ``q dequantize``: rewrite a quantized checkpoint without re-quantizing."""

from __future__ import annotations

import click

from .. import api
from .render import human


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("checkpoint", type=click.Path(file_okay=False))
    @click.option("--format", "-f", "fmt", required=True, help="hf-fp8, compressed-tensors "
                  "(alias vllm)")
    @click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
    @click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
    @click.option("--progress/--no-progress", default=None)
    def export(checkpoint, fmt, output, overwrite, progress):
        """Convert CHECKPOINT (any format q reads) to another format, bit for bit."""
        result = api.export(checkpoint, fmt, output, overwrite=overwrite, progress=progress)
        click.echo(f"wrote {result.output} in {result.plan.format} "
                   f"({human(result.plan.totals()[1])})")

    @cli.command()
    @click.argument("checkpoint", type=click.Path(file_okay=False))
    @click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
    @click.option("--dtype", help="output float dtype (default: the model's, usually bfloat16)")
    @click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
    @click.option("--progress/--no-progress", default=None)
    def dequantize(checkpoint, output, dtype, overwrite, progress):
        """Write a plain HF checkpoint from a quantized one (q's, DeepSeek's, llm-compressor's)."""
        result = api.dequantize(checkpoint, output, dtype=dtype, overwrite=overwrite,
                                progress=progress)
        click.echo(f"wrote {result.output} ({human(result.plan.totals()[1])})")
