"""The OpenAI API schema as pydantic models: what requests may say, and what responses look like.

Validation lives here, so a bad value is a 400 naming its field before anything reaches a batch.
Fields we do not implement are refused when set to anything but their neutral value, never ignored.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .sampling import MAX_TOP_LOGPROBS, MIN_TEMPERATURE, SamplingParams

MAX_TOKENS_CAP = 4096
MAX_N = 16
MAX_STOPS = 4
SEED_LIMIT = 2 ** 63


def _encodable(s: str) -> str:
    """Lone surrogates ("\\ud800") are valid JSON but not text: refuse them here, not in the tokenizer."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"string is not valid Unicode text ({e.reason} at position {e.start})") from None
    return s


Text = Annotated[str, AfterValidator(_encodable)]
Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields of newer API versions; unknown = harmless

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k cut (vLLM's extension)")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Text | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    density: float | None = Field(None, gt=0, le=1, description="TDA density of this request (tda-export)")

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        if v == "":
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        temperature = self.temperature if self.temperature is not None else 0.0
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # greedy: what a vanishing temperature means, without dividing by it
        seed = None if self.seed is None else (self.seed + choice) % SEED_LIMIT  # n choices differ
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=max(self.top_k or 0, 0),
                              top_p=self.top_p if self.top_p is not None else 1.0, stop=self.stops(), seed=seed,
                              logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | Ids | Annotated[list[Ids], Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Text | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server (only equal to n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 needs echo: true (prompt scoring); otherwise there is nothing to do")
        if isinstance(self.prompt, str) and not self.prompt or isinstance(self.prompt, list) and "" in self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompt_list(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be >= 1 for chat completions")
        return self


# --- responses ---

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tda-export"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Union[int, str, None] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def finite_or_none(x: float | None) -> float | None:
    """JSON has no -inf: a token the model rules out entirely gets the most negative finite float."""
    if x is None or math.isfinite(x):
        return x
    return -3.4e38
