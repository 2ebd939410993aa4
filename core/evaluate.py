"""``q.evaluate``: how far a quantized model is from its reference, on real held-out text.

    report = q.evaluate("OUT", reference="MODEL_DIR")    # a checkpoint vs its bf16 model
    report = q.evaluate("MODEL_DIR", scheme="wint4")     # online; the reference is MODEL_DIR
    print(report.verdict, report.reason)

Both models run through q's engine (``q.load_engine``): the quantized one as it will be
served, the reference unquantized. They are loaded one after the other, never together:
the reference runs first and keeps, per evaluated token, its full next-token log-softmax
(fp32, or fp16 when that would exceed ``reference_budget`` bytes), plus the inputs and
outputs of every Linear at ``layer_rows`` positions of the first window; then it is freed
and the quantized model loads. Peak memory is one model plus that store (SmolLM2, 8 x 256
tokens: 400 MB of log-probs). docs/eval.md explains every number and the verdict.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from pathlib import Path

from .errors import CheckpointError, OptionError
from .eval_report import (  # re-exported: q.evaluate is the public module
    EvalReport,
    Generation,
    LayerError,
    Thresholds,
    degenerate_flags,
    verdict,
)
from .modeling import load_tokenizer
from .progress import count_progress

log = logging.getLogger("q.eval")

DEFAULT_TEXT = "lee"  # news; calibration uses Botchan, so this stays held out
PROMPT_TOKENS = 24  # generation prompts: the first tokens of evenly spaced windows
MAX_TEXT_CHARS = 4_000_000  # a bigger --text is cut here: tokenizing it all buys nothing


def evaluate(model, reference=None, *, text=None, windows: int = 8, window_len: int = 256,
             generations: int = 3, gen_tokens: int = 48, prompts: list[str] | None = None,
             scheme: str | None = None, args: dict | None = None, ragged: str = "skip",
             ignore=(), device: str | None = None, impl: str = "auto",
             thresholds: Thresholds | None = None, layer_rows: int = 64,
             reference_budget: int = 1 << 30, progress: bool | None = None,
             engine: str = "native", engine_options: dict | None = None) -> EvalReport:
    """Evaluate ``model`` (a checkpoint, or a plain model + ``scheme``) against ``reference``.

    ``text``: a .txt path or a corpus name of ``q.textdata`` (default: ``"lee"``, news).
    ``reference``: the unquantized model; defaults to ``model`` itself with ``scheme``, else
    to the source in the checkpoint's q_manifest.json when it exists; without one only
    perplexity and generations are checked. Raises QError on bad inputs before any model
    is loaded. ``engine``: another engine than the native one (``vllm``) scores both models
    itself (:mod:`q.eval_scored`: no KL or per-layer errors). ``engine_options`` go to the
    engine's load (native: ``dtype``, ``kv_cache_tokens``; vllm: ``vllm_python``).
    """
    import torch

    from .convert import bound_allocator_growth

    # the CPU path dequantizes every weight in every forward; with glibc's default dynamic
    # threshold those buffers start as fresh mmaps, zero-filled a page at a time (the first
    # generation ran several times slower here without this)
    bound_allocator_growth()
    start = time.perf_counter()
    thresholds = thresholds or Thresholds()
    thresholds.check()
    if windows < 1 or window_len < 8 or generations < 0 or gen_tokens < 1 or layer_rows < 1:
        raise OptionError("need windows >= 1, window_len >= 8, generations >= 0, "
                          "gen_tokens >= 1, layer_rows >= 1")
    scorer = None
    if engine != "native":
        from .eval_scored import scoring_engine

        scorer = scoring_engine(engine)
        if scheme:
            raise OptionError(f"the {engine} engine does not quantize online: `q quantize` "
                              "first, then evaluate the output")
    model = _model_dir(model, "the model")
    config = json.loads((model / "config.json").read_text())
    if scheme and "quantization_config" in config:
        raise OptionError(f"{model} is already quantized; drop --scheme to evaluate it as it is")
    context = config.get("max_position_embeddings")
    if context and window_len > context:
        raise OptionError(f"window_len {window_len} is longer than the model's context {context}")
    reference, notes = _resolve_reference(model, reference, scheme)
    tokenizer = load_tokenizer(model)
    if reference is not None:
        _same_tokenizer(tokenizer, load_tokenizer(reference), model, reference)
    label, raw = _read_text(text)
    ids, notes2 = _windows(tokenizer, raw, label, windows, window_len)
    notes += notes2
    prompt_ids = _prompts(tokenizer, ids, prompts, generations)
    if scorer is not None:
        from .api import inspect
        from .eval_scored import evaluate_scored

        return evaluate_scored(scorer, model, reference, ids=ids, prompt_ids=prompt_ids,
                               tokenizer=tokenizer, label=label, gen_tokens=gen_tokens,
                               thresholds=thresholds, notes=notes,
                               fmt=inspect(model)["format"], options=engine_options or {})
    rows = torch.linspace(1, ids.shape[1] - 1, min(layer_rows, ids.shape[1] - 1)).round().long()

    ref = None
    if reference is not None:
        session = _load(reference, None, None, "skip", (), device, impl, engine_options)
        ref = _run(session, ids, prompt_ids, gen_tokens, rows, None, reference_budget,
                   "reference", progress)
        del session
        _free(torch)
    session = _load(model, scheme, args, ragged, ignore, device, impl, engine_options)
    out = _run(session, ids, prompt_ids, gen_tokens, rows, ref, reference_budget, "quantized",
               progress)
    report = EvalReport(
        model=str(model), reference=str(reference) if reference else None,
        format=session.report.format, text=label, windows=ids.shape[0],
        window_len=ids.shape[1], ppl=out["ppl"], thresholds=thresholds, notes=notes,
        reference_store=ref["store"] if ref else "none")
    if ref is not None:
        report.ref_ppl = ref["ppl"]
        report.ppl_increase = out["ppl"] / ref["ppl"] - 1
        report.kl_mean, report.kl_p95 = out["kl_mean"], out["kl_p95"]
        report.top1_agreement = out["agreement"]
        report.layers = _layer_errors(session, ref["io"], out["io"], thresholds.layer_error,
                                      _smoothing_factors(session, ref["norms"]))
        if report.broken:
            notes.append("most quantized layers are far off: the checkpoint looks broken (wrong "
                         "scales?), not hurt by a few sensitive layers")
    report.generations = _generations(tokenizer, prompt_ids, out, ref)
    del session
    _free(torch)
    report.verdict, report.reason = verdict(report)
    report.seconds = time.perf_counter() - start
    return report


def perplexity(model, ids, *, batch: int = 4, device: str | None = None,
               impl: str = "auto") -> float:
    """exp(mean next-token NLL) of ``ids`` (``[windows, length]``, each window independent),
    run by q's engine: ``model`` is a checkpoint or model directory, or an engine session.

    Only perplexity, no reference: what benchmarks comparing many checkpoints need.
    """
    import torch

    session = model if hasattr(model, "model") else _load(
        _model_dir(model, "the model"), None, None, "skip", (), device, impl)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in ids.split(batch):
            chunk = chunk.to(session.device)
            logits = session.model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                reduction="sum"))
            count += chunk[:, 1:].numel()
    return math.exp(nll / count)


# --- inputs -------------------------------------------------------------------------------


def _model_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} {path} is not a model directory (no config.json); give "
                              "a Hugging Face model directory or a checkpoint `q quantize` wrote")
    return path


def _resolve_reference(model: Path, reference, scheme) -> tuple[Path | None, list[str]]:
    if reference is not None:
        ref = _model_dir(reference, "the reference")
        quantized = "quantization_config" in json.loads((ref / "config.json").read_text())
        return ref, ["the reference is itself quantized"] if quantized else []
    if scheme is not None:  # online quantization: the unquantized model is right here
        return model, []
    manifest = model / "q_manifest.json"
    source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
    if source and (Path(source) / "config.json").is_file():
        return Path(source), [f"reference taken from q_manifest.json: {source}"]
    return None, ["no reference: KL, agreement and layer errors need --reference MODEL_DIR"]


def _same_tokenizer(a, b, model: Path, reference: Path) -> None:
    """KL and agreement compare distributions token by token: the vocabularies must match."""
    if len(a) != len(b):
        raise CheckpointError(
            f"the tokenizers differ: {model} has {len(a)} tokens, the reference {reference} "
            f"{len(b)}; compare a checkpoint with the model it was made from")
    va, vb = a.get_vocab(), b.get_vocab()
    differ = sum(va.get(tok) != i for tok, i in vb.items())
    if differ:
        raise CheckpointError(f"the tokenizers differ: {differ} of {len(vb)} tokens of the "
                              f"reference {reference} have another id in {model}")


def _read_text(text) -> tuple[str, str]:
    from .textdata import SOURCES, real_text

    if text is None or (isinstance(text, str) and text in SOURCES):
        name = text or DEFAULT_TEXT
        return f"{name} ({SOURCES[name].file})", real_text(name)
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"--text {path}: cannot read it ({exc.strerror})") from None
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OptionError(f"--text {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if not raw.strip():
        raise OptionError(f"--text {path} is empty")
    return str(path), raw[:MAX_TEXT_CHARS]


def _windows(tokenizer, raw: str, label: str, windows: int, window_len: int):
    """[n, window_len] token ids: non-overlapping windows spread evenly over the text.

    Each window starts with what the tokenizer puts before any text (BOS for Llama/Gemma,
    nothing for SmolLM2): models like Gemma are off-distribution without it.
    """
    import torch

    prefix = tokenizer("").input_ids
    body = window_len - len(prefix)
    tokens = tokenizer(raw, add_special_tokens=False, verbose=False).input_ids  # no warning
    if len(tokens) < body:
        raise OptionError(f"--text {label} has {len(tokens)} tokens; one window needs {body} "
                          f"(--window-len {window_len}); give a longer text or a shorter window")
    count, notes = min(windows, len(tokens) // body), []
    if count < windows:
        notes.append(f"the text holds only {count} windows of {window_len} tokens, not {windows}")
    stride = (len(tokens) - body) // (count - 1) if count > 1 else 0
    rows = [prefix + tokens[i * stride:i * stride + body] for i in range(count)]
    return torch.tensor(rows), notes


def _prompts(tokenizer, ids, prompts, n) -> list[list[int]]:
    if prompts:
        return [tokenizer(p).input_ids for p in prompts]
    picks = [round(i * (ids.shape[0] - 1) / max(n - 1, 1)) for i in range(n)]
    return [ids[i, :PROMPT_TOKENS].tolist() for i in picks]


# --- running the models ---------------------------------------------------------------------


def _load(path, scheme, args, ragged, ignore, device, impl, options=None):
    from .pipeline import load_engine

    session = load_engine(path, scheme=scheme, args=args, ragged=ragged, ignore=ignore,
                          device=device, impl=impl, **(options or {}))
    if not hasattr(session, "model"):
        raise OptionError("q eval needs an engine that exposes its model (the native engine)")
    return session


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _capture(modules: dict, rows, keep_inputs: bool, io: dict):
    """Record each module's input (optionally) and output at ``rows`` of a [1, L, *] call.
    MoE experts modules take (tokens, expert ids, routing weights): all three are kept."""
    def hook(name):
        def record(module, inputs, output):
            y = output.reshape(-1, output.shape[-1])
            x = None
            if keep_inputs:
                x = tuple(t.reshape(-1, t.shape[-1])[rows].detach().cpu() for t in inputs)
                x = x[0] if len(x) == 1 else x
            io[name] = (x, y[rows].detach().cpu())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(session, ids, prompt_ids, gen_tokens, rows, ref, budget, label, progress) -> dict:
    """Forward every window (NLL, and KL/agreement against ``ref``), then generate."""
    import torch
    from torch import nn

    model, device = session.model, session.device
    n, length = ids.shape
    vocab = model.get_output_embeddings().out_features
    store = torch.float32 if n * (length - 1) * vocab * 4 <= budget else torch.float16
    if ref is None:  # the reference: hook every Linear, the quantized twin is not known yet
        modules = {k: m for k, m in model.named_modules()
                   if isinstance(m, nn.Linear) or getattr(m, "replaces_linear", False)}
    else:
        modules = dict(session.report.quantized)
    modules.update(getattr(session.report, "experts", {}))  # MoE experts, in both models
    out = {"logprobs": [], "argmax": [], "io": {}, "store": str(store).removeprefix("torch.")}
    if ref is None:  # norm weights, to undo SmoothQuant factors in the isolated layer errors
        out["norms"] = {n: p.detach().float().cpu() for n, p in model.named_parameters()
                        if p.dim() == 1 and n.endswith("norm.weight")}
    nll, kls, agree = [], [], []
    with count_progress(f"{label}: windows", n, progress) as advance, torch.inference_mode():
        for w in range(n):
            x = ids[w:w + 1].to(device)
            hooks = _capture(modules, rows, ref is None, out["io"]) if w == 0 else \
                contextlib.nullcontext()
            with hooks:
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            nll.append(-logp.gather(1, x[0, 1:, None]).squeeze(1).cpu())
            if ref is None:
                out["logprobs"].append(logp.to(store).cpu())
                out["argmax"].append(logp.argmax(-1).cpu())
            else:
                lp_ref = ref["logprobs"][w].to(device).float()
                p_ref = lp_ref.exp()
                # 0 * log 0 = 0: a token the reference rules out adds nothing (not NaN)
                term = torch.where(p_ref > 0, p_ref * (lp_ref - logp), 0.0)
                kls.append(term.sum(-1).cpu())
                agree.append((logp.argmax(-1).cpu() == ref["argmax"][w]).float())
            advance()
    out["ppl"] = math.exp(torch.cat(nll).double().mean().item())
    if ref is not None:
        kl = torch.cat(kls).double()
        out["kl_mean"], out["kl_p95"] = kl.mean().item(), kl.quantile(0.95).item()
        out["agreement"] = torch.cat(agree).mean().item()
    out["generated"] = _generate(session, prompt_ids, gen_tokens, label, progress)
    return out


def _generate(session, prompt_ids, gen_tokens, label, progress) -> list[list[int]]:
    """Greedy continuations (EOS ends one early), batched through the session's scheduler."""
    from .generation import SamplingParams

    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0)
    rids = [session.add_request(p, params) for p in prompt_ids]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    pending = set(rids)
    with count_progress(f"{label}: generating", len(rids) * gen_tokens, progress) as advance:
        while pending:
            for o in session.step():
                if o.request_id in tokens:
                    tokens[o.request_id].extend(o.token_ids)
                    advance(len(o.token_ids))
                    if o.finished:
                        pending.discard(o.request_id)
    eos = session.eos_token_ids
    return [[t for t in tokens[r] if t not in eos] for r in rids]


