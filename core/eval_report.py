"""The report of ``q.evaluate``: its data, the degenerate-generation check and the verdict.

Kept apart from the measuring code (q.evaluate) so the rules that decide PASS / WARN / FAIL
read on one page; docs/eval.md states the same rules for users.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

from .errors import OptionError


@dataclass
class Thresholds:
    """FAIL / WARN limits; ppl limits are relative increases (0.25 = +25%)."""

    warn_ppl: float = 0.05
    fail_ppl: float = 0.25
    warn_agreement: float = 0.90
    fail_agreement: float = 0.80
    layer_error: float = 0.25  # a layer whose isolated error exceeds this is flagged

    def check(self) -> None:
        if not 0 <= self.warn_ppl <= self.fail_ppl:
            raise OptionError(f"need 0 <= warn ppl ({self.warn_ppl}) <= fail ppl "
                              f"({self.fail_ppl})")
        if not 0 <= self.fail_agreement <= self.warn_agreement <= 1:
            raise OptionError(f"need 0 <= fail agreement ({self.fail_agreement}) <= warn "
                              f"agreement ({self.warn_agreement}) <= 1")


@dataclass
class LayerError:
    """Relative output error ||y_q - y_ref|| / ||y_ref|| of one quantized Linear."""

    name: str
    isolated: float  # the QuantLinear on the reference's own input: the layer's own damage
    in_model: float | None  # inside the quantized model: includes every upstream error
    flagged: bool = False


@dataclass
class Generation:
    prompt: str
    text: str
    flags: list[str]
    reference_text: str | None = None
    reference_flags: list[str] = field(default_factory=list)
    prefix_match: float | None = None  # share of the reference's tokens matched before divergence

    @property
    def degenerate(self) -> bool:
        """Flagged, and not just as the reference itself is (small models loop on their own)."""
        return bool(set(self.flags) - set(self.reference_flags))


@dataclass
class EvalReport:
    model: str
    reference: str | None
    format: str
    text: str
    windows: int
    window_len: int
    ppl: float
    ref_ppl: float | None = None
    ppl_increase: float | None = None
    kl_mean: float | None = None
    kl_p95: float | None = None
    top1_agreement: float | None = None
    layers: list[LayerError] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    verdict: str = "PASS"
    reason: str = ""
    reference_store: str = "float32"
    seconds: float = 0.0
    card: str | None = None  # the README.md `q eval` wrote its section into, if any
    notes: list[str] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[LayerError]:
        return self.layers[:n]

    @property
    def broken(self) -> bool:
        """Most layers flagged: a broken checkpoint, which no --ignore list would fix."""
        return sum(e.flagged for e in self.layers) > len(self.layers) / 2

    @property
    def suggested_ignore(self) -> list[str]:
        """Flagged layers, worst first; if none is but the verdict is not PASS, the worst 5."""
        if self.broken:
            return []
        flagged = [e.name for e in self.layers if e.flagged]
        return (flagged or [e.name for e in self.layers if self.verdict != "PASS"])[:5]

    def to_dict(self) -> dict:
        data = asdict(self)
        for g, d in zip(self.generations, data["generations"]):
            d["degenerate"] = g.degenerate
        data["degenerate"] = sum(g.degenerate for g in self.generations)
        data["suggested_ignore"], data["broken"] = self.suggested_ignore, self.broken
        return _finite(data)


def _finite(value):
    """JSON has no NaN/Infinity: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def degenerate_flags(token_ids: list[int], text: str) -> list[str]:
    """What is wrong with one greedy continuation: empty, one-token, loop, garbage."""
    flags = []
    n = len(token_ids)
    if not text.strip():
        flags.append("empty")
    if n >= 8 and Counter(token_ids).most_common(1)[0][1] > n / 2:
        flags.append("one token repeated")
    for p in range(1, min(16, n // 3) + 1):
        run = 0  # length of the tail where every token equals the one p before it
        while run < n - p and token_ids[n - 1 - run] == token_ids[n - 1 - run - p]:
            run += 1
        if run + p >= max(3 * p, n / 2):  # >= 3 repetitions covering half the output
            flags.append(f"loop of {p} tokens")
            break
    chars = [c for c in text if not c.isspace()]
    bad = sum(c == "\ufffd" or unicodedata.category(c).startswith("C") for c in chars)
    if chars and bad > 0.1 * len(chars):
        flags.append("garbage characters")
    return flags


def verdict(r: EvalReport) -> tuple[str, str]:
    """PASS / WARN / FAIL and one line saying why (docs/eval.md lists the rules)."""
    t, fails, warns = r.thresholds, [], []
    if not math.isfinite(r.ppl):
        fails.append("the quantized model's log-probabilities are not finite")
    if r.ppl_increase is not None and math.isfinite(r.ppl):
        msg = f"perplexity {100 * r.ppl_increase:+.1f}% vs the reference"
        if r.ppl_increase > t.fail_ppl:
            fails.append(f"{msg} (fail above +{100 * t.fail_ppl:g}%)")
        elif r.ppl_increase > t.warn_ppl:
            warns.append(f"{msg} (warn above +{100 * t.warn_ppl:g}%)")
    if r.top1_agreement is not None:
        msg = f"top-1 agreement {r.top1_agreement:.3f}"
        if r.top1_agreement < t.fail_agreement:
            fails.append(f"{msg} (fail below {t.fail_agreement:g})")
        elif r.top1_agreement < t.warn_agreement:
            warns.append(f"{msg} (warn below {t.warn_agreement:g})")
    bad = [g for g in r.generations if g.degenerate]
    if bad:
        kinds = sorted({f for g in bad for f in g.flags if f not in g.reference_flags})
        msg = f"{len(bad)} of {len(r.generations)} generations degenerate ({', '.join(kinds)})"
        # a minority is a WARN: once a greedy continuation leaves the reference's text, a small
        # model can fall into a loop the reference happened to miss (SmolLM2 wint8 did on 1 of
        # 3 with KL 0.003); broken checkpoints degenerate on most prompts
        (fails if 2 * len(bad) > len(r.generations) else warns).append(msg)
    if fails or warns:
        return ("FAIL" if fails else "WARN"), "; ".join(fails + warns)
    parts = [f"perplexity {100 * r.ppl_increase:+.1f}%" if r.ppl_increase is not None else
             f"perplexity {r.ppl:.2f} (no reference)"]
    if r.top1_agreement is not None:
        parts.append(f"top-1 agreement {r.top1_agreement:.3f}")
    return "PASS", ", ".join(parts + ["no degenerate generations"])
