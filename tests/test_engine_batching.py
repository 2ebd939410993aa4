"""Continuous batching, sampling, stop strings and streaming of the native engine."""

from __future__ import annotations

import logging

import pytest
import torch

import q
from q.generation import SamplingParams, StopStringDetector


@pytest.fixture(scope="module")
def session(tiny_llama):
    return q.load_engine(tiny_llama(layers=2), scheme="fp8-dynamic", dtype="float32")


PROMPTS = [[5, 6, 7], [9], [300, 301, 302, 303, 304, 305], [42, 43]]


def assert_all_blocks_free(session):
    allocator = session.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks


def _solo(session, prompt, **kw):
    return session.generate([prompt], ignore_eos=True, **kw)[0].token_ids


def test_batched_equals_one_at_a_time(session):
    solo = [_solo(session, p, max_tokens=10) for p in PROMPTS]
    batched = session.generate(PROMPTS, max_tokens=10, ignore_eos=True)
    assert [b.token_ids for b in batched] == solo


def test_requests_join_and_leave_a_running_batch(session):
    solo = {i: _solo(session, p, max_tokens=4 + 3 * i) for i, p in enumerate(PROMPTS)}
    params = [SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True) for i in range(4)]
    got: dict[str, list[int]] = {}
    ids = {session.add_request(PROMPTS[0], params[0]): 0}
    steps = 0
    while session.has_unfinished() or len(ids) < 4:
        if steps in (2, 3, 6) and len(ids) < 4:  # late joiners, mid-generation
            i = len(ids)
            ids[session.add_request(PROMPTS[i], params[i])] = i
        for out in session.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        steps += 1
        assert session.num_running <= 4
    assert {ids[r]: toks for r, toks in got.items()} == solo
    assert_all_blocks_free(session)  # every finished request gave its cache back


def test_abort_frees_the_slot_at_once(session):
    a = session.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    b = session.add_request(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    session.step()
    assert session.num_running == 2
    session.abort(a)
    outs = session.step()
    aborted = [o for o in outs if o.request_id == a]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert session.num_running == 1
    session.abort(b)
    session.step()
    assert not session.has_unfinished()


def test_max_batch_queues_the_rest(tiny_llama):
    session = q.load_engine(tiny_llama(), max_batch=2)
    for p in PROMPTS:
        session.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True))
    session.step()
    assert session.num_running == 2 and session.num_waiting == 2
    while session.has_unfinished():
        session.step()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(session):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = session.generate([PROMPTS[0]], params)[0].token_ids
    crowd = session.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], params)[0].token_ids
    assert alone == crowd
    other = session.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0,
                                                          seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(session):
    greedy = _solo(session, PROMPTS[2], max_tokens=8)
    assert _solo(session, PROMPTS[2], max_tokens=8, temperature=0.7, top_k=1, seed=1) == greedy
    assert _solo(session, PROMPTS[2], max_tokens=8, temperature=0.7, top_p=1e-6,
                 seed=1) == greedy


def test_top_k_and_top_p_filters():
    from q.plugins.engines.native.sampling import filtered_logits

    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = filtered_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [True, True, False, False, False]
    p = logits.softmax(-1)  # [0.636, 0.234, 0.086, ...]: top_p 0.8 needs the first two
    kept = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [True, True, False, False, False] and p[0] < 0.8 < p[:2].sum()


def test_logprobs_are_the_models_distribution(session):
    out = session.generate([PROMPTS[1]], max_tokens=3, ignore_eos=True, logprobs=2)[0]
    assert len(out.logprobs) == 3
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] and first.logprob == first.top[0][1]  # greedy
    assert len(first.top) == 2 and first.top[0][1] >= first.top[1][1]
    from .engine_reference import engine_logits

    logp = torch.log_softmax(engine_logits(session, PROMPTS[1])[-1], -1)
    assert abs(float(logp[first.token_id]) - first.logprob) < 1e-4