# --- metrics and verdict ------------------------------------------------------------------------


def _rel(a, b) -> float:
    b = b.float()
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _smoothing_factors(session, ref_norms: dict) -> dict:
    """Per quantized Linear that reads a smoothed norm: its input factors ``s``.

    SmoothQuant divides a norm's weight by ``s`` and multiplies its consumers' columns by
    ``s``, so the quantized Linear expects ``x / s`` where the reference Linear gets ``x``.
    ``s`` is recovered from the two models' norm weights, ``(offset + w_ref) / (offset +
    w_q)``, which is exactly the ratio the quantized model applies (rounding included).
    """
    import torch

    from .smoothing import ARCH_SMOOTHING

    arch = ARCH_SMOOTHING.get(getattr(session.model.config, "model_type", None))
    if arch is None:
        return {}
    params = dict(session.model.named_parameters())
    norm_of = {c: m.norm for m in arch.mappings for c in m.consumers}
    factors = {}
    for name in session.report.quantized:
        index, _, rel = name.removeprefix(arch.layers + ".").partition(".")
        norm = f"{arch.layers}.{index}.{norm_of.get(rel)}.weight"
        if rel not in norm_of or norm not in ref_norms or norm not in params:
            continue
        a = ref_norms[norm] + arch.norm_offset
        b = params[norm].detach().float().cpu() + arch.norm_offset
        if not torch.equal(a, b):
            factors[name] = torch.where(b != 0, a / b, torch.ones_like(a))
    return factors


