"""DeepSeek-V3 tokenizer: byte-level BPE from a checkpoint's tokenizer.json, explicit BOS handling,
streaming detokenization and Hugging Face-compatible chat templates.

The BPE itself is the `tokenizers` library; this file adds what a checkpoint directory leaves implicit.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BPEBackend

# Used when a checkpoint has no tokenizer_config.json (the names DeepSeek-V3 ships).
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"

# DeepSeek-V3's chat format, following the chat_template of deepseek-ai/DeepSeek-V3 (tokenizer_config.json,
# the 2025 revision shared with DeepSeek-R1 that handles tool calls with content and strips `</think>`).
# It renders the same text for the conversations that template handles; where that template is broken we
# differ on purpose: tool-call arguments may be dicts (sent as JSON), every run of tool outputs opens with
# <｜tool▁outputs▁begin｜> and is closed before the next message, every assistant turn (not only plain
# replies) keeps just the text after `</think>`, and an unknown role is an error instead of silence.
# `tools=` (absent upstream) adds a "## Tools" section after the system prompt listing each function
# (name, description, JSON parameters) and the exact call syntax the model was trained to emit.
DEEPSEEK_V3_CHAT_TEMPLATE = """
{%- set ns = namespace(system_prompt='', in_tool_outputs=false) -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- set ns.system_prompt = ns.system_prompt + ('' if loop.first else '\n\n') + message['content'] -%}
{%- endfor -%}
{%- if tools -%}
    {%- set ns.system_prompt = ns.system_prompt + ('\n\n' if ns.system_prompt else '')
        + '## Tools\nYou have access to the following tools:\n' -%}
    {%- for tool in tools -%}
        {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
        {%- set ns.system_prompt = ns.system_prompt + '\n### ' + fn['name'] + '\nDescription: '
            + (fn['description'] or '') + '\n\nParameters: ' + (fn['parameters'] or {}) | tojson + '\n' -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + '\nTo call tools, reply with exactly this format:\n'
        + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{tool name}\n```json\n'
        + '{arguments as JSON}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n'
        + 'Separate several calls with a newline between <｜tool▁call▁end｜> and <｜tool▁call▁begin｜>.' -%}
{%- endif -%}
{{- bos_token + ns.system_prompt -}}
{%- for message in messages -%}
    {%- set role = message['role'] -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] -%}
    {%- elif message['content'] is not defined or message['content'] is none -%}
        {%- set content = '' -%}
    {%- else -%}
        {{- raise_exception('message ' ~ loop.index0 ~ ': content must be a string, not ' ~ message['content']) -}}
    {%- endif -%}
    {%- if role == 'user' -%}
        {{- ('<｜tool▁outputs▁end｜>' if ns.in_tool_outputs else '') + '<｜User｜>' + content -}}
    {%- elif role == 'assistant' -%}
        {#- Right after tool outputs the model answers without a new <｜Assistant｜> tag. -#}
        {{- '<｜tool▁outputs▁end｜>' if ns.in_tool_outputs else '<｜Assistant｜>' -}}
        {{- content.split('</think>')[-1] -}}
        {%- if message['tool_calls'] -%}
            {{- '<｜tool▁calls▁begin｜>' -}}
            {%- for call in message['tool_calls'] -%}
                {%- set args = call['function']['arguments'] -%}
                {{- ('' if loop.first else '\n') + '<｜tool▁call▁begin｜>' + (call['type'] or 'function')
                    + '<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n'
                    + (args if args is string else args | tojson) + '\n```<｜tool▁call▁end｜>' -}}
            {%- endfor -%}
            {{- '<｜tool▁calls▁end｜>' -}}
        {%- endif -%}
        {{- '<｜end▁of▁sentence｜>' -}}
    {%- elif role == 'tool' -%}
        {{- ('<｜tool▁output▁begin｜>' if ns.in_tool_outputs else '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>')
            + content + '<｜tool▁output▁end｜>' -}}
    {%- elif role != 'system' -%}
        {{- raise_exception('message ' ~ loop.index0 ~ ': unknown role ' ~ role ~ ', expected system, user, assistant or tool') -}}
    {%- endif -%}
    {%- set ns.in_tool_outputs = role == 'tool' -%}
{%- endfor -%}
{%- if ns.in_tool_outputs -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
    {{- '<｜Assistant｜>' -}}
{%- endif -%}
"""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON (as transformers does).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template, so Hub templates render identically here.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value, field: str) -> str | None:
    # tokenizer_config.json writes special tokens as plain strings or in AddedToken form {"content": ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: {field} must be a string or {{'content': str}}, got {value!r}")


def _named_templates(value) -> dict[str, str]:
    # Hugging Face allows one template string or a list of {"name": ..., "template": ...}.
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"chat_template must be a string or a list of {{'name', 'template'}} dicts, got {value!r}")


class Tokenizer:
    def __init__(self, backend: BPEBackend, bos_token: str | None = DEFAULT_BOS, eos_token: str | None = DEFAULT_EOS,
                 pad_token: str | None = None, add_bos_token: bool = True, chat_templates: dict[str, str] | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self._token_id(bos_token, "bos_token"), self._token_id(eos_token, "eos_token"),
            self._token_id(pad_token, "pad_token"))
        if add_bos_token and self.bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no bos_token")
        self.add_bos_token = add_bos_token
        self.chat_templates = chat_templates or {}

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{field} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, plus tokenizer_config.json and chat_template.jinja when present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        try:
            backend = BPEBackend.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception whose text says where parsing failed
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer file ({e})") from None
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        # Without a config, fall back to DeepSeek's own token names where this vocabulary has them.
        defaults = {k: v if backend.token_to_id(v) is not None else None
                    for k, v in (("bos_token", DEFAULT_BOS), ("eos_token", DEFAULT_EOS))}
        tokens = {k: _token_text(config.get(k, defaults.get(k)), k) for k in ("bos_token", "eos_token", "pad_token")}
        templates = _named_templates(config["chat_template"]) if config.get("chat_template") else {}
        # transformers v5 saves the template as a separate file; it supersedes the config's copy.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            templates["default"] = template_file.read_text(encoding="utf-8")
        return cls(backend, **tokens, add_bos_token=config.get("add_bos_token", tokens["bos_token"] is not None),
                   chat_templates=templates)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # BOS is added here, not by tokenizer.json's post-processor: DeepSeek's is a plain ByteLevel one that
        # adds nothing, and others may add BOS themselves. Never prepend a second BOS (e.g. text that already
        # starts with the BOS token, as a rendered chat template does).
        # encode_batch, unlike encode, lets go of the GIL while it works: a long text tokenized in a worker thread
        # (the server's) then leaves the other threads running.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render messages with the checkpoint's template (or DeepSeek-V3's) the way transformers does."""
        if not isinstance(messages, list):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} must be a dict with a string 'role', got {message!r}")
        # As transformers (v5): drop None values (OpenAI clients send content=None next to tool_calls), since
        # templates handle a missing key but not None.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        # As transformers: a "tool_use" template wins when tools are given, else "default".
        name = "tool_use" if tools and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(name, DEEPSEEK_V3_CHAT_TEMPLATE)
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", "pad_token": self.pad_token}
        try:
            text = _compile_template(source).render(messages=messages, tools=tools,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **{**specials, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        # The template writes BOS itself, so encoding must not add another.
        return self.encode(text, add_special_tokens=False) if tokenize else text


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, never splitting a UTF-8 character.

    The "prefix offset" technique of vLLM/TGI: decode a short window of already-emitted ids together with the
    new ones and emit only the difference, so byte-level tokens that carry half of a character are held back
    until the character completes (while the decoded tail is U+FFFD). The pieces, including finish(), join
    to exactly decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context; always on a character boundary
        self.read_offset = 0  # ids before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted):]

    def finish(self) -> str:
        """Flush what was held back (an incomplete character at the end comes out as U+FFFD, as decode())."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted):]