class _CharTokenizer:
    """Each token id is one character (0 -> 'a', ...); 25 -> a 2-byte char split in halves."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(chr(ord("a") + i) for i in ids if i < 25)
        return text + ("\ufffd" if ids and ids[-1] == 25 else "")


def _run(detector, ids):
    pieces, stopped = [], False
    for n in range(1, len(ids) + 1):
        text, stopped = detector.update(ids[:n], final=n == len(ids))
        pieces.append(text)
        if stopped:
            break
    return pieces, stopped


def test_stop_string_spanning_tokens_is_held_back_and_cut():
    # "abcxyd": stop "xy" spans two tokens; "x" must not be emitted before "y" decides
    pieces, stopped = _run(StopStringDetector(_CharTokenizer(), ("xy",)), [0, 1, 2, 23, 24, 3])
    assert stopped and "".join(pieces) == "abc" and "x" not in "".join(pieces)
    assert pieces[3] == ""  # the step that produced "x" emitted nothing


def test_partial_stop_that_does_not_match_is_released():
    pieces, stopped = _run(StopStringDetector(_CharTokenizer(), ("xy",)), [0, 23, 1])
    assert not stopped and pieces == ["a", "", "xb"]


def test_incomplete_utf8_is_held_back():
    pieces, _ = _run(StopStringDetector(_CharTokenizer(), ()), [0, 25, 1])
    assert pieces[1] == "" and "\ufffd" not in "".join(pieces[:2])


def test_detokenization_decodes_a_bounded_window():
    """Each step decodes a few tokens, not the whole completion (was O(n^2))."""
    class Counting(_CharTokenizer):
        longest = 0

        def decode(self, ids, skip_special_tokens=True):
            Counting.longest = max(Counting.longest, len(ids))
            return super().decode(ids)

    ids = [i % 24 for i in range(2000)]
    pieces, _ = _run(StopStringDetector(Counting(), ("zz",)), ids)
    assert "".join(pieces) == _CharTokenizer().decode(ids)
    assert Counting.longest <= 3


def test_incremental_text_equals_full_decode_on_a_real_tokenizer():
    """SmolLM2's byte-level BPE, text with multi-byte characters split across tokens."""
    from transformers import AutoTokenizer

    import q

    tok = AutoTokenizer.from_pretrained(q.default_model())
    text = "Grüße aus 東京 🚀🎉 — naïve café, ünïcödé; emoji 👩‍💻 end.\n\tTabs  and  spaces"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces, _ = _run(StopStringDetector(tok, ()), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a character split across tokens was held back a step


def test_stop_string_in_generation(session):
    full = session.generate([PROMPTS[0]], max_tokens=8, ignore_eos=True)[0]
    words = full.text.split()
    stop = words[3]
    out = session.generate([PROMPTS[0]], max_tokens=8, ignore_eos=True, stop=[stop])[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert full.text.startswith(out.text)


def test_stream_yields_tokens_as_they_come(session):
    outs = list(session.stream(PROMPTS[0], max_tokens=5, ignore_eos=True))
    assert len(outs) == 5 and outs[-1].finished and not outs[0].finished
    assert "".join(o.text for o in outs) == \
        session.generate([PROMPTS[0]], max_tokens=5, ignore_eos=True)[0].text


def test_stopping_a_stream_early_frees_its_slot(session):
    stream = session.stream(PROMPTS[0], max_tokens=40, ignore_eos=True)
    next(stream)
    stream.close()
    session.step()
    assert not session.has_unfinished() and session.num_running == 0


def test_pipeline_strings_and_chat(tiny_llama):
    llm = q.pipeline(tiny_llama(), dtype="float32")
    one = llm("w5 w6 w7", max_tokens=4, ignore_eos=True)
    many = llm(["w5 w6 w7", "w9"], max_tokens=4, ignore_eos=True)
    assert isinstance(one, q.Completion) and one.text == many[0].text
    assert len(one.text.split()) == 4 and one.prompt == "w5 w6 w7"
    chat = llm.chat([{"role": "user", "content": "w5"}], max_tokens=3, ignore_eos=True)
    assert len(chat.token_ids) == 3


def test_cli_generate(tiny_llama):
    from click.testing import CliRunner

    from q.cli import _build

    result = CliRunner().invoke(_build(), ["generate", str(tiny_llama()), "-p", "w5 w6",
                                           "--max-tokens", "4", "--scheme", "wint8"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()[-1].split()) == 4
    bad = CliRunner().invoke(_build(), ["generate", str(tiny_llama()), "-p", "w5",
                                        "--top-p", "0"])
    assert bad.exit_code != 0 and "top_p" in str(bad.exception or bad.output)


def test_cli_engine_options_reach_the_engine(tiny_llama, caplog):
    from click.testing import CliRunner

    from q.cli import _build

    args = ["generate", str(tiny_llama()), "-p", "w5 w6", "--max-tokens", "4"]
    with caplog.at_level(logging.INFO, logger="q.engine"):
        result = CliRunner().invoke(_build(), args + ["--dtype", "float32",
                                                      "--kv-cache-tokens", "128"])
    assert result.exit_code == 0, result.output
    loaded = [r.getMessage() for r in caplog.records if "KV cache" in r.getMessage()]
    assert "float32 compute" in loaded[-1] and "KV cache 128 tokens" in loaded[-1]
    small = CliRunner().invoke(_build(), args + ["--kv-cache-tokens", "64", "--max-tokens",
                                                 "100"])
    assert small.exit_code != 0 and "tokens of KV cache (prompt" in str(small.exception)
    other = CliRunner().invoke(_build(), args + ["--engine", "vllm", "--dtype", "float32"])
    assert other.exit_code != 0
    assert "--dtype: options of the native engine, not of --engine vllm" in str(other.exception)
    # --woq-activations reaches the loader: int8 weight groups are refused by layer name
    grouped = CliRunner().invoke(_build(), args + ["--scheme", "wint8", "--arg",
                                                   "group_size=64", "--woq-activations", "int8"])
    assert grouped.exit_code != 0
    assert "woq_activations int8 cannot run this layer" in str(grouped.exception)
