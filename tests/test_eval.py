"""``q eval`` / ``q.evaluate``: metrics, verdict, model card and bad inputs.

Fast tests run on the tiny random Llama (word-level tokenizer, words "w0".."w509"); the
slow ones evaluate real SmolLM2 checkpoints, one of them deliberately broken (every weight
scale doubled), which must FAIL.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import q
from q.errors import CheckpointError, OptionError
from q.evaluate import (EvalReport, Generation, LayerError, Thresholds, degenerate_flags,
                        evaluate, verdict)

TINY = dict(windows=3, window_len=48, generations=2, gen_tokens=12, progress=False)


def run_cli(*args):
    from q.cli import _build
    from q.cli import eval as eval_cli

    cli = _build()
    eval_cli.add_commands(cli)  # idempotent once core/cli/__init__.py registers it
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """A text file of 2,000 random tiny-tokenizer words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(510)}" for _ in range(2000)) + "\n")
    return path


def broken_copy(src, dst, factor=2.0):
    """A copy of a compressed-tensors checkpoint with every ``*.weight_scale`` multiplied."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    scales = [k for k in tensors if k.endswith(".weight_scale")]
    assert scales
    for k in scales:
        tensors[k] = tensors[k] * factor
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# --- tiny models ---------------------------------------------------------------------------


def test_model_against_itself_is_perfect(tiny_llama, words):
    model = tiny_llama()
    r = evaluate(model, model, text=words, **TINY)
    assert r.ppl_increase == 0.0 and r.ppl == r.ref_ppl
    assert abs(r.kl_mean) < 1e-6 and r.top1_agreement == 1.0
    assert r.verdict == "PASS", r.reason
    assert r.format == "unquantized" and r.layers == []
    assert [g.prefix_match for g in r.generations] == [1.0, 1.0]
    assert (r.windows, r.window_len) == (3, 48)


def test_online_scheme_uses_model_as_reference(tiny_llama, words):
    r = evaluate(tiny_llama(), text=words, scheme="wint8", **TINY)
    assert r.reference == str(tiny_llama()) and r.format == "online wint8"
    assert len(r.layers) == 7 and all(0 < e.isolated < 0.05 for e in r.layers)
    assert r.layers == sorted(r.layers, key=lambda e: -e.isolated)
    assert r.verdict == "PASS", r.reason
    assert r.kl_mean < 1e-3 and r.top1_agreement > 0.9


def test_fp16_reference_store_when_over_budget(tiny_llama, words):
    model = tiny_llama()
    r = evaluate(model, model, text=words, reference_budget=0, **TINY)
    assert r.reference_store == "float16" and r.top1_agreement == 1.0
    assert abs(r.kl_mean) < 1e-3 and r.verdict == "PASS"


def test_cli_json_has_every_field(tiny_llama, words, tmp_path):
    out = tmp_path / "w8"
    q.quantize(tiny_llama(), "wint8", out)
    report = tmp_path / "r.json"
    res = run_cli(out, "--reference", tiny_llama(), "--text", words, "--windows", 3,
                  "--window-len", 48, "--generations", 2, "--gen-tokens", 12,
                  "--json", report)
    assert res.exit_code == 0, res.output
    assert "verdict: PASS" in res.output and "top-1 agreement" in res.output
    data = json.loads(report.read_text())
    for key in ("model", "reference", "format", "text", "windows", "window_len", "ppl",
                "ref_ppl", "ppl_increase", "kl_mean", "kl_p95", "top1_agreement", "layers",
                "generations", "thresholds", "verdict", "reason", "degenerate", "broken",
                "suggested_ignore", "card", "seconds", "reference_store", "notes"):
        assert key in data, key
    assert data["format"] == "compressed-tensors" and len(data["layers"]) == 7
    assert set(data["layers"][0]) == {"name", "isolated", "in_model", "flagged"}
    assert set(data["generations"][0]) >= {"prompt", "text", "flags", "reference_text",
                                           "reference_flags", "prefix_match", "degenerate"}
    assert data["card"] == str(out / "README.md")
    assert "## q eval" in (out / "README.md").read_text()


def test_cli_fails_broken_checkpoint_with_exit_3(tiny_llama, words, tmp_path):
    good = tmp_path / "w8"
    q.quantize(tiny_llama(), "wint8", good)
    bad = broken_copy(good, tmp_path / "broken")
    res = run_cli(bad, "--reference", tiny_llama(), "--text", words, "--windows", 3,
                  "--window-len", 48, "--generations", 2, "--gen-tokens", 12, "--no-card",
                  "--json", "-")
    assert res.exit_code == 3, res.output
    data = json.loads(res.stdout)
    assert data["verdict"] == "FAIL" and "agreement" in data["reason"]
    assert all(e["flagged"] and abs(e["isolated"] - 1) < 0.01 for e in data["layers"])
    assert data["suggested_ignore"] == []  # ignoring layers cannot fix this
    assert any("looks broken" in n for n in data["notes"])
    assert not (bad / "README.md").exists()


def test_no_reference_checks_perplexity_and_generations(tiny_llama, words, tmp_path):
    out = tmp_path / "w8"
    q.quantize(tiny_llama(), "wint8", out)
    (out / "q_manifest.json").unlink()  # no recorded source: nothing to compare with
    r = evaluate(out, text=words, **TINY)
    assert r.reference is None and r.kl_mean is None and r.layers == []
    assert r.verdict == "PASS" and "no reference" in r.reason
    assert any("--reference" in n for n in r.notes)


def test_reference_defaults_to_manifest_source(tiny_llama, words, tmp_path):
    out = tmp_path / "w8"
    q.quantize(tiny_llama(), "wint8", out)
    r = evaluate(out, text=words, **TINY)
    assert r.reference == str(tiny_llama()) and r.top1_agreement is not None


# --- bad inputs ----------------------------------------------------------------------------


def test_reference_missing_or_not_a_model(tiny_llama, words, tmp_path):
    with pytest.raises(CheckpointError, match="the reference .*nope does not exist"):
        evaluate(tiny_llama(), tmp_path / "nope", text=words, **TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory .no config.json"):
        evaluate(tiny_llama(), tmp_path / "empty", text=words, **TINY)
    res = run_cli(tiny_llama(), "--reference", tmp_path / "nope", "--text", words)
    assert isinstance(res.exception, CheckpointError)


def test_bad_text_files(tiny_llama, tmp_path):
    model = tiny_llama()
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(OptionError, match="empty.txt is empty"):
        evaluate(model, model, text=empty, **TINY)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("w1 w2 caf\xe9 w3".encode("latin-1"))
    with pytest.raises(OptionError, match=r"not UTF-8 \(byte 0xe9 at offset 9\)"):
        evaluate(model, model, text=latin, **TINY)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5")
    with pytest.raises(OptionError, match="has 5 tokens; one window needs 48"):
        evaluate(model, model, text=short, **TINY)
    with pytest.raises(OptionError, match="cannot read"):
        evaluate(model, model, text=tmp_path / "missing.txt", **TINY)


def test_fewer_windows_than_asked_is_a_note(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 500}" for i in range(100)))
    r = evaluate(tiny_llama(), tiny_llama(), text=text, **{**TINY, "window_len": 40})
    assert r.windows == 2 and any("only 2 windows" in n for n in r.notes)


def test_tokenizer_mismatch(tiny_llama, words, tmp_path):
    from .conftest import save_tiny_tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_llama(), other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    save_tiny_tokenizer(other, vocab_size=256)
    with pytest.raises(CheckpointError, match="tokenizers differ: .* 512 tokens, .* 256"):
        evaluate(tiny_llama(), other, text=words, **TINY)


def test_bad_options(tiny_llama, words):
    with pytest.raises(OptionError, match="warn ppl"):
        evaluate(tiny_llama(), tiny_llama(), text=words,
                 thresholds=Thresholds(warn_ppl=0.5, fail_ppl=0.1), **TINY)
    with pytest.raises(OptionError, match="longer than the model's context"):
        evaluate(tiny_llama(), tiny_llama(), text=words, **{**TINY, "window_len": 10**6})


def test_scheme_on_a_checkpoint_is_refused_early(tiny_llama, words, tmp_path):
    q.quantize(tiny_llama(), "wint8", tmp_path / "w8")
    with pytest.raises(OptionError, match="already quantized; drop --scheme"):
        evaluate(tmp_path / "w8", text=words, scheme="wint4", **TINY)


def test_other_engines(tiny_llama, words, tmp_path, monkeypatch):
    from q.errors import QError

    with pytest.raises(OptionError, match="does not quantize online"):
        evaluate(tiny_llama(), text=words, scheme="wint4", engine="vllm", **TINY)
    monkeypatch.setenv("Q_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(QError, match="no-python does not exist; install vLLM"):
        evaluate(tiny_llama(), tiny_llama(), text=words, engine="vllm", **TINY)
    result = run_cli(tiny_llama(), "--engine", "vllm", "--vllm-python", tmp_path / "none",
                     "--text", words)
    assert isinstance(result.exception, QError)
    assert "none does not exist; install vLLM" in str(result.exception)


# --- pieces --------------------------------------------------------------------------------


def test_degenerate_flags():
    assert degenerate_flags([5, 6, 7, 8, 9, 10, 11, 12], "a normal sentence here") == []
    assert "empty" in degenerate_flags([], "")
    assert "one token repeated" in degenerate_flags([3] * 10 + [4, 5], "x x x")
    assert "loop of 3 tokens" in degenerate_flags([9, 8] + [1, 2, 3] * 6, "a b c a b c")
    # two repetitions of a long phrase is how small models talk, not a loop
    assert degenerate_flags(list(range(20)) + list(range(10, 20)), "text") == []
    assert "garbage characters" in degenerate_flags(list(range(10)), "ok \x00\x01\x02\ufffd")


def _report(**kw) -> EvalReport:
    base = dict(model="m", reference="r", format="f", text="t", windows=1, window_len=8,
                ppl=10.0, ref_ppl=10.0, ppl_increase=0.0, top1_agreement=1.0)
    return EvalReport(**{**base, **kw})


def test_verdict_thresholds():
    assert verdict(_report())[0] == "PASS"
    assert verdict(_report(ppl_increase=0.06)) == (
        "WARN", "perplexity +6.0% vs the reference (warn above +5%)")
    assert verdict(_report(ppl_increase=0.3))[0] == "FAIL"
    assert verdict(_report(top1_agreement=0.85))[0] == "WARN"
    assert verdict(_report(top1_agreement=0.7))[0] == "FAIL"
    assert verdict(_report(ppl=float("nan"), ppl_increase=float("nan")))[0] == "FAIL"
    loose = Thresholds(warn_ppl=0.5, fail_ppl=1.0)
    assert verdict(_report(ppl_increase=0.3, thresholds=loose))[0] == "PASS"
    looping = Generation("p", "a a a", ["loop of 1 tokens"])
    assert verdict(_report(generations=[looping])) == (
        "FAIL", "1 of 1 generations degenerate (loop of 1 tokens)")
    fine = Generation("p", "a b c", [])
    assert verdict(_report(generations=[looping, fine, fine])) == (
        "WARN", "1 of 3 generations degenerate (loop of 1 tokens)")
    assert verdict(_report(generations=[looping, looping, fine]))[0] == "FAIL"
    # the reference loops the same way: the model's habit, not quantization damage
    same = Generation("p", "a a a", ["loop of 1 tokens"], "a a a", ["loop of 1 tokens"])
    assert verdict(_report(generations=[same]))[0] == "PASS"


def test_suggested_ignore():
    layers = [LayerError("a", 0.5, 0.6, True), LayerError("b", 0.1, 0.2, False),
              LayerError("c", 0.05, 0.1, False)]
    assert _report(layers=layers).suggested_ignore == ["a"]
    quiet = [LayerError(e.name, e.isolated, e.in_model) for e in layers]
    assert _report(layers=quiet).suggested_ignore == []
    assert _report(layers=quiet, verdict="WARN").suggested_ignore == ["a", "b", "c"]
    broken = [LayerError(e.name, 1.0, 1.0, True) for e in layers]
    assert _report(layers=broken).broken and _report(layers=broken).suggested_ignore == []


def test_card_replaces_only_its_own_section(tmp_path):
    from q.cli.eval import write_card

    readme = tmp_path / "README.md"
    readme.write_text("# Model\n\nintro\n\n## q eval\n\nold numbers\n\n## License\n\nMIT\n")
    (tmp_path / "other.txt").write_text("keep")
    r = _report(layers=[LayerError("model.layers.0.mlp.down_proj", 0.5, 0.7, True)],
                verdict="WARN", reason="because")
    assert write_card(tmp_path, r) == str(readme)
    text = readme.read_text()
    assert text.count("## q eval") == 1 and "old numbers" not in text
    assert text.startswith("# Model\n\nintro\n\n## q eval\n")
    assert text.endswith("## License\n\nMIT\n")
    assert "**Verdict: WARN**: because" in text
    assert "| model.layers.0.mlp.down_proj | 0.5000 | 0.7000 |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other.txt"]
    assert write_card(tmp_path, r) == str(readme) and readme.read_text() == text  # stable


def test_card_not_written_where_it_cannot_be(tmp_path, monkeypatch, caplog):
    from q.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli.os, "access", lambda path, mode: False)
    assert eval_cli.write_card(tmp_path, _report()) is None
    assert "not writable" in caplog.text and not (tmp_path / "README.md").exists()


def test_import_q_does_not_load_model_code():
    import subprocess
    import sys

    code = "import q, q.evaluate, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.stdout.strip() == "False", out.stderr


# --- SmolLM2 (slow) ----------------------------------------------------------------------------

SMALL = dict(windows=4, window_len=128, generations=2, gen_tokens=8, progress=False)


@pytest.fixture(scope="module")
def smollm2():
    from q.embedded import default_model

    return default_model()


@pytest.fixture(scope="module")
def wint8(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-smollm2") / "wint8"
    q.quantize(smollm2, "wint8", out)
    return out


@pytest.mark.slow
def test_smollm2_wint8_passes_and_writes_card(smollm2, wint8):
    from q.cli.eval import write_card

    r = evaluate(wint8, smollm2, **SMALL)
    assert r.verdict == "PASS", r.reason
    assert r.text.startswith("lee") and (r.windows, r.window_len) == (4, 128)
    assert abs(r.ppl_increase) < 0.03 and r.top1_agreement > 0.9 and r.kl_mean < 0.02
    assert len(r.layers) == 210 and not any(e.flagged for e in r.layers)
    assert write_card(wint8, r) == str(wint8 / "README.md")
    card = (wint8 / "README.md").read_text()
    assert "## q eval" in card and "**Verdict: PASS**" in card


@pytest.mark.slow
def test_smollm2_doubled_scales_fail(smollm2, wint8, tmp_path):
    bad = broken_copy(wint8, tmp_path / "broken")
    res = run_cli(bad, "--reference", smollm2, "--windows", 4, "--window-len", 128,
                  "--generations", 2, "--gen-tokens", 8, "--json", tmp_path / "r.json")
    assert res.exit_code == 3, res.output
    assert "verdict: FAIL" in res.output and "looks broken" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ppl_increase"] > 1 and data["top1_agreement"] < 0.5
    flagged = [e for e in data["layers"] if e["flagged"]]
    assert len(flagged) == 210 and min(e["isolated"] for e in flagged) > 0.9
    assert "**Verdict: FAIL**" in (bad / "README.md").read_text()
