"""The native engine's scheduler and KV cache: chunked prefill, mixed prefill/decode steps,
queueing and preemption when the cache is full, and requests that can never fit."""

from __future__ import annotations

import pytest

import q
from q.errors import OptionError
from q.generation import SamplingParams

from .engine_reference import greedy_transformers, transformers_reference

BLOCK = 64


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(layers=2)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 131 + 17 * i) % 500 + 2 for i in range(n)]


def solo(session, ids, max_tokens):
    return session.generate([ids], max_tokens=max_tokens, ignore_eos=True)[0].token_ids


def all_blocks_free(session) -> bool:
    allocator = session.scheduler.allocator
    return allocator.num_free == allocator.num_blocks


def test_long_prompts_are_chunked_and_match_transformers(model):
    """A 150-token prompt in steps of 32 tokens: its keys reach the cache chunk by chunk
    and later chunks attend over earlier ones through the paged path."""
    session = q.load_engine(model, dtype="float32", max_step_tokens=32)
    ids = prompt(150)
    ref = transformers_reference(model)
    assert solo(session, ids, 10) == greedy_transformers(ref, ids, 10)
    steps = []
    rid = session.add_request(ids, SamplingParams(max_tokens=2, ignore_eos=True))
    while session.has_unfinished():
        outs = session.step()
        steps.append(([n for _, _, n in session.scheduler.last_step.work],
                      [o.request_id for o in outs]))
    # ceil(150 / 32) = 5 prompt steps, the last one samples the first token; then one decode
    assert steps == [([32], [])] * 4 + [([22], [rid]), ([1], [rid])]
    assert all_blocks_free(session)


def test_a_new_prompt_runs_in_one_step_with_the_decoding_batch(model):
    """Time to first token does not wait for running requests: a newcomer's whole prompt
    and every running request's next token go through the same forward pass."""
    session = q.load_engine(model, dtype="float32")
    running = [session.add_request(prompt(20, s), SamplingParams(max_tokens=40,
                                                                 ignore_eos=True))
               for s in range(6)]
    for _ in range(3):
        session.step()
    late = session.add_request(prompt(100, 9), SamplingParams(max_tokens=3, ignore_eos=True))
    outs = session.step()
    assert {o.request_id for o in outs} == {*running, late}
    work = session.scheduler.last_step
    assert sorted(n for _, _, n in work.work) == [1] * 6 + [100]
    while session.has_unfinished():
        session.step()


def test_a_full_cache_queues_then_preempts_and_loses_nothing(model):
    """Three blocks of cache for four requests that each grow past one block: requests wait
    for blocks, and a decoding request that finds none free pushes the youngest one back to
    the queue; every request still ends with exactly the tokens it gets alone."""
    session = q.load_engine(model, dtype="float32", kv_cache_tokens=3 * BLOCK)
    assert session.cache.tokens == 3 * BLOCK
    prompts = [prompt(50, s) for s in range(4)]
    alone = [solo(session, p, 60) for p in prompts]
    got = {}
    ids = [session.add_request(p, SamplingParams(max_tokens=60, ignore_eos=True))
           for p in prompts]
    most_running = 0
    while session.has_unfinished():
        for out in session.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        most_running = max(most_running, session.num_running)
    assert [got[i] for i in ids] == alone
    assert most_running == 3  # one block each for the prompts; the fourth waited
    assert session.scheduler.preemptions > 0
    assert all_blocks_free(session)


def test_a_request_that_cannot_fit_is_refused_before_any_work(model):
    session = q.load_engine(model, kv_cache_tokens=2 * BLOCK)
    with pytest.raises(OptionError, match=r"needs 160 tokens of KV cache \(prompt 100 \+ "
                                          r"max_tokens 60\) but the cache holds 128"):
        session.add_request(prompt(100), SamplingParams(max_tokens=60))
    assert not session.has_unfinished()
    session.add_request(prompt(100), SamplingParams(max_tokens=28))  # 128 fits exactly


def test_bad_cache_and_batch_options(model):
    with pytest.raises(OptionError, match="kv_cache_tokens must be at least 64"):
        q.load_engine(model, kv_cache_tokens=10)
    with pytest.raises(OptionError, match="kv_cache_memory is a fraction"):
        q.load_engine(model, kv_cache_memory=2.0)
    with pytest.raises(OptionError, match="max_batch .0. and max_step_tokens"):
        q.load_engine(model, max_batch=0)


def test_abort_mid_prompt_frees_its_blocks(model):
    session = q.load_engine(model, dtype="float32", max_step_tokens=16)
    rid = session.add_request(prompt(120), SamplingParams(max_tokens=5))
    session.step()
    assert not all_blocks_free(session)
    session.abort(rid)
    outs = session.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "abort")]
    assert all_blocks_free(session) and not session.has_unfinished()


def test_server_answers_400_when_the_kv_cache_cannot_hold_a_request(model):
    import httpx

    from tests.server_fixtures import running_server

    session = q.load_engine(model, kv_cache_tokens=2 * BLOCK)
    with running_server(session) as (url, _):
        body = {"model": "m", "prompt": prompt(100), "max_tokens": 60}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400
        assert "needs 160 tokens of KV cache" in r.json()["error"]["message"]
        # without max_tokens the server asks for what the cache has room for
        body.pop("max_tokens")
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2 * BLOCK - 100
