"""fractal's Tokenizer against transformers' AutoTokenizer on the same saved files."""
from __future__ import annotations

import json
import os
import random
import time

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from fractal.engine.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from fractal.engine.tokenizer_testing import TINY_CHAT_TEMPLATE, TINY_SPECIAL_TOKENS, make_tiny_tokenizer
from fractal.errors import FractalError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x  # comment\n\n\tTabs and  double  spaces ",
    "我能吞下玻璃而不伤身体。Привет, мир! naïve café",
    "emoji 🙂🚀👍🏽❤️ and a zero-width joiner: 👨‍👩‍👧",
    "special tokens inline: <|eos|>x<|user|>\ny <|bos|>",
    "   leading spaces and trailing   ",
]

# Templates in the styles the Hub ships, exercising the features real ones use.
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = 'You are helpful.' %}\n"
    "{%- endif %}\n"
    "{{- '<|system|>\\n\\n' + system_message + '<|eos|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|' + message['role'] + '|>\\n\\n' + message['content'] | trim + '<|eos|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|assistant|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML_TOOLS_STYLE = (
    "{%- if tools %}\n"
    "    {{- '<|system|>\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}\n"
    "    {{- '# Tools\\n<tools>' }}\n"
    "    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "    {{- '\\n</tools><|eos|>\\n' }}\n"
    "{%- elif messages[0].role == 'system' %}\n"
    "    {{- '<|system|>\\n' + messages[0].content + '<|eos|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(last_user=0) %}\n"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}\n"
    "    {%- if message.role == 'assistant' and message.tool_calls is defined %}\n"
    "        {{- '<|assistant|>\\n' }}{%- if message.content %}{{- message.content }}{%- endif %}\n"
    "        {%- for call in message.tool_calls %}\n"
    "            {{- '\\n<tool_call>\\n' + {'name': call.function.name, 'arguments': call.function.arguments}"
    " | tojson + '\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|eos|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' and message.reasoning_content is defined %}\n"
    "        {{- '<|assistant|>\\n<think>' + message.reasoning_content + '</think>' + message.content + '<|eos|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|' + message.role + '|>\\n' + message.content + '<|eos|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}\n"
)

GENERATION_TAG_STYLE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}[{{ message['role'] | upper }}] {{ message['content'] }}\n{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)

# Relies on trim_blocks and lstrip_blocks (indented block tags without "-").
INDENTED_STYLE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] }}
    {% else %}
{{ message['role'] }}: {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Und 中文? 🙂"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
     {"role": "tool", "content": "sunny"}],
    [{"role": "user", "content": "think"}, {"role": "assistant", "content": "done", "reasoning": "hmm…"},
     {"role": "user", "content": "again"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny")), chat_template=TINY_CHAT_TEMPLATE)


def _pair(path):
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def test_make_tiny_tokenizer_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    make_tiny_tokenizer(str(tmp_path / "a"), vocab_size=300)
    make_tiny_tokenizer(str(tmp_path / "b"), vocab_size=300)
    assert time.perf_counter() - start < 2.0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tok = load_tokenizer(str(tmp_path / "a"))
    assert tok.vocab_size == 300
    assert tok.convert_ids_to_tokens(list(range(len(TINY_SPECIAL_TOKENS)))) == list(TINY_SPECIAL_TOKENS)


def test_encode_decode_match_transformers(tiny_dir):
    ours, hf = _pair(tiny_dir)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 20))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_ids == {hf.eos_token_id}
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    assert all(hf.decode([i], skip_special_tokens=True) == "" for i in ours.all_special_ids)


