"""Special tokens and the chat template of the demo model, shared by the corpus and the tokenizer.

A conversation renders as (each role marker is one special token)::

    <|bos|><|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n{answer}<|eos|>

and a prompt asking for a reply ends with ``<|assistant|>\\n``. The training corpus renders its chat
documents with :func:`render_chat`, which runs this very template through Jinja the way
``transformers``' ``apply_chat_template`` does, so training text and serving prompts agree.
The template already starts with ``<|bos|>``: encode a rendered prompt with
``add_special_tokens=False`` so the tokenizer does not add a second one.
"""
from __future__ import annotations

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order fixes the ids: <|bos|>=0, <|eos|>=1, <|pad|>=2, <|system|>=3, <|user|>=4, <|assistant|>=5.
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT)

SYSTEM_PROMPT = "You are a helpful assistant that knows the Python standard library."

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}" + USER + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "\n{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) with :data:`CHAT_TEMPLATE`.

    Uses the same Jinja settings as ``transformers`` (sandboxed, ``trim_blocks``, ``lstrip_blocks``).
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=BOS, eos_token=EOS)
