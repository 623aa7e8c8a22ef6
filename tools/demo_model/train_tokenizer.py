"""Train the demo model's byte-level BPE tokenizer on the training split of the stdlib corpus.

Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``--out``
(default ``fractal/demo/model``). Byte-level means every string round-trips: no unknown token.
Encoding with special tokens on (the default) puts ``<|bos|>`` in front, as in training.

Usage (from the repository root)::

    python3 tools/demo_model/train_tokenizer.py --vocab-size 8192 --out fractal/demo/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS  # noqa: E402
from data import CorpusConfig, collect_documents  # noqa: E402

MODEL_MAX_LENGTH = 2048


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with :data:`SPECIAL_TOKENS` at ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return tokenizer


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` for ``transformers.AutoTokenizer`` (fast tokenizer, chat template)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("fractal/demo/model"))
    args = parser.parse_args(argv)
    documents = collect_documents(CorpusConfig())
    texts = [doc.plain for doc in documents if doc.split == "train"]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    for rank, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != rank:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {rank}")
    save(tokenizer, args.out)
    heldout = "".join(doc.plain for doc in documents if doc.split == "heldout")
    n_tokens = len(tokenizer.encode(heldout, add_special_tokens=False).ids)
    print(f"vocab {tokenizer.get_vocab_size()}; held-out text: {len(heldout)} chars -> {n_tokens} tokens "
          f"({len(heldout) / n_tokens:.2f} chars/token); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
