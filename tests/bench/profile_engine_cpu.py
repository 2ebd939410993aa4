"""Where a decode step of the native engine spends its time on CPU: torch's profiler over
10 decode steps, the top ops by self CPU time.

    python tests/bench/profile_engine_cpu.py --requests 1      # SmolLM2 (the default model)
    python tests/bench/profile_engine_cpu.py --requests 32 --model CKPT
    python tests/bench/profile_engine_cpu.py --prefill          # one step of 8 x 256 prompt tokens

Prompts are 256 tokens; the first 10 steps (prefill, then decode) run unprofiled. The
step time printed includes the profiler's overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

import q
from q.generation import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2)")
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--rows", type=int, default=22)
    ap.add_argument("--prefill", action="store_true",
                    help="profile one step of 8 fresh 256-token prompts (2048 tokens) instead")
    args = ap.parse_args()
    session = q.load_engine(args.model or q.default_model())
    if args.prefill:
        return profile_prefill(session, args.rows)
    for i in range(args.requests):
        session.add_request(list(range(100 + i, 356 + i)),
                            SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(10):
        session.step()
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(10):
            session.step()
        elapsed = time.perf_counter() - start
    print(f"{args.requests} requests: {elapsed / 10 * 1e3:.1f} ms per decode step (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def profile_prefill(session, rows: int) -> None:
    """One 2048-token step of 8 new prompts, after two such steps unprofiled (warm-up)."""
    for round_ in range(3):
        for i in range(8):
            session.add_request(list(range(100 * round_ + i, 100 * round_ + i + 256)),
                                SamplingParams(max_tokens=1, ignore_eos=True))
        if round_ == 2:
            with profile() as prof:
                start = time.perf_counter()
                session.step()
                elapsed = time.perf_counter() - start
        while session.has_unfinished():
            session.step()
    print(f"prefill step of 8 x 256 tokens: {elapsed * 1e3:.0f} ms (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
