"""Pick the next token of each row from its logits, with that request's own parameters.

Order of operations follows vLLM / transformers: temperature, then top-k, then top-p (the
smallest set of tokens whose probability reaches ``top_p``, always keeping the best one),
then a draw from the request's own ``torch.Generator`` (seeded when the request gave a
seed, so the same request gives the same text whatever else is in the batch).
Log-probabilities are those of the model's raw distribution (what OpenAI returns).
"""

from __future__ import annotations

import torch

from q.generation import SamplingParams, TokenLogprob


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits of one row with top-k / top-p filtered out as -inf."""
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        drop[0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop),
                                    float("-inf"))
    return scores


def sample_row(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(torch.argmax(logits))
    probs = filtered_logits(logits.float(), params).softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        # degenerate logits (inf/NaN from the model): never let one request's sampling
        # fail the whole batch; the most likely token is the safe choice
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token, float(logp[token]), alternatives)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen
