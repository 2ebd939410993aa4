"""``q eval`` through an engine that scores text but exposes no model (vLLM).

Such an engine returns, per checkpoint, the top-1 token and the log-probability of the real
next token at every position of the held-out windows, and greedy continuations
(:meth:`q.interfaces.Engine.score`). That gives perplexity, the perplexity increase over
the reference, top-1 agreement with the reference and the degenerate-generation check,
each computed as q.evaluate computes them, with the reference run by the same engine. KL
divergence and per-layer errors need full next-token distributions and the layers' outputs,
which such engines do not expose: they are reported as not available, with the reason.
"""

from __future__ import annotations

import math
import time

from .errors import OptionError
from .eval_report import EvalReport, Thresholds, verdict

UNAVAILABLE = ("KL divergence and per-layer errors are not available with the {engine} "
               "engine: it exposes no full next-token distributions and no layer outputs "
               "(q eval on the native engine has both)")


def evaluate_scored(engine, model, reference, *, ids, prompt_ids, tokenizer, label: str,
                    gen_tokens: int, thresholds: Thresholds, notes: list[str],
                    fmt: str, options: dict) -> EvalReport:
    """``model`` (and ``reference``, when given) scored by ``engine`` on ``ids``
    (``[windows, length]`` token ids) and ``prompt_ids``."""
    from .evaluate import _generations

    start = time.perf_counter()
    names = {"reference": reference} if reference is not None else {}
    names["quantized"] = model
    windows = ids.tolist()
    scored = engine.score({k: str(v) for k, v in names.items()}, windows, prompt_ids,
                          max_tokens=gen_tokens, **options)
    out = scored["quantized"]
    report = EvalReport(model=str(model), reference=str(reference) if reference else None,
                        format=f"{fmt}, run by {engine.name}", text=label,
                        windows=len(windows), window_len=len(windows[0]),
                        ppl=_perplexity(out["logprob"]), thresholds=thresholds,
                        notes=[*notes, UNAVAILABLE.format(engine=engine.name)],
                        reference_store="none")
    ref = scored.get("reference")
    if ref is not None:
        report.ref_ppl = _perplexity(ref["logprob"])
        report.ppl_increase = report.ppl / report.ref_ppl - 1
        pairs = [(a, b) for wa, wb in zip(out["top1"], ref["top1"]) for a, b in zip(wa, wb)]
        report.top1_agreement = sum(a == b for a, b in pairs) / len(pairs)
    eos = _eos_ids(model, tokenizer)
    report.generations = _generations(
        tokenizer, prompt_ids, {"generated": [[t for t in g if t not in eos]
                                              for g in out["greedy"]]},
        None if ref is None else {"generated": [[t for t in g if t not in eos]
                                                for g in ref["greedy"]]})
    report.verdict, report.reason = verdict(report)
    report.seconds = time.perf_counter() - start
    return report


def _eos_ids(model, tokenizer) -> set[int]:
    """EOS ids of the tokenizer and of generation_config.json (vLLM stops on either)."""
    import json
    from pathlib import Path

    ids = {tokenizer.eos_token_id} - {None}
    gen = Path(model) / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def _perplexity(logprob: list[list[float]]) -> float:
    flat = [x for window in logprob for x in window]
    return math.exp(-sum(flat) / len(flat))


def scoring_engine(name: str):
    """The registered engine ``name``, if it can score text for ``q eval``."""
    from .plugin_manager import get_registries

    engine = get_registries().engines.get(name)
    if type(engine).score is _base_score():
        raise OptionError(f"q eval cannot run on the {name} engine: it neither exposes its "
                          "model nor scores text; use --engine native")
    return engine


def _base_score():
    from .interfaces import Engine

    return Engine.score
