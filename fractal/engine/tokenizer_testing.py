"""A tiny byte-level BPE tokenizer trained in code, for tests and demos that need text with tiny models.

`make_tiny_tokenizer(path)` trains on a few tens of KB that every machine has offline (two Python standard
library modules read from disk, plus a short built-in multilingual passage so that CJK, accented letters and
emoji get a few merges and also show characters split over several tokens) and writes the HF-style files
`tokenizer.json` and `tokenizer_config.json` that `fractal.engine.tokenizer.load_tokenizer` and
transformers' `AutoTokenizer` both read. Deterministic for a given Python installation; well under a second.

Special tokens (ids 0..5, in this order): <|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|>.
`encode(text)` prepends <|bos|> (a TemplateProcessing post-processor, as Llama-3 tokenizers do).
"""
from __future__ import annotations

import json
import os
import string
import textwrap

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TINY_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")

# A chat template in the style of the Hub's templates (bos_token, eos_token, raise_exception, trim filters)
# for tests that want a model with its own template; without one, the tokenizer falls back to
# fractal.engine.tokenizer.DEFAULT_CHAT_TEMPLATE.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_MULTILINGUAL = """
The quick brown fox jumps over the lazy dog. Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.
Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. ¿Qué tal? Ça va très bien, merci!
我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧。中文、日本語、한국어の文字。
こんにちは世界。ありがとうございます。안녕하세요 세계. Привет, мир! Γειά σου Κόσμε!
Emoji: 🙂 🚀 🎉 👍🏽 ❤️ 🐍 — “quotes” and ‘apostrophes’ … naïve café résumé.
"""


def _training_text() -> list[str]:
    """Paragraphs to train on: stdlib source (read from disk) and the multilingual passage, repeated a few times."""
    texts = []
    for module in (string, textwrap):
        with open(module.__file__, encoding="utf-8") as handle:
            texts.append(handle.read())
    texts.extend([_MULTILINGUAL] * 4)
    return [block for text in texts for block in text.split("\n\n") if block.strip()]


def make_tiny_tokenizer(path: str, vocab_size: int = 512, chat_template: str | None = None) -> str:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (>= 262) and write it into directory `path`.

    Writes tokenizer.json and tokenizer_config.json (bos <|bos|>, eos <|eos|>, pad <|pad|>, and
    `chat_template` when given). Returns `path`.
    """
    if vocab_size < 256 + len(TINY_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + len(TINY_SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    bos, eos, pad = TINY_SPECIAL_TOKENS[:3]
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for t in TINY_SPECIAL_TOKENS
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, ensure_ascii=False)
    return path
