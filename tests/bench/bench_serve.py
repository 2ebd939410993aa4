"""Serving throughput and latency of ``q serve`` on SmolLM2 (CPU), against the engine direct.

The server runs in this process (uvicorn on a free port in a thread, as in the tests:
tests/server_fixtures.running_server) over one native-engine session. For each concurrency C,
C asyncio clients (httpx) send streaming completions back to back, sharing a fixed list of
``max(C * --requests-per-client, --min-requests)`` requests: temperature 0, ``ignore_eos`` so
each generates exactly ``--max-tokens`` tokens, every prompt a distinct ``--prompt-tokens``
slice of a real text (Botchan). Reported per C: output tokens/s (generated tokens / wall time
of the whole run), p50 and p99 request latency, p50 time to first token, and the speedup over
C=1 (the one-client-at-a-time baseline). The engine-direct baselines run the same prompts and
parameters through ``session.generate`` without HTTP: one at a time (batch 1) and in batches of
C. Server overhead = 1 - (server tok/s at C=1) / (engine tok/s at batch 1).

Targets (the serving issue): overhead under 5% at one client; 32 clients at least 4x the
throughput of one.

The clients share the process (and the GIL) with the server and the engine thread; torch
releases the GIL in its kernels, but on a small CPU box the client side is part of what is
measured. The engine-direct runs step the model from a non-main thread, as the server's
engine loop does (on a loaded CPU, torch's OpenMP workers are much slower when driven from the
main thread; that would flatter the server). Run on a quiet machine:

    Q_CACHE_DIR=... python tests/bench/bench_serve.py [--concurrency 1,8,32] [--max-tokens 64]
        [--requests-per-client 2] [--scheme fp8-block]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"


@dataclass
class Result:
    latency: float  # request sent -> [DONE]
    ttft: float  # request sent -> first generated text
    tokens: int  # completion tokens (from the final usage chunk)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); p99 of fewer than 100 values is the max."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def make_prompts(tokenizer, n: int, length: int) -> list[str]:
    from q.textdata import real_text

    ids = tokenizer(real_text("botchan")[5_000:]).input_ids
    if len(ids) < n * length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {n} prompts x {length}")
    return [tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(n)]


# --- the server, over HTTP ----------------------------------------------------------------------

async def one_request(client, url: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    if tokens != max_tokens:
        raise RuntimeError(f"generated {tokens} tokens, not {max_tokens} (ignore_eos)")
    return Result(latency, ttft if ttft is not None else latency, tokens)


async def run_clients(url: str, prompts: list[str], concurrency: int,
                      max_tokens: int) -> tuple[list[Result], float]:
    """``concurrency`` workers take the prompts from one queue, each request sent as soon as
    the worker's previous one finished; returns the results and the wall time."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker():
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, prompt, max_tokens))

        await one_request(client, url, prompts[0], 2)  # warm the connection and the engine
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


# --- the engine, direct ------------------------------------------------------------------------

def engine_rate(session, prompts: list[str], batch: int, max_tokens: int) -> float:
    """Generated tokens/s of ``session.generate`` over ``prompts`` in groups of ``batch``, run
    on a fresh thread as the server's engine loop is: on a busy CPU, torch's OpenMP team works
    measurably differently from the main thread than from another one (2x and more here), so
    both sides of the comparison step the model from a non-main thread."""
    out = []
    thread = threading.Thread(target=lambda: out.append(
        _engine_rate(session, prompts, batch, max_tokens)))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the engine-direct run failed (see the traceback above)")
    return out[0]


def _engine_rate(session, prompts, batch, max_tokens) -> float:
    from q.generation import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    session.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        done = session.generate(prompts[i:i + batch], params)
        tokens += sum(len(c.token_ids) for c in done)
    return tokens / (time.perf_counter() - start)


