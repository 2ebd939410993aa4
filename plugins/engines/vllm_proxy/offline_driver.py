"""Runs in vLLM's own virtual environment (never imports q): loads each checkpoint of a job
once with vLLM's offline API and records what the interop tests compare.

    python vllm_driver.py JOB.json RESULT.json

JOB: ``{"checkpoints": [{"name", "path"}], "windows": [[ids]], "prompts": [[ids]],
"max_tokens": N, "ignore_eos": bool, "max_model_len": N}``. RESULT, per checkpoint name: ``{"ok": true,
"top1": [[ids]], "logprob": [[float]], "greedy": [[ids]], "load_s": s, "run_s": s}`` or ``{"ok": false, "error": "...",
"error_type": "..."}``. A checkpoint vLLM refuses is a result, not a crash: the tests
check that the refusal is vLLM's own stated limitation.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so load errors
arrive as exceptions with vLLM's message, and one process loads every checkpoint in turn.
``enforce_eager`` skips torch.compile (about 60 s per model on a 2-core CPU); it changes
no loading or quantization behaviour.
"""

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def teacher_forced(prompt_logprobs, ids):
    """Per position of a window after the first: the most likely token, and the
    log-probability of the token that actually comes next."""
    top1, logprob = [], []
    for pos in range(1, len(ids)):
        entry = prompt_logprobs[pos]
        top1.append(max(entry.items(), key=lambda kv: kv[1].logprob)[0])
        logprob.append(entry[ids[pos]].logprob)
    return top1, logprob


def run_one(LLM, SamplingParams, ckpt, job):
    start = time.perf_counter()
    llm = LLM(model=ckpt["path"], max_model_len=job["max_model_len"], seed=0,
              enforce_eager=True, dtype=job.get("dtype", "auto"))
    load_s = time.perf_counter() - start
    try:
        forced = llm.generate([{"prompt_token_ids": w} for w in job["windows"]],
                              SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0),
                              use_tqdm=False)
        greedy = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                              SamplingParams(max_tokens=job["max_tokens"], temperature=0,
                                             ignore_eos=job.get("ignore_eos", True)),
                              use_tqdm=False)
        tf = [teacher_forced(o.prompt_logprobs, w) for o, w in zip(forced, job["windows"])]
        return {"ok": True, "load_s": load_s, "run_s": time.perf_counter() - start - load_s,
                "top1": [t for t, _ in tf],
                "logprob": [lp for _, lp in tf],
                "greedy": [list(o.outputs[0].token_ids) for o in greedy]}
    finally:
        del llm
        gc.collect()


def main(job_path, result_path):
    job = json.load(open(job_path))
    from vllm import LLM, SamplingParams

    results = {}
    for ckpt in job["checkpoints"]:
        try:
            results[ckpt["name"]] = run_one(LLM, SamplingParams, ckpt, job)
        except Exception as exc:  # vLLM refusing a checkpoint is a result to check
            results[ckpt["name"]] = {"ok": False, "error_type": type(exc).__name__,
                                     "error": str(exc),
                                     "traceback": traceback.format_exc()[-4000:]}
        print(json.dumps({ckpt["name"]: results[ckpt["name"]].get("ok")}), flush=True)
    with open(result_path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
