"""OpenAI response bodies and stream chunks, built from engine RequestOutputs."""

from __future__ import annotations

from ..generation import RequestOutput, TokenLogprob


class ChoiceState:
    """Everything one choice has produced so far."""

    def __init__(self, index: int, prompt_tokens: int, tokenizer, chat: bool,
                 counts_prompt: bool = True):
        self.index = index
        self.counts_prompt = counts_prompt  # False for the 2nd..nth choice of one prompt
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.chat = chat
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list = []  # chat entries, or (token, logprob, top) for completions

    def add(self, out: RequestOutput):
        """Record ``out``; returns (new text, this step's logprobs payload or None)."""
        self.text += out.text
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens)
        if out.finished:
            self.finish_reason = out.finish_reason
        payload = None
        if out.logprobs:
            entries = [self._entry(lp) for lp in out.logprobs]
            self.logprobs.extend(entries)
            payload = self._payload(entries, len(self.text) - len(out.text))
        return out.text, payload

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, lp: TokenLogprob):
        token = self._token(lp.token_id)
        if self.chat:
            return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": (t := self._token(i)), "logprob": v,
                                      "bytes": list(t.encode())} for i, v in lp.top]}
        return token, lp.logprob, {self._token(i): v for i, v in lp.top}

    def _payload(self, entries, offset: int):
        if self.chat:
            return {"content": entries}
        offsets, pos = [], offset
        for token, _, _ in entries:
            offsets.append(pos)
            pos += len(token)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": offsets}

    def final_logprobs(self):
        if not self.logprobs:
            return None
        return self._payload(self.logprobs, 0)


def usage_of(states: list[ChoiceState]) -> dict:
    """OpenAI usage: each prompt counted once, however many choices (``n``) it has."""
    prompt = sum(s.prompt_tokens for s in states if s.counts_prompt)
    completion = sum(s.completion_tokens for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_chunk(meta, index, delta, logprobs, finish_reason, include_usage) -> dict:
    if isinstance(delta, str):
        delta = {"content": delta} if delta or finish_reason is None else {}
    chunk = {**meta, "object": "chat.completion.chunk", "choices": [{
        "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(meta, index, text, logprobs, finish_reason, include_usage) -> dict:
    chunk = {**meta, "object": "text_completion", "choices": [{
        "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def final_body(states: list[ChoiceState], meta: dict, chat: bool) -> dict:
    if chat:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                    "logprobs": s.final_logprobs(), "finish_reason": s.finish_reason}
                   for s in states]
        obj = "chat.completion"
    else:
        choices = [{"index": s.index, "text": s.text, "logprobs": s.final_logprobs(),
                    "finish_reason": s.finish_reason} for s in states]
        obj = "text_completion"
    return {**meta, "object": obj, "choices": choices, "usage": usage_of(states)}
