"""The Python API; the CLI only wraps these functions.

    import q
    q.quantize("MODEL_DIR", "fp8-block", "OUT")
    q.export("OUT", "vllm", "OUT-CT")
    q.dequantize("OUT", "OUT-BF16")
    q.inspect("OUT")
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calibdata import load_calibration
from .convert import DEFAULT_SHARD_BYTES, Job, bound_allocator_growth, plan_layout, run_jobs
from .errors import BadTensorError, CheckpointError, IncompatibleError, OptionError
from .planning import Plan, PlanEntry, build_entries, mark_transformed
from .progress import byte_progress
from .recipe import RECIPE_FILE, QuantRecipe
from .source import ModelSource, model_dtype
from .tensor import QuantizedTensor
from .writer import AtomicOutput

MANIFEST_FILE = "q_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json",
              RECIPE_FILE, MANIFEST_FILE}


def _registries():
    from .plugin_manager import get_registries

    return get_registries()


def _version() -> str:
    from . import __version__

    return __version__


@dataclass
class Result:
    """What a run produced: where, the plan it followed, and the manifest written."""

    output: Path | None
    plan: Plan
    manifest: dict


# --- reading checkpoints -------------------------------------------------------------------


def detect_format(source: ModelSource):
    """(format, reader) for a quantized checkpoint, or (None, None) for a plain model."""
    qcfg = source.config.get("quantization_config")
    regs = _registries()
    for _, entry in regs.formats:
        if entry.obj.detect(source.config):
            return entry.obj, entry.obj.open(source)
    if qcfg:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        raise CheckpointError(
            f"{source.path}: quantization_config with quant_method '{method}' is not a format "
            f"q reads (tried: {', '.join(regs.formats.names())}); dequantize it with the tool "
            "that made it, then run q on the bf16 model"
        )
    return None, None


# --- quantize -------------------------------------------------------------------------------


def make_recipe(scheme: str, args: dict | None = None, *, targets=("Linear",), ignore=(),
                ragged: str = "skip", format: str | None = None,
                model_dtype_: torch.dtype = torch.bfloat16, calibrating: bool = False):
    """Validate a scheme + options + format choice; returns (recipe, scheme, format).

    Calibrated schemes are refused unless ``calibrating`` (only :func:`plan` calibrates;
    online quantization in an engine has no data, and would silently skip the smoothing).
    """
    regs = _registries()
    scheme_obj = regs.schemes.get(scheme)
    if scheme_obj.requires_calibration and not calibrating:
        raise IncompatibleError(
            f"scheme '{scheme_obj.name}' needs calibration data, which online quantization "
            f"does not have: quantize first (`q quantize MODEL --scheme {scheme_obj.name} -o "
            "OUT`) and load OUT, or use a data-free scheme such as w8a8-int8"
        )
    clean = scheme_obj.validate_args({k: v for k, v in (args or {}).items() if v is not None})
    if ragged not in ("skip", "quantize"):
        raise OptionError(f"--ragged must be 'skip' or 'quantize', got '{ragged}'")
    storage = scheme_obj.storage(clean)
    recipe = QuantRecipe(scheme=regs.schemes.resolve(scheme), args=clean,
                         targets=tuple(targets or ("Linear",)), ignore=tuple(ignore or ()),
                         ragged=ragged, weights=storage["weights"],
                         input_activations=storage.get("input_activations"))
    fmt = regs.formats.get(format or scheme_obj.default_format)
    reason = fmt.supports(recipe)
    if reason:
        raise IncompatibleError(f"format '{fmt.name}' cannot store this: {reason}")
    scale_dtype = fmt.scale_dtype(recipe, model_dtype_)
    recipe = recipe.replace(scale_dtype=str(scale_dtype).removeprefix("torch."))
    return recipe, scheme_obj, fmt


def _encoder(fmt, recipe: QuantRecipe):
    """``fmt.encode``, or ``fmt.encode_for(recipe)`` for formats whose tensor layout depends on
    the recipe and not only on the QuantizedTensor (compressed-tensors W8A8 vs W8A16)."""
    encode_for = getattr(fmt, "encode_for", None)
    return encode_for(recipe) if encode_for is not None else fmt.encode


def _quantize_job(source, entry: PlanEntry, scheme_obj, encode, recipe: QuantRecipe,
                  transform=None) -> Job:
    scale_dtype = getattr(torch, recipe.scale_dtype)
    name, module = entry.name, entry.module

    def run(tensors):
        w = tensors[name]
        if transform is not None:  # calibrated schemes: e.g. SmoothQuant's column scaling
            w = transform.apply(name, w)
        qt = scheme_obj.quantize_weight(name, w, recipe.args, scale_dtype)
        if w.device.type != "meta" and not bool(torch.isfinite(qt.scale.float()).all()):
            raise BadTensorError(
                f"{source.path}: tensor '{name}' contains NaN or Inf; q refuses to quantize "
                f"it. Repair the checkpoint, or keep the layer with --ignore {module}"
            )
        return encode(module, qt)

    return Job([name], run)


def _transform_job(name: str, transform) -> Job:
    """A tensor a calibrated scheme rewrites but does not quantize (a smoothed norm, a kept
    consumer of one): written in its own dtype."""

    def run(tensors):
        t = tensors[name]
        return {name: transform.apply(name, t).to(t.dtype)}

    return Job([name], run)


@dataclass
class _Context:
    """What executing a plan needs; ``calibrate(progress) -> report`` for calibrated schemes."""

    source: ModelSource
    fmt: Any
    jobs: list[Job]
    layout: Any
    calibrate: Callable[[bool | None], dict] | None = None


def _open(path) -> ModelSource:
    # before any tensor work: set once, early, it keeps peak RSS flat (see the function)
    bound_allocator_growth()
    return ModelSource(path)


def plan(model: str | Path, scheme: str, *, format: str | None = None, args: dict | None = None,
         targets=("Linear",), ignore=(), ragged: str = "skip",
         shard_size: int = DEFAULT_SHARD_BYTES, calib: str | Path | None = None,
         calib_samples: int | None = None, calib_seqlen: int | None = None):
    """Build the plan (every tensor's decision and output sizes) without writing anything.

    The returned Plan can be executed with :func:`execute` (``q quantize`` prints it first).
    For schemes that need calibration (``smoothquant``) the calibration text is loaded and
    checked here (``calib``: a built-in corpus name, a .txt/.jsonl file or a directory;
    default ``botchan``); the calibration pass itself runs in :func:`execute`.
    """
    source = _open(model)
    _refuse_quantized(source)
    recipe, scheme_obj, fmt = make_recipe(
        scheme, args, targets=targets, ignore=ignore, ragged=ragged, format=format,
        model_dtype_=model_dtype(source.config), calibrating=True)
    entries = build_entries(source, recipe, scheme_obj.alignment(recipe.args))
    transform, calibrate, notes = None, None, []
    if scheme_obj.requires_calibration:
        transform = scheme_obj.plan_calibration(source, recipe, entries)
        data = load_calibration(source.path, calib, calib_samples, calib_seqlen)
        notes = list(data.warnings)
        mark_transformed(entries, transform.reasons)

        def calibrate(progress):
            return {**data.describe(),
                    **scheme_obj.calibrate(transform, source, recipe, data, progress)}
    elif calib is not None or calib_samples is not None or calib_seqlen is not None:
        raise OptionError(f"scheme '{recipe.scheme}' is data-free and takes no calibration "
                          "data; drop --calib/--calib-samples/--calib-seqlen")
    encode = _encoder(fmt, recipe)
    targets_ = transform.reasons if transform is not None else {}
    jobs = []
    for e in entries:
        if e.action == "quantize":
            jobs.append(_quantize_job(source, e, scheme_obj, encode, recipe,
                                      transform if e.name in targets_ else None))
        elif e.name in targets_:
            jobs.append(_transform_job(e.name, transform))
        else:
            jobs.append(Job([e.name], None, copy=True))
    layout, metas = plan_layout(source, jobs, shard_size, {"format": "pt", "producer": "q"})
    _fill_outputs(entries, metas)
    return Plan(recipe=recipe, format=fmt.name, entries=entries, warnings=notes,
                context=_Context(source, fmt, jobs, layout, calibrate))


def scheme_options(scheme: str) -> set[str]:
    """The option names scheme ``scheme`` takes (for the CLI's shared flags)."""
    return set(_registries().schemes.get(scheme).Args.model_fields)


def _fill_outputs(entries, metas):
    for entry, outs in zip(entries, metas):
        entry.outputs = {
            n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in outs.items()
        }
        entry.out_bytes = sum(t.numel() * t.element_size() for t in outs.values())


def _refuse_quantized(source: ModelSource) -> None:
    if source.config.get("quantization_config"):
        method = source.config["quantization_config"].get("quant_method", "?")
        raise CheckpointError(
            f"{source.path} is already quantized (quant_method '{method}'). To change its "
            f"format use `q export {source.path} --format FORMAT -o OUT`; to re-quantize, "
            f"first `q dequantize {source.path} -o BF16_DIR`"
        )


def quantize(model: str | Path, scheme: str, output: str | Path, *, format: str | None = None,
             args: dict | None = None, targets=("Linear",), ignore=(), ragged: str = "skip",
             overwrite: bool = False, shard_size: int = DEFAULT_SHARD_BYTES,
             progress: bool | None = None, calib: str | Path | None = None,
             calib_samples: int | None = None, calib_seqlen: int | None = None) -> Result:
    """Quantize ``model`` with ``scheme`` into ``output`` (streaming, atomic).

    Calibrated schemes (``smoothquant``) first run the model one decoder layer at a time
    over ``calib`` (see :func:`plan`); the manifest records the data and the factors' alphas.
    """
    the_plan = plan(model, scheme, format=format, args=args, targets=targets, ignore=ignore,
                    ragged=ragged, shard_size=shard_size, calib=calib,
                    calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    return execute(the_plan, output, overwrite=overwrite, progress=progress)


def execute(the_plan: Plan, output: str | Path, *, overwrite: bool = False,
            progress: bool | None = None) -> Result:
    """Run a plan made by :func:`plan` into ``output`` (calibrating first if it needs to)."""
    ctx = the_plan.context
    source = ctx.source
    qcfg = ctx.fmt.quantization_config(the_plan.recipe, the_plan.skipped_modules, source.config)
    config = {**source.config, "quantization_config": qcfg}
    manifest = _manifest(source, the_plan, "quantize")
    out = _write(source, ctx.jobs, ctx.layout, output, overwrite, config, the_plan.recipe,
                 manifest, progress, f"quantize {the_plan.recipe.scheme}", ctx.calibrate)
    return Result(out, the_plan, manifest)


def _write(source, jobs, layout, output, overwrite, config, recipe, manifest, progress, label,
           calibrate=None):
    # checks the output path before minutes of calibration, creates nothing yet
    atomic = AtomicOutput(output, overwrite=overwrite, protect=[source.path])
    if calibrate is not None:
        manifest["calibration"] = calibrate(progress)
    with atomic as tmp:
        with byte_progress(label, source.total_bytes(), progress) as advance:
            run_jobs(source, jobs, layout, tmp, advance)
        copy_side_files(source.path, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(recipe.to_json() + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(output)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config, model card: everything but weights."""
    for p in src.iterdir():
        if p.name in NOT_COPIED or p.name.endswith(WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)


def _manifest(source, the_plan: Plan, operation: str) -> dict:
    total_in, total_out = the_plan.totals()
    return {
        "producer": f"q {_version()}", "operation": operation, "source": str(source.path),
        "format": the_plan.format, "recipe": the_plan.recipe.to_dict(),
        "counts": the_plan.counts(), "bytes_in": total_in, "bytes_out": total_out,
        "tensors": [e.to_dict() for e in the_plan.entries],
    }


# --- export / dequantize -------------------------------------------------------------------------


def _conversion(source, reader, make_outputs, operation, recipe, fmt_name):
    """Jobs and plan entries that turn each quantized module via ``make_outputs(module, qt)``."""
    modules = reader.quantized_modules()
    consumed = {n: m for m, names in modules.items() for n in names}
    jobs, entries, done = [], [], set()
    for name, info in source.tensors.items():
        module = consumed.get(name)
        if module is None:
            jobs.append(Job([name], None, copy=True))
            entries.append(PlanEntry(name, "copy", "not quantized", info.shape,
                                     str(info.dtype).removeprefix("torch."), info.nbytes))
            continue
        if module in done:
            continue
        done.add(module)
        names = modules[module]

        def run(tensors, module=module):
            return make_outputs(module, reader.decode(module, tensors))

        jobs.append(Job(names, run))
        entries.append(PlanEntry(f"{module}.weight", operation, "quantized Linear", info.shape,
                                 str(info.dtype).removeprefix("torch."),
                                 sum(source.info(n).nbytes for n in names), module=module))
    return jobs, Plan(recipe=recipe, format=fmt_name, entries=entries)


def export(checkpoint: str | Path, format: str, output: str | Path, *, overwrite: bool = False,
           shard_size: int = DEFAULT_SHARD_BYTES, progress: bool | None = None) -> Result:
    """Rewrite a quantized checkpoint in another format, without re-quantizing."""
    source = _open(checkpoint)
    fmt_in, reader = detect_format(source)
    if reader is None:
        raise CheckpointError(
            f"{source.path} is not quantized; use `q quantize` to make a quantized checkpoint"
        )
    fmt_out = _registries().formats.get(format)
    reason = fmt_out.supports(reader.recipe)
    if reason:
        raise IncompatibleError(f"format '{fmt_out.name}' cannot store this checkpoint: {reason}")
    jobs, the_plan = _conversion(source, reader, _encoder(fmt_out, reader.recipe), "convert",
                                 reader.recipe, fmt_out.name)
    layout, metas = plan_layout(source, jobs, shard_size, {"format": "pt", "producer": "q"})
    _fill_outputs(the_plan.entries, metas)
    scale_dtypes = {d for e in the_plan.entries for n, (d, _) in e.outputs.items()
                    if e.module and not n.endswith(".weight")}
    recipe = reader.recipe
    skipped = list(reader.skipped)
    qcfg = fmt_out.quantization_config(recipe, skipped, source.config)
    config = {**source.config, "quantization_config": qcfg}
    manifest = _manifest(source, the_plan, f"export {fmt_in.name} -> {fmt_out.name}")
    manifest["scale_dtypes"] = sorted(scale_dtypes)
    out = _write(source, jobs, layout, output, overwrite, config, recipe, manifest, progress,
                 f"export {fmt_out.name}")
    return Result(out, the_plan, manifest)


def dequantize(checkpoint: str | Path, output: str | Path, *, dtype: str | None = None,
               overwrite: bool = False, shard_size: int = DEFAULT_SHARD_BYTES,
               progress: bool | None = None) -> Result:
    """Write a plain HF checkpoint (bf16 by default) from any quantized checkpoint q reads."""
    source = _open(checkpoint)
    fmt_in, reader = detect_format(source)
    if reader is None:
        raise CheckpointError(f"{source.path} is not quantized; there is nothing to dequantize")
    out_dtype = getattr(torch, dtype) if dtype else model_dtype(source.config)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise OptionError(f"--dtype must be a float dtype such as bfloat16, got '{dtype}'")

    def make_outputs(module, qt: QuantizedTensor):
        return {f"{module}.weight": qt.dequantize(out_dtype)}

    jobs, the_plan = _conversion(source, reader, make_outputs, "dequantize", reader.recipe,
                                 "unquantized")
    layout, metas = plan_layout(source, jobs, shard_size, {"format": "pt", "producer": "q"})
    _fill_outputs(the_plan.entries, metas)
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    manifest = _manifest(source, the_plan, f"dequantize {fmt_in.name}")
    out = _write(source, jobs, layout, output, overwrite, config, None, manifest, progress,
                 "dequantize")
    return Result(out, the_plan, manifest)


def _natural_key(item) -> list:
    """model.layers.2 before model.layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in item[0].split(".")]


def inspect(checkpoint: str | Path) -> dict[str, Any]:
    """Detected format, recipe, per-layer table and sizes of a checkpoint (reads headers only)."""
    source = ModelSource(checkpoint)
    fmt, reader = detect_format(source)
    report: dict[str, Any] = {
        "path": str(source.path), "format": fmt.name if fmt else "unquantized",
        "architecture": (source.config.get("architectures") or ["?"])[0],
        "model_type": source.config.get("model_type"),
        "bytes": source.total_bytes(), "tensors": len(source.tensors), "layers": [],
    }
    if reader is not None:
        _describe_quantization(report, source, reader)
    report["engines"] = engine_support(report)
    return report


def engine_support(report: dict) -> list[dict]:
    """What each registered engine says about running the checkpoint ``report`` describes."""
    return [{"engine": name, "target": s.target, "runs": s.runs, "reason": s.reason}
            for name, entry in _registries().engines for s in entry.obj.support(report)]


def _describe_quantization(report: dict, source: ModelSource, reader) -> None:
    report["recipe"] = reader.recipe.to_dict()
    report["skipped"] = list(reader.skipped)
    for module, names in sorted(reader.quantized_modules().items(), key=_natural_key):
        qt = reader.decode(module, {n: source.meta(n) for n in names})
        report["layers"].append({
            "module": module, "qdtype": qt.qdtype, "granularity": qt.granularity,
            "block_size": list(qt.block_size), "shape": list(qt.shape),
            "scale_shape": list(qt.scale.shape),
            "scale_dtype": str(qt.scale.dtype).removeprefix("torch."),
            "bytes": sum(source.info(n).nbytes for n in names),
        })