# --- main --------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,8,32",
                        help="comma-separated client counts (1 is always run: the baseline)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8,
                        help="at least this many requests per concurrency level")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--scheme", default="none",
                        help="online quantization scheme for the engine (default: none)")
    parser.add_argument("--no-engine-batches", action="store_true",
                        help="skip the engine-direct batch-C baselines (faster)")
    opts = parser.parse_args(argv)
    # C=1 is always run: the one-at-a-time baseline every speedup is against
    levels = sorted({1, *(int(c) for c in opts.concurrency.split(","))})

    sys.path.insert(0, str(ROOT / "tests"))
    import q
    import torch
    from server_fixtures import running_server

    scheme = None if opts.scheme in ("", "none") else opts.scheme
    model_dir = q.default_model()
    session = q.load_engine(model_dir, scheme=scheme, max_batch=max(32, max(levels)))
    counts = {c: max(c * opts.requests_per_client, opts.min_requests) for c in levels}
    prompts = make_prompts(session.tokenizer, max(counts.values()), opts.prompt_tokens)

    print(f"{Path(model_dir).name}, scheme {scheme or 'none (unquantized)'}, CPU, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; prompts {opts.prompt_tokens} tokens, "
          f"{opts.max_tokens} generated (ignore_eos, temperature 0)", flush=True)

    # engine direct first, while no server thread exists
    engine_b1 = engine_b1_before = engine_rate(session, prompts[:counts[1]], 1, opts.max_tokens)
    engine_bc = {1: engine_b1}
    if not opts.no_engine_batches:
        for c in levels:
            if c > 1:
                engine_bc[c] = engine_rate(session, prompts[:counts[c]], c, opts.max_tokens)

    rows = {}
    with running_server(session, model_name=MODEL,
                        max_tokens_limit=max(opts.max_tokens, 16)) as (url, _):
        for c in levels:
            results, wall = asyncio.run(run_clients(url, prompts[:counts[c]], c,
                                                    opts.max_tokens))
            rows[c] = (results, sum(r.tokens for r in results) / wall)
            print(f"  C={c}: {len(results)} requests in {wall:.1f} s", flush=True)
    # batch 1 again after the server runs: the faster of the two is the baseline, so a load
    # change during the run cannot make the overhead look smaller than it is
    engine_b1_after = engine_rate(session, prompts[:counts[1]], 1, opts.max_tokens)
    engine_b1 = engine_bc[1] = max(engine_b1, engine_b1_after)

    base = rows[1][1]
    print()
    print("| concurrency | requests | output tok/s | p50 latency (s) | p99 latency (s) "
          "| p50 TTFT (s) | speedup vs C=1 | engine direct tok/s (batch C) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        results, rate = rows[c]
        lat = [r.latency for r in results]
        ttft = [r.ttft for r in results]
        direct = f"{engine_bc[c]:.1f}" if c in engine_bc else "-"
        print(f"| {c} | {len(results)} | {rate:.1f} | {percentile(lat, 50):.2f} "
              f"| {percentile(lat, 99):.2f} | {percentile(ttft, 50):.3f} | {rate / base:.2f}x "
              f"| {direct} |")
    overhead = 1 - base / engine_b1
    print()
    print(f"server overhead at 1 client: {overhead:+.1%} (server {base:.1f} tok/s, engine "
          f"direct batch 1 {engine_b1:.1f} tok/s, the faster of {engine_b1_before:.1f} before "
          f"and {engine_b1_after:.1f} after the server runs); target < 5%: "
          f"{'met' if overhead < 0.05 else 'NOT met'}")
    top = max(levels)
    speedup = rows[top][1] / base
    verdict = ("met" if speedup >= 4 else "NOT met") if top >= 32 else \
        f"not measured (the largest level run is {top} clients)"
    print(f"throughput at {top} clients: {speedup:.2f}x that of 1 client; target >= 4x at 32 "
          f"clients: {verdict}")


if __name__ == "__main__":
    main()