def test_chat_template_matches_transformers(tiny_dir):
    ours, hf = _pair(tiny_dir)
    assert ours.has_chat_template
    for chat in CHATS[:2]:
        for gen in (True, False):
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
        want_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.encode_chat(chat) == list(want_ids)
    with pytest.raises(FractalError, match="Unknown role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


def _write_variant(src: str, dst: str, config_update: dict, extra_files: dict[str, str] | None = None,
                   generation_config: dict | None = None) -> str:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as handle:
        tokenizer_json = handle.read()
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as handle:
        handle.write(tokenizer_json)
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("chat_template", None)
    config.update(config_update)
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    for name, text in (extra_files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        with open(os.path.join(dst, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    if generation_config is not None:
        with open(os.path.join(dst, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump(generation_config, handle)
    return dst


@pytest.mark.parametrize("template", [LLAMA3_STYLE, CHATML_TOOLS_STYLE, GENERATION_TAG_STYLE, INDENTED_STYLE],
                         ids=["llama3", "chatml_tools", "generation_tag", "indented"])
def test_hub_style_templates_match_transformers(tiny_dir, tmp_path, template):
    path = _write_variant(tiny_dir, str(tmp_path / "t"), {"chat_template": template})
    ours, hf = _pair(path)
    for chat in CHATS:
        for tools in (None, TOOLS):
            for gen in (True, False):
                kwargs = {"enable_thinking": False} if gen else {}
                try:
                    want = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen,
                                                  **kwargs)
                except Exception as exc:  # the template refuses this chat: so must ours
                    with pytest.raises(FractalError):
                        ours.apply_chat_template(chat, add_generation_prompt=gen, tools=tools, **kwargs)
                    assert "alternate" in str(exc)
                    continue
                assert ours.apply_chat_template(chat, add_generation_prompt=gen, tools=tools, **kwargs) == want


def test_template_files_and_named_templates(tiny_dir, tmp_path):
    # chat_template.jinja and additional_chat_templates/ take priority over the config's template.
    path = _write_variant(tiny_dir, str(tmp_path / "files"), {"chat_template": "IGNORED"},
                          {"chat_template.jinja": LLAMA3_STYLE,
                           "additional_chat_templates/tool_use.jinja": CHATML_TOOLS_STYLE})
    ours, hf = _pair(path)
    chat = CHATS[1]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, tools=TOOLS) == hf.apply_chat_template(
        chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in ours.apply_chat_template(chat, tools=TOOLS)
    # The list form of tokenizer_config's chat_template.
    path = _write_variant(tiny_dir, str(tmp_path / "list"), {"chat_template": [
        {"name": "default", "template": GENERATION_TAG_STYLE}, {"name": "tool_use", "template": CHATML_TOOLS_STYLE}]})
    ours, hf = _pair(path)
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(chat, tools=tools) == hf.apply_chat_template(
            chat, tools=tools, tokenize=False, add_generation_prompt=True)


def test_fallback_template_when_the_model_has_none(tiny_dir, tmp_path):
    path = _write_variant(tiny_dir, str(tmp_path / "none"), {})
    ours = load_tokenizer(path)
    assert not ours.has_chat_template
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "image_url", "image_url": {}},
                                                                           {"type": "text", "text": "b"}]}]
    assert ours.apply_chat_template(chat) == "<|system|>\nS\n<|user|>\nab\n<|assistant|>\n"
    assert ours.apply_chat_template(chat, add_generation_prompt=False) == "<|system|>\nS\n<|user|>\nab\n"
    # transformers renders the same documented template identically.
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf.apply_chat_template(chat, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                  add_generation_prompt=True) == ours.apply_chat_template(chat)
    # The fallback's markers are single special tokens of the tiny tokenizer.
    assert ours.encode_chat([{"role": "user", "content": "hi"}])[0] == ours.convert_tokens_to_ids("<|user|>")


def test_config_details(tiny_dir, tmp_path):
    # Special tokens missing from tokenizer.json are added (as transformers does), generation_config's EOS
    # list joins the config's, add_bos_token is ignored when tokenizer.json has its post-processor (transformers 5).
    path = _write_variant(tiny_dir, str(tmp_path / "cfg"),
                          {"unk_token": "<|unk|>", "extra_special_tokens": ["<|tool|>"], "add_bos_token": False},
                          generation_config={"eos_token_id": [1, 4], "bos_token_id": 0})
    ours, hf = _pair(path)
    assert ours.eos_token_ids == {1, 4}
    assert ours.convert_tokens_to_ids("<|unk|>") == hf.convert_tokens_to_ids("<|unk|>") == 512
    assert ours.convert_tokens_to_ids("<|tool|>") == hf.convert_tokens_to_ids("<|tool|>") == 513
    assert ours.vocab_size == len(hf) == 514
    assert ours.decode(ours.encode("a<|tool|>b")) == "ab" == hf.decode(hf.encode("a<|tool|>b"), skip_special_tokens=True)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
    assert ours.encode("a")[0] == 0
    # No post-processor in tokenizer.json: nothing is added.
    backend = BackendTokenizer.from_file(os.path.join(tiny_dir, "tokenizer.json"))
    backend.post_processor = None
    bare = tmp_path / "bare"
    _write_variant(tiny_dir, str(bare), {"add_bos_token": True})
    backend.save(str(bare / "tokenizer.json"))
    ours, hf = _pair(str(bare))
    assert ours.encode("hello") == hf.encode("hello") == ours.encode("hello", add_special_tokens=False)
    # A post-processor with BOS and EOS.
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A <|eos|>",
                                                           special_tokens=[("<|bos|>", 0), ("<|eos|>", 1)])
    backend.save(str(bare / "tokenizer.json"))
    ours, hf = _pair(str(bare))
    assert ours.encode("hello") == hf.encode("hello")
    assert ours.encode("hello")[-1] == 1


def test_missing_and_broken_files(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FractalError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
