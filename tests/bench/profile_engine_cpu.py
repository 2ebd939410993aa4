"""Where a decode step of the native engine spends its time on CPU: torch's profiler over
10 decode steps, the top ops by self CPU time.

    python tests/bench/profile_engine_cpu.py --requests 1      # SmolLM2 (the default model)
    python tests/bench/profile_engine_cpu.py --requests 32 --model CKPT
    python tests/bench/profile_engine_cpu.py --prefill          # one step of 8 x 256 prompt tokens
    python tests/bench/profile_engine_cpu.py --requests 32 --parts  # wall time per part
    python tests/bench/profile_engine_cpu.py --prefill --parts  # the same, 8 x 256 prompts
    ... --prefill --parts --prompts 1 --model CKPT  # the lone request's 256-token prompt
    python tests/bench/profile_engine_cpu.py --phases  # the engine bench's workload: prefill vs decode
    python tests/bench/profile_engine_cpu.py --prefill --parts --glibc-defaults  # malloc A/B
    python tests/bench/profile_engine_cpu.py --prefill --parts --torch-silu  # SiLU x up A/B
    python tests/bench/profile_engine_cpu.py --loop 2000 --model CKPT  # for `perf record -p PID`
    ... --no-replay    # decode steps through the decoder forward, not replayed programs
    ... --ab-call-runner 5 --loop 300 --requests 1 --model CKPT  # C++ runs vs one ctypes call
        # per kernel call, alternated in one process (5 rounds of 300 steps each way)

Prompts are 256 tokens; the first 10 steps (prefill, then decode) run unprofiled. The
step time printed includes the profiler's overhead. torch's profiler does not see the C++
kernels q calls through ctypes (decode attention, the decoder's elementwise ops): ``--parts``
times instead each part of the engine's own decoder forward (decoder.py) with a wall clock
over 20 decode steps (with ``--prefill``: over 3 steps of 8 fresh prompts), no profiler;
decode steps then run the forward, not the replayed programs (decode_program.py), whose
calls it cannot see. ``--loop N`` prints the process id, runs N decode steps with no
profiler (time to attach ``perf record -g -p PID``) and prints the step time, split into
the replayed program and the rest of the step. ``--phases`` runs bench_engine_vs_vllm.py's
workload (32 prompts of 256 tokens, 64 new tokens each, greedy) twice and splits each
run's wall time into the steps that carry prompt tokens and the decode-only steps.
``--ab-call-runner ROUNDS`` (with ``--loop N``) alternates replayed steps with the C++
call runner and with each bound call made from Python (kernels/bound_calls.py).
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
    ap.add_argument("--prompts", type=int, default=8,
                    help="with --prefill --parts: fresh 256-token prompts per step (1: the "
                         "lone request's first step)")
    ap.add_argument("--prefill", action="store_true",
                    help="profile one step of 8 fresh 256-token prompts (2048 tokens) instead")
    ap.add_argument("--parts", action="store_true",
                    help="wall time per part of q's decoder forward instead of the profiler")
    ap.add_argument("--phases", action="store_true",
                    help="prefill and decode time of the 32-request engine bench workload")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc's malloc policy as it is (the engine otherwise keeps a "
                         "step's freed memory: native.reuse_freed_memory); run with and "
                         "without it for the A/B behind that function's thresholds")
    ap.add_argument("--torch-silu", action="store_true",
                    help="SiLU x up as torch's two ops (decoder_ops.reference.silu_mul, the "
                         "forward's before the C++ pass), for an A/B with --parts")
    ap.add_argument("--loop", type=int, default=0, metavar="N",
                    help="run N decode steps unprofiled, after printing the process id")
    ap.add_argument("--no-replay", action="store_true",
                    help="decode steps through the decoder forward (no replayed programs)")
    ap.add_argument("--ab-call-runner", type=int, default=0, metavar="ROUNDS",
                    help="with --loop N: replayed decode steps with the C++ call runner and "
                         "with each bound call from Python, N steps each way per round")
    args = ap.parse_args()
    if args.glibc_defaults:
        from q.plugins.engines import native

        native.reuse_freed_memory = lambda: None
    session = q.load_engine(args.model or q.default_model())
    if args.no_replay or args.parts:
        forward = session.runner.forward
        if getattr(forward, "programs", None) is not None:
            forward.programs = None
    if args.torch_silu:
        import types

        from q.kernels.decoder_ops import reference

        forward = session.runner.forward
        forward.ops = types.SimpleNamespace(**{**vars(forward.ops),
                                               "silu_mul": reference.silu_mul})
    if args.loop and args.ab_call_runner:
        return ab_call_runner(session, args.requests, args.loop, args.ab_call_runner)
    if args.loop:
        return loop(session, args.requests, args.loop)
    if args.parts:
        return time_parts(session, args.requests, args.prefill, args.prompts)
    if args.prefill:
        return profile_prefill(session, args.rows)
    if args.phases:
        return time_phases(session)
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


def loop(session, requests: int, steps: int) -> None:
    """``steps`` decode steps of ``requests`` requests, nothing else running: what a
    sampling profiler attached from outside sees."""
    import os

    for i in range(requests):
        session.add_request(list(range(100 + i, 356 + i)),
                            SamplingParams(max_tokens=steps + 20, ignore_eos=True))
    for _ in range(10):
        session.step()
    print(f"pid {os.getpid()}: {steps} decode steps of {requests} requests", flush=True)
    from q.plugins.engines.native.decode_program import DecodeProgram

    inside, run = [0.0], DecodeProgram.run

    def timed(self, *args):  # the replayed program's share of the step
        start = time.perf_counter()
        try:
            return run(self, *args)
        finally:
            inside[0] += time.perf_counter() - start

    DecodeProgram.run = timed
    start = time.perf_counter()
    try:
        for _ in range(steps):
            session.step()
    finally:
        DecodeProgram.run = run
    step = (time.perf_counter() - start) / steps * 1e3
    print(f"{step:.2f} ms per decode step: {inside[0] / steps * 1e3:.2f} in the replayed "
          f"program, {step - inside[0] / steps * 1e3:.2f} outside it (scheduling, inputs, "
          "sampling)")


def ab_call_runner(session, requests: int, steps: int, rounds: int) -> None:
    """Replayed decode steps with their bound calls run by the C++ call runner (on) and
    one by one from Python (off), ``steps`` each way per round, the order flipped each
    round; the programs are rebuilt at each switch."""
    programs = session.runner.forward.programs
    if programs is None:
        raise SystemExit("this model's decode steps are not replayed (see the engine's log)")
    for i in range(requests):
        session.add_request(list(range(100 + i, 356 + i)), SamplingParams(
            max_tokens=2 * rounds * (steps + 5) + 100, ignore_eos=True))
    for _ in range(10):
        session.step()
    times = {True: [], False: []}
    for r in range(rounds):
        for runner in (True, False) if r % 2 == 0 else (False, True):
            programs.call_runner, programs.where = runner, None  # rebuilt on the next step
            for _ in range(5):
                session.step()
            start = time.perf_counter()
            for _ in range(steps):
                session.step()
            times[runner].append((time.perf_counter() - start) / steps * 1e3)
    for runner, label in ((True, "C++ call runner"), (False, "calls from Python")):
        print(f"{label:>18}: " + " ".join(f"{t:.2f}" for t in times[runner])
              + f" ms per step (median {sorted(times[runner])[rounds // 2]:.2f})")
    ratios = [b / a for a, b in zip(times[True], times[False])]
    print(f"Python / C++ runner per round: {' '.join(f'{x:.3f}' for x in ratios)}")


def time_phases(session) -> None:
    """Wall time of the steps that carry prompt tokens and of the decode-only steps."""
    for run in range(2):
        for i in range(32):
            session.add_request(list(range(1000 + 300 * i, 1256 + 300 * i)),
                                SamplingParams(max_tokens=64, ignore_eos=True))
        prefill, decode, steps = 0.0, 0.0, 0
        while session.has_unfinished():
            carries_prompt = session.num_waiting > 0 or any(
                seq.computed < seq.num_tokens - 1 for seq in session.scheduler.running)
            start = time.perf_counter()
            session.step()
            elapsed = time.perf_counter() - start
            prefill, decode = (prefill + elapsed, decode) if carries_prompt else \
                (prefill, decode + elapsed)
            steps += 1
        print(f"run {run + 1}: {prefill + decode:.2f} s in {steps} steps: {prefill:.2f} s in "
              f"steps with prompt tokens, {decode:.2f} s decoding")


def time_parts(session, requests: int, prefill: bool = False, prompts: int = 8) -> None:
    """ms per decode step (or per step of ``prompts`` fresh 256-token prompts) in each part of the
    engine's decoder forward (wrapped callables)."""
    import collections

    forward = session.runner.forward
    if type(forward).__name__ != "DecoderForward":
        raise SystemExit("this model runs transformers' forward: --parts times q's own")
    totals, calls = collections.Counter(), collections.Counter()

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[name] += time.perf_counter() - start
            calls[name] += 1
            return out
        return run

    from q.plugins.engines.native import decoder

    ops = forward.ops
    forward.ops = type("TimedOps", (), {n: staticmethod(timed(n, getattr(ops, n)))
                                        for n in ("rms_norm", "rotary_cache", "silu_mul")})
    attend = decoder.attend
    decoder.attend = timed("attention", attend)
    for layer in forward.layers:
        for part in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, part, timed(part, getattr(layer, part)))
    forward.lm_head = timed("lm_head", forward.lm_head)
    if prefill:
        steps, step = 3, 0.0
        for round_ in range(steps + 1):  # a warm-up step, then 3 timed
            for i in range(prompts):
                session.add_request(list(range(100 * round_ + i, 100 * round_ + i + 256)),
                                    SamplingParams(max_tokens=1, ignore_eos=True))
            if round_ == 1:
                totals.clear(), calls.clear()
            start = time.perf_counter()
            session.step()
            step += (time.perf_counter() - start) if round_ else 0.0
            while session.has_unfinished():
                session.step()
        step /= steps
        label = f"step of {prompts} x 256 prompt tokens"
    else:
        steps = 20
        for i in range(requests):
            session.add_request(list(range(100 + i, 356 + i)),
                                SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(10):
            session.step()
        totals.clear(), calls.clear()
        start = time.perf_counter()
        for _ in range(steps):
            session.step()
        step = (time.perf_counter() - start) / steps
        label = f"decode step, {requests} requests"
    decoder.attend = attend
    print(f"{step * 1e3:.1f} ms per {label}\n")
    print("| part | ms per step | calls per step |\n|---|---:|---:|")
    for name, seconds in totals.most_common():
        print(f"| {name} | {seconds / steps * 1e3:.2f} | {calls[name] / steps:.0f} |")
    rest = step - sum(totals.values()) / steps
    print(f"| everything else (embedding, rotary tables, sampling, scheduling) | "
          f"{rest * 1e3:.2f} | |")


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
