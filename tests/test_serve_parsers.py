"""Reasoning and tool-call parsing of generated text, whole and streamed piece by piece."""

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsv3.serve.parsers import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                                ControlTokens, OutputParser, StreamingParser, ToolCall, starts_in_reasoning)

CONTROL = ControlTokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"])


def v3_call(name: str, args: dict) -> str:
    """A call the way DeepSeek-V3/R1 write it."""
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{TOOL_CALL_END}"


TWO_CALLS = (f"Let me look.{TOOL_CALLS_BEGIN}{v3_call('get_weather', {'city': 'Paris'})}\n"
             f"{v3_call('get_time', {'tz': 'Europe/Rome'})}{TOOL_CALLS_END}")


def test_reasoning_is_split_from_content():
    parser = OutputParser(CONTROL, reasoning=True)
    out = parser.parse("<think>2+2 is 4.</think>The answer is 4.")
    assert (out.reasoning, out.content, out.tool_calls) == ("2+2 is 4.", "The answer is 4.", [])
    unfinished = parser.parse("<think>still thinking")
    assert (unfinished.reasoning, unfinished.content) == ("still thinking", "")


def test_r1_prompt_opens_think_so_the_output_starts_inside_it():
    assert starts_in_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not starts_in_reasoning("<｜User｜>hi<｜Assistant｜>")
    out = OutputParser(CONTROL, reasoning=True, starts_in_reasoning=True).parse("hmm, a greeting\n</think>\n\nHello!")
    assert (out.reasoning, out.content) == ("hmm, a greeting\n", "\n\nHello!")


def test_v3_tool_calls_become_openai_tool_calls():
    out = OutputParser(CONTROL, tools=True).parse(TWO_CALLS)
    assert out.content == "Let me look."
    assert out.tool_calls == [ToolCall("get_weather", '{"city": "Paris"}'),
                              ToolCall("get_time", '{"tz": "Europe/Rome"}')]
    assert [json.loads(c.arguments) for c in out.tool_calls] == [{"city": "Paris"}, {"tz": "Europe/Rome"}]


def test_v31_tool_call_form():
    text = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}search{TOOL_SEP}{{\"q\": \"dsv3\"}}{TOOL_CALL_END}{TOOL_CALLS_END}"
    assert OutputParser(CONTROL, tools=True).parse(text).tool_calls == [ToolCall("search", '{"q": "dsv3"}')]


def test_broken_tool_markup_is_given_back_as_text_without_control_tokens():
    out = OutputParser(CONTROL, tools=True).parse(f"Sure.{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}get_we")
    assert (out.content, out.tool_calls) == ("Sure.functionget_we", [])


def test_without_tools_the_markup_is_only_stripped():
    out = OutputParser(CONTROL).parse(TWO_CALLS)
    assert out.tool_calls == [] and "｜" not in out.content and out.content.startswith("Let me look.function")


def test_content_never_holds_control_tokens():
    parser = OutputParser(CONTROL, reasoning=True, tools=True)
    out = parser.parse("<｜User｜>a<think>b<｜Assistant｜></think>c<｜end▁of▁sentence｜>d")
    assert (out.reasoning, out.content) == ("b", "acd")


def test_streaming_holds_back_a_partial_tag():
    stream = StreamingParser(OutputParser(CONTROL, reasoning=True))
    assert stream.feed("Hi <thi", final=False).content == "Hi "
    new = stream.feed("Hi <think>deep", final=False)
    assert (new.reasoning, new.content) == ("deep", "")
    new = stream.feed("Hi <think>deep</think> there", final=True)
    assert (new.reasoning, new.content) == ("", " there")


PIECES = ["<think>", "</think>", "think", "<", ">", "/", "Hello", " world", "\n", "```json\n", "```", '{"a": 1}',
          "<｜User｜>", "function", "get_weather", TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END,
          TOOL_SEP, "<｜", "｜>", "tool", "▁", "好"]


@settings(max_examples=300, deadline=None)
@example(pieces=["<", "<think>", "think", ">"], reasoning=False, opened=False, tools=False, structured=False)  # found
@example(pieces=["<think>"] * 3 + ["think", ">", "<"], reasoning=True, opened=False, tools=True, structured=True)  # found
@example(pieces=["<", "<", "<think>", "think", ">", "<think>"], reasoning=False, opened=False, tools=False,
         structured=False)  # found: a tail held back, stripped later
@example(pieces=["<", "think", "<", "<think>", "think", ">", ">"], reasoning=False, opened=False, tools=False,
         structured=False)  # found: a held-back tail, once stripped, joins what stood before it into a tag
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=30), reasoning=st.booleans(), opened=st.booleans(),
       tools=st.booleans(), structured=st.booleans())
def test_streamed_pieces_join_to_the_whole_answer(pieces, reasoning, opened, tools, structured):
    if structured:  # make sure complete calls and think blocks show up, not only random fragments
        pieces = ["<think>", *pieces[:5], "</think>", *pieces[5:], TOOL_CALLS_BEGIN, v3_call("f", {"x": 1}),
                  *pieces[:3]]
    parser = OutputParser(CONTROL, reasoning=reasoning, starts_in_reasoning=opened, tools=tools)
    stream = StreamingParser(parser)
    reasoning_text, content, calls, text = "", "", [], ""
    for i, piece in enumerate(pieces):
        text += piece
        new = stream.feed(text, final=i == len(pieces) - 1)
        reasoning_text, content, calls = reasoning_text + new.reasoning, content + new.content, calls + new.tool_calls
    whole = parser.parse(text)
    if pieces:
        assert (reasoning_text, content, calls) == (whole.reasoning, whole.content, whole.tool_calls)
    # (each part alone: content "<" and reasoning "think>" are fine, though together they spell a tag)
    for shown in (whole.content, whole.reasoning):
        assert not any(tag in shown for tag in (TOOL_CALLS_BEGIN, TOOL_SEP, "<think>", "<｜User｜>"))
