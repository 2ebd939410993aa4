"""``q quantize``."""

from __future__ import annotations

import json
import warnings

import click

from .. import api
from ..calibdata import CalibrationWarning
from ..errors import OptionError
from .render import console, engine_lines, human, plan_detail, plan_summary


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise OptionError(f"--shard-size: cannot read '{text}' (examples: 5GB, 500MB)") from None


def parse_block(text: str | None):
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise OptionError(f"--block-size: expected N or NxK such as 128x128, got '{text}'") from None
    return sizes * 2 if len(sizes) == 1 else sizes


def parse_extra_args(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionError(f"--arg expects KEY=VALUE, got '{pair}'")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


FP8_NAMES = {"fp8": "e4m3", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}


def parse_alpha(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--alpha must be a number in [0, 1] or 'auto', got '{text}'") from None


def dtype_args(scheme: str, fp8_dtype: str | None, quant_dtype: str | None) -> dict:
    """--fp8-dtype / --quant-dtype -> scheme args. ``quant_dtype`` goes to schemes that take
    it (smoothquant: int8 | fp8); for fp8 schemes it is the older spelling of --fp8-dtype."""
    args = {"fp8_dtype": FP8_NAMES.get(fp8_dtype, fp8_dtype)}
    if quant_dtype is None:
        return args
    if "quant_dtype" in api.scheme_options(scheme):
        args["quant_dtype"] = quant_dtype
    elif quant_dtype == "int8":
        raise OptionError(f"--quant-dtype int8: scheme '{scheme}' stores fp8; int8 W8A8 is "
                          "--scheme smoothquant (calibrated) or --scheme w8a8-int8 (data-free)")
    else:
        args["fp8_dtype"] = FP8_NAMES.get(quant_dtype, quant_dtype)
    return args


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model", type=click.Path(file_okay=False))
    @click.option("--scheme", "-s", required=True, help="fp8-block, fp8-dynamic, fp8-tensor, "
                  "wint8, wint4, smoothquant, w8a8-int8 (see `q plugins`)")
    @click.option("--output", "-o", "--work-dir", type=click.Path(file_okay=False),
                  help="output directory (created atomically)")
    @click.option("--format", "-f", "fmt", help="checkpoint format: hf-fp8, compressed-tensors "
                  "(alias vllm); default: the scheme's")
    @click.option("--group-size", type=int, help="group-wise scales for wint8/wint4")
    @click.option("--block-size", help="fp8-block tile, N or NxK (default 128x128)")
    @click.option("--fp8-dtype", type=click.Choice(["e4m3", "e5m2", "fp8", "float8_e4m3fn",
                                                       "float8_e5m2"]),
                  help="fp8 storage type (default e4m3)")
    @click.option("--quant-dtype", type=click.Choice(["int8", "fp8", "e4m3", "e5m2",
                                                       "float8_e4m3fn", "float8_e5m2"]),
                  help="smoothquant: int8 (default) or fp8; fp8 schemes: as --fp8-dtype")
    @click.option("--calib", help="calibration data (smoothquant): botchan (default), lee, a "
                  ".txt or .jsonl file (text or messages records) or a directory of them")
    @click.option("--calib-samples", type=int, help="calibration windows (default 128)")
    @click.option("--calib-seqlen", type=int, help="tokens per window (default 512)")
    @click.option("--alpha", help="smoothquant migration strength: 0..1 (default 0.5) or "
                  "auto (searched per layer)")
    @click.option("--arg", "extra_args", multiple=True, metavar="KEY=VALUE",
                  help="a scheme option without its own flag (plugin schemes); VALUE is JSON "
                  "or a plain string (repeatable)")
    @click.option("--ignore", multiple=True, help="module to keep in bf16: exact name, glob "
                  "or re:REGEX (repeatable)")
    @click.option("--targets", multiple=True, help="modules to quantize (default: every "
                  "Linear); exact, glob or re:REGEX (repeatable)")
    @click.option("--ragged", type=click.Choice(["skip", "quantize"]), default="skip",
                  show_default=True, help="Linears whose dims do not fit the blocks/groups: "
                  "keep in bf16, or quantize with ceil-div grids (q's engine only)")
    @click.option("--dry-run", is_flag=True, help="print the plan for every tensor and stop")
    @click.option("--json", "as_json", is_flag=True, help="with --dry-run: the plan as JSON")
    @click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
    @click.option("--shard-size", default="5GB", show_default=True, help="max shard size")
    @click.option("--progress/--no-progress", default=None, help="progress bar (default: on "
                  "a terminal)")
    def quantize(model, scheme, output, fmt, group_size, block_size, fp8_dtype, quant_dtype,
                 calib, calib_samples, calib_seqlen, alpha, extra_args, ignore, targets, ragged,
                 dry_run, as_json, overwrite, shard_size, progress):
        """Quantize MODEL (an HF directory with safetensors) into OUTPUT.

        \b
        q quantize MODEL --scheme fp8-block -o OUT
        q quantize MODEL --scheme fp8-dynamic --format vllm -o OUT
        q quantize MODEL --scheme wint4 --group-size 128 -o OUT
        q quantize MODEL --scheme smoothquant --calib botchan -o OUT
        q quantize MODEL --scheme smoothquant --alpha auto --format lmdeploy -o OUT
        q quantize MODEL --scheme fp8-block --dry-run
        """
        if not dry_run and not output:
            raise OptionError("give -o OUTPUT (or --dry-run to only print the plan)")
        args = {"group_size": group_size, "block_size": parse_block(block_size),
                "alpha": parse_alpha(alpha), **dtype_args(scheme, fp8_dtype, quant_dtype),
                **parse_extra_args(extra_args)}
        common = dict(format=fmt, args=args, targets=targets or ("Linear",), ignore=ignore,
                      ragged=ragged, shard_size=parse_size(shard_size), calib=calib,
                      calib_samples=calib_samples, calib_seqlen=calib_seqlen)
        with warnings.catch_warnings():  # printed below, once, with the plan
            warnings.simplefilter("ignore", CalibrationWarning)
            the_plan = api.plan(model, scheme, **common)
        for note in the_plan.warnings:
            click.secho(f"warning: {note}", fg="yellow", err=True)
        out = console()
        if dry_run:
            if as_json:
                click.echo(json.dumps({"recipe": the_plan.recipe.to_dict(),
                                       "format": the_plan.format,
                                       "tensors": [e.to_dict() for e in the_plan.entries]},
                                      indent=1))
                return
            out.print(plan_detail(the_plan))
            out.print(plan_summary(the_plan))
            return
        out.print(plan_summary(the_plan))
        if the_plan.counts()["quantize"] == 0:
            click.secho("warning: the plan quantizes no Linear (see the reasons above); the "
                        "output will hold the model unchanged. For dims that are not multiples "
                        "of the block/group, try --ragged quantize or another scheme.",
                        fg="yellow", err=True)
        result = api.execute(the_plan, output, overwrite=overwrite, progress=progress)
        calibration = result.manifest.get("calibration")
        if calibration:
            click.echo(f"calibrated on {calibration['samples']} x {calibration['seqlen']} tokens "
                       f"of {calibration['data']} (alpha {calibration['alpha']}; per-layer "
                       "values in q_manifest.json)")
        total_in, total_out = result.plan.totals()
        click.echo(f"wrote {result.output} ({human(total_out)} from {human(total_in)}, "
                   f"format {result.plan.format})")
        lines = engine_lines(api.inspect(result.output))
        if lines:
            click.echo("runs on:\n" + "\n".join(lines))