def _layer_errors(session, ref_io: dict, q_io: dict, flag_above: float,
                  factors: dict | None = None) -> list[LayerError]:
    """Isolated and in-model errors of every QuantLinear and MoE experts module (given the
    reference's tokens and routing), worst isolated first."""
    import torch

    layers, factors = [], factors or {}
    experts = getattr(session.report, "experts", {})
    with torch.inference_mode():
        for name, layer in {**session.report.quantized, **experts}.items():
            if name not in ref_io:  # the reference has no such Linear (another architecture)
                continue
            x_ref, y_ref = ref_io[name]
            if name in experts:
                y_iso = layer(*(t.to(session.device) for t in x_ref)).cpu()
                in_model = _rel(q_io[name][1], y_ref) if name in q_io else None
                iso = _rel(y_iso, y_ref)  # named by the --ignore glob that would skip them
                layers.append(LayerError(layer.checkpoint_pattern, iso, in_model,
                                         not iso <= flag_above))
                continue
            if name in factors:  # a smoothed consumer: feed it what the model feeds it
                x_ref = (x_ref.float() / factors[name]).to(x_ref.dtype)
            y_iso = layer(x_ref.to(session.device)).cpu()
            in_model = _rel(q_io[name][1], y_ref) if name in q_io else None
            iso = _rel(y_iso, y_ref)
            layers.append(LayerError(name, iso, in_model, not iso <= flag_above))
    return sorted(layers, key=lambda e: -e.isolated if math.isfinite(e.isolated) else -math.inf)


def _generations(tokenizer, prompt_ids, out, ref) -> list[Generation]:
    gens = []
    for i, (prompt, toks) in enumerate(zip(prompt_ids, out["generated"])):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        g = Generation(tokenizer.decode(prompt, skip_special_tokens=True), text,
                       degenerate_flags(toks, text))
        if ref is not None:
            rtoks = ref["generated"][i]
            g.reference_text = tokenizer.decode(rtoks, skip_special_tokens=True)
            g.reference_flags = degenerate_flags(rtoks, g.reference_text)
            same = next((j for j, (a, b) in enumerate(zip(toks, rtoks)) if a != b),
                        min(len(toks), len(rtoks)))
            g.prefix_match = same / max(len(rtoks), 1)
        gens.append(g)
    return gens
