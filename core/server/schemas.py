"""OpenAI request schemas: the fields q honours, the ones clients commonly send that are
accepted as no-ops at their default values, and nothing else (unknown fields are a 400).

Accepted-but-inert fields (``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls``) change nothing about generation. Fields whose non-default values
q cannot honour (penalties, ``logit_bias``, ``echo``, ``suffix``, tools, JSON mode) are
validated in :meth:`unsupported` and refused with a message naming the field, never
silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


SEED_MAX = 2**63 - 1  # torch generators take a signed 64-bit seed


class _Common(BaseModel):
    # strict: no silent coercion (``true`` is not a token id, ``"4"`` is not max_tokens)
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM / LMDeploy extensions clients use
    top_k: int = Field(0, ge=-1)
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a value q cannot honour, else None."""
        for s in self.stop_strings():
            if not _is_utf8(s):
                return "stop", "stop strings must be valid UTF-8 text (no unpaired surrogates)"
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return name, "penalties are not supported; leave it at 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            return "stop", f"at most {MAX_STOP_STRINGS} stop strings"
        if any(not s for s in stops):
            return "stop", "stop strings must not be empty"
        return None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, self.n):
            return "best_of", "best_of must equal n"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self):
        if not self.messages:
            return "messages", "messages must not be empty"
        for i, m in enumerate(self.messages):
            texts = [m.content] if isinstance(m.content, str) else \
                [p.text or "" for p in m.content or []]
            if not all(_is_utf8(t) for t in texts):
                return f"messages[{i}].content", \
                    "content must be valid UTF-8 text (no unpaired surrogates)"
            if isinstance(m.content, list):
                for part in m.content:
                    if part.type != "text":
                        return f"messages[{i}].content", \
                            f"content parts of type '{part.type}' are not supported (text only)"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calling is not supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def template_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text or "" for p in content)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content or ""})
        return out


def _is_utf8(text: str) -> bool:
    """False for strings JSON let through that no tokenizer can encode (lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
