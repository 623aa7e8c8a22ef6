"""Text <-> token ids for a model directory, without transformers at runtime.

`load_tokenizer(model_dir)` reads the files HF checkpoints ship:
- tokenizer.json (the `tokenizers` pipeline; its post-processor decides which special tokens `encode` adds,
  as transformers 5 does: tokenizer_config's add_bos_token/add_eos_token are ignored when tokenizer.json exists;
  truncation and padding settings saved in it are switched off: prompts are never silently cut or padded);
- tokenizer_config.json (bos/eos/pad/unk/... tokens, added_tokens_decoder, chat_template as a string or as a
  list of named templates, clean_up_tokenization_spaces);
- chat_template.jinja and additional_chat_templates/*.jinja (they take priority over the config's template);
- generation_config.json (eos_token_id as an int or a list, bos_token_id).

Chat templates are rendered like transformers' `apply_chat_template`: a sandboxed jinja2 environment with
trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` filter that keeps
non-ASCII characters, the `{% generation %}` tag, and the named special tokens (bos_token, eos_token, ...) as
variables; message keys whose value is None are dropped first. Without a template of its own the tokenizer
uses DEFAULT_CHAT_TEMPLATE (`has_chat_template` is then False):

    <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}\n ... and, with
    add_generation_prompt, a final "<|assistant|>\n".
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable

from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer

from fractal.errors import FractalError

# The fallback chat template: one "<|role|>\n" header per message, the content, a newline; then the
# assistant header when add_generation_prompt. Content given as OpenAI parts keeps its text parts.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Named special tokens, as transformers' SPECIAL_TOKENS_ATTRIBUTES; they become template variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise FractalError(f"could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise FractalError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as saved: a string, or a dict {"content": ..., ...} (serialised AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile_template(source: str):
    """Compile a chat template in a sandbox, with the helpers Hub templates expect."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise FractalError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json and generation_config.json add.

    Ids are ints; `vocab_size` counts every id the tokenizer can produce (1 + the largest id, added tokens
    included, i.e. transformers' `len(tokenizer)` for contiguous vocabularies).
    """

    def __init__(
        self,
        backend: _BackendTokenizer,
        config: dict | None = None,
        generation_config: dict | None = None,
        chat_templates: dict[str, str] | None = None,
    ):
        self._tok = backend
        # A prompt is never silently cut or padded: the engine checks lengths and says what is wrong.
        self._tok.no_truncation()
        self._tok.no_padding()
        config = dict(config or {})
        self.config = config
        # Added tokens the config knows and tokenizer.json lacks (transformers adds them too).
        added = self._tok.get_added_tokens_decoder()
        known = {token.content for token in added.values()}
        for _, token in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(token, dict) and token.get("content") and token["content"] not in known:
                fields = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in token}
                self._tok.add_tokens([AddedToken(token["content"], **fields)])
                known.add(token["content"])
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content
                if self._tok.token_to_id(content) is None:
                    self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = config.get(key)
            for content in (extra.values() if isinstance(extra, dict) else extra or []):
                content = _token_content(content)
                if content is not None and self._tok.token_to_id(content) is None:
                    self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])

        generation_config = generation_config or {}
        eos_ids: set[int] = set()
        if "eos_token" in self.special_tokens:
            eos_ids.add(self._tok.token_to_id(self.special_tokens["eos_token"]))
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            eos_ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos_ids.update(t for t in gen_eos if isinstance(t, int))
        self.eos_token_ids: set[int] = eos_ids
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = self._tok.token_to_id(bos) if bos is not None else None
        if self.bos_token_id is None and isinstance(generation_config.get("bos_token_id"), int):
            self.bos_token_id = generation_config["bos_token_id"]
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id: int | None = self._tok.token_to_id(pad) if pad is not None else None

        templates = dict(chat_templates or {})
        if not templates:
            raw = config.get("chat_template")
            if isinstance(raw, str):
                templates["default"] = raw
            elif isinstance(raw, list):
                templates.update({t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t})
        self.chat_templates: dict[str, str] = templates
        self._compiled: dict[str, Any] = {}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self._all_special_ids = sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
        )

    # ---- ids ----------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the tokenizer.json post-processor adds its tokens (e.g. BOS)."""
        if not isinstance(text, str):
            raise FractalError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (added tokens flagged special) are dropped when skip_special_tokens."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Vocabulary strings of ids (None for an unknown id); an int gives one string."""
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that decode(skip_special_tokens=True) drops (added tokens flagged special), sorted."""
        return list(self._all_special_ids)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ---------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        """True when the model ships its own template (else apply_chat_template uses DEFAULT_CHAT_TEMPLATE)."""
        return bool(self.chat_templates)

    def _template_source(self, tools) -> str:
        if not self.chat_templates:
            return DEFAULT_CHAT_TEMPLATE
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise FractalError(f"the model has chat templates {sorted(self.chat_templates)} and none named 'default'")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into a prompt string.

        Extra keyword arguments become template variables (e.g. enable_thinking). A template's
        raise_exception or any rendering error becomes a FractalError.
        """
        import jinja2

        if not isinstance(messages, list) or not messages:
            raise FractalError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise FractalError(f"each message must be a dict with a 'role', got {message!r}")
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        source = self._template_source(tools)
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _compile_template(source)
        variables = {**self.special_tokens, **kwargs}
        try:
            return template.render(
                messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as exc:
            raise FractalError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Prompt ids of a chat: the rendered template encoded without adding special tokens (the template
        writes them), as transformers' apply_chat_template(tokenize=True) does."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """Give a message's reasoning under every name templates read (as transformers does)."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (for WordPiece-style vocabularies whose config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _read_chat_templates(model_dir: str) -> dict[str, str]:
    templates: dict[str, str] = {}
    single = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(single):
        with open(single, encoding="utf-8") as handle:
            templates["default"] = handle.read()
    extra_dir = os.path.join(model_dir, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as handle:
                    templates[name[: -len(".jinja")]] = handle.read()
    return templates


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no tokenizer.json."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        backend = _BackendTokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises plain Exceptions for bad files
        raise FractalError(f"could not load {path}: {exc}") from exc
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    gen_path = os.path.join(model_dir, "generation_config.json")
    generation_config = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    return Tokenizer(backend, config, generation_config, _read_chat_templates(model_dir))
