"""What the model wrote, split the way the OpenAI API reports it: reasoning (DeepSeek-R1's `<think>...</think>`,
sent as `reasoning_content`, the DeepSeek API convention), content, and tool calls in DeepSeek's tokens.

The text to parse keeps its special tokens (decoded with skip_special_tokens=False): they are the markup.
None of them reaches the client: content and reasoning are stripped of every control token.

Streaming parses the whole text so far on every update and sends what is new. That is correct by
construction (the pieces join to the non-streamed answer) as long as a partial tag at the end is held
back, which `parse(final=False)` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
DEEPSEEK_TAGS = (THINK_START, THINK_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)

# One call: <｜tool▁call▁begin｜>KIND<｜tool▁sep｜>BODY<｜tool▁call▁end｜>. DeepSeek-V3/R1 write KIND "function" and
# BODY "NAME\n```json\nARGS\n```"; DeepSeek-V3.1 writes KIND NAME and BODY ARGS.
_TOOL_CALL = re.compile(
    f"{re.escape(TOOL_CALL_BEGIN)}(.*?){re.escape(TOOL_SEP)}(.*?){re.escape(TOOL_CALL_END)}", re.DOTALL)
_JSON_FENCE = re.compile(r"\s*```(?:json)?[ \t]*\n?(.*?)\n?```\s*", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class ControlTokens:
    """The tokenizer's added tokens (and DeepSeek's tags): removed from text the client sees."""

    def __init__(self, tokens: Iterable[str] = ()):
        tokens = sorted({t for t in (*tokens, *DEEPSEEK_TAGS) if t}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, tokens)))  # longest first: the longest match wins
        self.prefixes = {t[:k] for t in tokens for k in range(1, len(t))}
        self.longest = len(tokens[0])

    @classmethod
    def of_tokenizer(cls, tokenizer) -> ControlTokens:
        return cls(t.content for t in tokenizer.backend.get_added_tokens_decoder().values())

    def strip(self, text: str) -> str:
        """Until none is left: removing one can join its neighbours into another ("<" + "<think>" + "think>")."""
        while (stripped := self.pattern.sub("", text)) != text:
            text = stripped
        return text

    def complete_part(self, text: str) -> str:
        """Text without a tail that may be the start of a control token (more tokens may complete it), again and
        again: once a held tail has joined later text into a tag and been stripped, what stood before it may join
        what follows into another ('<think' + '<' + '<think>' + 'think>' + '>' strips to nothing)."""
        while True:
            k = next((k for k in range(min(self.longest - 1, len(text)), 0, -1) if text[-k:] in self.prefixes), 0)
            if not k:
                return text
            text = text[:-k]


def parse_tool_call(kind: str, body: str) -> ToolCall:
    if kind.strip() != "function":
        return ToolCall(kind.strip(), body.strip())
    name, _, rest = body.partition("\n")
    fenced = _JSON_FENCE.fullmatch(rest)
    return ToolCall(name.strip(), (fenced.group(1) if fenced else rest).strip())


class OutputParser:
    """reasoning: split out <think>...</think>; starts_in_reasoning: the prompt already opened <think> (R1's
    generation prompt does); tools: parse DeepSeek tool calls."""

    def __init__(self, control: ControlTokens, reasoning: bool = False, starts_in_reasoning: bool = False,
                 tools: bool = False):
        self.control, self.reasoning, self.tools = control, reasoning, tools
        self.starts_in_reasoning = starts_in_reasoning

    def parse(self, text: str, final: bool = True) -> ParsedOutput:
        """final=False: the text may grow; a partial tag at its end is held back."""
        if not final:
            text = self.control.complete_part(text)
        reasoning, content = self._split_reasoning(text) if self.reasoning else ("", text)
        calls: list[ToolCall] = []
        if self.tools:
            content, tag, section = content.partition(TOOL_CALLS_BEGIN)
            if tag:
                calls = [parse_tool_call(kind, body) for kind, body in _TOOL_CALL.findall(section)]
                if final and not calls:  # markup without one complete call: give the text back as content
                    content += section
        reasoning, content = self.control.strip(reasoning), self.control.strip(content)
        if not final:  # stripping can join text into a new partial tag: hold that back too
            reasoning, content = self.control.complete_part(reasoning), self.control.complete_part(content)
        return ParsedOutput(reasoning, content, calls)

    def _split_reasoning(self, text: str) -> tuple[str, str]:
        if self.starts_in_reasoning:
            before, inside = "", text
        else:
            before, tag, inside = text.partition(THINK_START)
            if not tag:
                return "", text
        reasoning, _, after = inside.partition(THINK_END)
        return reasoning, before + after


class StreamingParser:
    """Feeds the growing text of one sequence; each call returns only what is new since the last."""

    def __init__(self, parser: OutputParser):
        self.parser = parser
        self.sent = ParsedOutput()

    def feed(self, text: str, final: bool) -> ParsedOutput:
        now = self.parser.parse(text, final)
        new = ParsedOutput(now.reasoning[len(self.sent.reasoning):], now.content[len(self.sent.content):],
                           now.tool_calls[len(self.sent.tool_calls):])
        self.sent = now
        return new


def starts_in_reasoning(prompt_text: str) -> bool:
    """DeepSeek-R1's template (and V3.1's with thinking on) ends the prompt with an open <think>."""
    return prompt_text.rstrip().endswith(THINK_START)
