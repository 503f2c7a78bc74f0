"""The wire format: OpenAI request bodies as pydantic models, and OpenAI's error body.

Types and shapes are checked here; value ranges (temperature >= 0, top_p in (0, 1], ...) by SamplingParams, the
one place that knows them. Unknown fields are ignored, as other OpenAI-compatible servers do; known fields dsv3
cannot honour are refused by name. A string anywhere in a body must be valid Unicode: JSON's escapes can write a
lone UTF-16 surrogate ("\\ud800"), which neither the tokenizer nor a JSON answer can encode."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

SEED_RANGE = dict(ge=-(2 ** 63), lt=2 ** 64)  # what torch.Generator.manual_seed takes


class APIError(Exception):
    """An error answer: HTTP status and OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, 'developer' read as 'system'."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": c.function.model_dump()}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(Body):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(Body):
    include_usage: bool = False


class ResponseFormat(Body):
    type: str


class GenerationRequest(Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: Annotated[int | None, Field(**SEED_RANGE)] = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False                    # vLLM's extension: fixed-length answers for benchmarks
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def refuse_invalid_unicode(cls, data: Any) -> Any:
        param = _lone_surrogate_in(data)
        if param is not None:  # ctx's param names the field (see openai_api._validation_error)
            raise PydanticCustomError("invalid_unicode", "a string holds a lone UTF-16 surrogate (such as \\ud800), "
                                      "which is not valid Unicode", {"param": param})
        return data

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def refuse_penalties(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server; leave it out or set it to 0")
        return value

    @field_validator("response_format")
    @classmethod
    def refuse_structured_output(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise ValueError(f"type {value.type!r} is not supported by this server (it has no structured output); "
                             "leave response_format out or set its type to 'text'")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def refuse_forced_tools(cls, value):
        if isinstance(value, dict):
            raise ValueError("this server supports tool_choice 'auto' and 'none', not a named tool")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def refuse_echo_and_suffix(cls, value, info: ValidationInfo):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


def _lone_surrogate_in(data: Any) -> str | None:
    """Where in a JSON value a string (or a key) is not valid Unicode, named as OpenAI names a parameter
    ('messages.0.content'; 'body' for the top level); None if nowhere. A loop, not recursion: bodies may nest as deep
    as JSON allows."""
    todo: list[tuple[Any, str]] = [(data, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return path or "body"
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not _is_unicode(key):
                return path or "body"
            if isinstance(item, (str, list, dict)):  # not numbers: a prompt of token ids may hold a million
                todo.append((item, f"{path}.{key}" if path else str(key)))
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
