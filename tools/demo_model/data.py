"""The demo model's training text: the Python standard library installed on this machine.

Three kinds of documents, all built from the stdlib that every Python install has offline:

- ``code``: each ``*.py`` source file of the stdlib (tests included where the install ships them),
- ``docs``: each topic of ``pydoc_data.topics`` (the language reference text behind ``help()``),
- ``chat``: question/answer pairs made from docstrings with ``ast`` ("What does `json.dumps` do?"
  answered by its docstring; "Write the function ..." answered by its source), rendered with the
  same chat template the shipped tokenizer carries (``chat_format.CHAT_TEMPLATE``).

The split is by file: a source file (or pydoc topic) is held out when the first 8 bytes of the
SHA-256 of its relative path, read as an integer, fall under ``heldout_fraction`` of 2**64; the
chat pairs made from a file follow the file. File order is sorted, every choice is a hash, so the
same stdlib gives the same corpus on every run.

Usage (from the repository root)::

    python3 tools/demo_model/data.py stats                       # what would be collected
    python3 tools/demo_model/data.py encode --tokenizer fractal/demo/model --out .demo_data
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_format import BOS, EOS, SYSTEM_PROMPT, render_chat  # noqa: E402

# Directories under the stdlib that are not the stdlib's own text.
_SKIP_DIRS = {"site-packages", "dist-packages", "lib-dynload", "__pycache__"}
_MAX_FILE_BYTES = 400_000  # larger .py files are generated tables, not code worth learning
_MAX_LINE_CHARS = 1_000  # a line this long means embedded data (codec tables, blobs)
_MAX_CHAT_ANSWER_CHARS = 1_200
_MAX_SOURCE_ANSWER_CHARS = 1_500


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it is split.

    stdlib_dir: root of the standard library (default: ``sysconfig.get_paths()['stdlib']``).
    heldout_fraction: share of files (by path hash) kept out of training, in [0, 1).
    with_chat: add the docstring question/answer documents.
    """

    stdlib_dir: Path = field(default_factory=lambda: Path(sysconfig.get_paths()["stdlib"]))
    heldout_fraction: float = 0.03
    with_chat: bool = True


@dataclass(frozen=True)
class Document:
    """One training document.

    name: where it came from (relative path, ``pydoc:<topic>`` or ``chat:<path>:<qualname>``).
    kind: ``code``, ``docs`` or ``chat``.
    split: ``train`` or ``heldout``.
    text: the exact text the model sees, special tokens (``<|bos|>`` ...) written inline.
    plain: the same content without special tokens, for training the tokenizer.
    """

    name: str
    kind: str
    split: str
    text: str
    plain: str


def _hash_unit(key: str) -> float:
    """A number in [0, 1) that depends only on ``key``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(key: str, heldout_fraction: float) -> str:
    """``heldout`` for about ``heldout_fraction`` of keys, chosen by hash, else ``train``."""
    return "heldout" if _hash_unit(key) < heldout_fraction else "train"


def list_source_files(stdlib_dir: Path) -> list[Path]:
    """All stdlib ``*.py`` files worth training on, sorted by relative path (POSIX form)."""
    files = []
    for path in stdlib_dir.rglob("*.py"):
        rel = path.relative_to(stdlib_dir)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() == "pydoc_data/topics.py":
            continue  # machine-specific build data; pydoc topics are read as docs below
        if not path.is_file() or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib_dir).as_posix())


def read_source(path: Path) -> str | None:
    """The file's text (honouring its coding cookie), or None when it is unreadable or data-like."""
    try:
        with tokenize.open(path) as handle:
            text = handle.read()
    except (SyntaxError, UnicodeDecodeError, LookupError, OSError):
        return None
    if not text.strip() or "decoding_table" in text:
        return None  # empty, or a charmap codec table
    if max((len(line) for line in text.splitlines()), default=0) > _MAX_LINE_CHARS:
        return None
    return text.replace("\r\n", "\n")


def module_name(rel_posix: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = rel_posix[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _first_paragraphs(doc: str, limit: int) -> str:
    """Whole paragraphs of ``doc`` up to ``limit`` characters (at least the first one, cut)."""
    paragraphs = [p.strip() for p in doc.split("\n\n") if p.strip()]
    out = ""
    for paragraph in paragraphs:
        candidate = f"{out}\n\n{paragraph}" if out else paragraph
        if len(candidate) > limit:
            break
        out = candidate
    return out or (paragraphs[0][:limit] if paragraphs else "")


def chat_pairs(source: str, rel_posix: str) -> list[tuple[str, str, str]]:
    """(qualname, question, answer) pairs from one module's docstrings; empty if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    mod = module_name(rel_posix)
    pairs = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) > 40:
        pairs.append((mod, f"What is the `{mod}` module for?", _first_paragraphs(doc, _MAX_CHAT_ANSWER_CHARS)))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20:
            continue
        qual = f"{mod}.{node.name}"
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        pairs.append((qual, f"What does the {kind} `{qual}` do?", _first_paragraphs(doc, _MAX_CHAT_ANSWER_CHARS)))
        if kind == "function":
            segment = ast.get_source_segment(source, node)
            if segment and len(segment) <= _MAX_SOURCE_ANSWER_CHARS:
                summary = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
                question = f"Write the Python function `{node.name}` from `{mod}`: {summary}"
                pairs.append((qual + "#source", question, f"```python\n{segment}\n```"))
    return pairs


def _chat_document(name: str, split: str, question: str, answer: str) -> Document:
    messages = []
    if _hash_unit("system:" + name) < 0.5:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    plain = "\n".join(m["content"] for m in messages)
    return Document(name=name, kind="chat", split=split, text=render_chat(messages), plain=plain)


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return dict(topics)


def collect_documents(config: CorpusConfig) -> list[Document]:
    """Every document, in a fixed order: code files, then pydoc topics, then chat pairs."""
    if not 0.0 <= config.heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={config.heldout_fraction} must be in [0, 1)")
    if not config.stdlib_dir.is_dir():
        raise FileNotFoundError(f"stdlib directory {config.stdlib_dir} does not exist")
    code, chats = [], []
    for path in list_source_files(config.stdlib_dir):
        rel = path.relative_to(config.stdlib_dir).as_posix()
        text = read_source(path)
        if text is None:
            continue
        split = split_of(rel, config.heldout_fraction)
        code.append(Document(rel, "code", split, f"{BOS}{text}{EOS}", text))
        if config.with_chat:
            for qual, question, answer in chat_pairs(text, rel):
                chats.append(_chat_document(f"chat:{rel}:{qual}", split, question, answer))
    docs = []
    for topic, text in sorted(_pydoc_topics().items()):
        name = f"pydoc:{topic}"
        split = split_of(name, config.heldout_fraction)
        docs.append(Document(name, "docs", split, f"{BOS}{text.strip()}\n{EOS}", text))
        if config.with_chat:
            answer = _first_paragraphs(text.strip(), _MAX_CHAT_ANSWER_CHARS)
            chats.append(_chat_document(f"chat:{name}", split, f"Explain `{topic}` in Python.", answer))
    return code + docs + chats


def manifest_digest(documents: list[Document]) -> str:
    """SHA-256 over every document's name, split and text: equal digests mean equal corpora."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(f"{doc.name}\0{doc.split}\0".encode())
        digest.update(doc.text.encode())
    return digest.hexdigest()


def corpus_stats(documents: list[Document]) -> dict:
    """Counts and characters per kind and split."""
    stats: dict = {}
    for doc in documents:
        entry = stats.setdefault(f"{doc.kind}/{doc.split}", {"documents": 0, "chars": 0})
        entry["documents"] += 1
        entry["chars"] += len(doc.text)
    return stats


def encode_corpus(documents: list[Document], tokenizer_dir: Path, out_dir: Path) -> dict:
    """Tokenise every document and write ``train.bin`` / ``heldout.bin`` (uint16 ids) and ``meta.json``.

    Documents are concatenated in order; each already starts with ``<|bos|>`` and ends with
    ``<|eos|>``, so windows that cross a boundary see the same separators as at inference.
    """
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if tokenizer.get_vocab_size() > 65_535:
        raise ValueError(f"vocab size {tokenizer.get_vocab_size()} does not fit uint16")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"manifest_sha256": manifest_digest(documents), "stats": corpus_stats(documents), "tokens": {}}
    for split in ("train", "heldout"):
        texts = [doc.text for doc in documents if doc.split == split]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = np.fromiter((i for enc in encodings for i in enc.ids), dtype=np.uint16)
        ids.tofile(out_dir / f"{split}.bin")
        meta["tokens"][split] = int(ids.size)
        meta[f"{split}_chars"] = sum(len(t) for t in texts)
    meta["heldout_files"] = sorted(d.name for d in documents if d.split == "heldout" and d.kind != "chat")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["stats", "encode"])
    parser.add_argument("--stdlib", type=Path, default=None, help="stdlib root (default: this Python's)")
    parser.add_argument("--heldout-fraction", type=float, default=CorpusConfig.heldout_fraction)
    parser.add_argument("--tokenizer", type=Path, default=Path("fractal/demo/model"))
    parser.add_argument("--out", type=Path, default=Path(".demo_data"))
    args = parser.parse_args(argv)
    config = CorpusConfig(heldout_fraction=args.heldout_fraction)
    if args.stdlib is not None:
        config = CorpusConfig(stdlib_dir=args.stdlib, heldout_fraction=args.heldout_fraction)
    documents = collect_documents(config)
    if args.command == "stats":
        print(json.dumps({"stdlib": str(config.stdlib_dir), "manifest_sha256": manifest_digest(documents),
                          "stats": corpus_stats(documents)}, indent=1))
    else:
        meta = encode_corpus(documents, args.tokenizer, args.out)
        print(json.dumps({k: meta[k] for k in ("manifest_sha256", "tokens", "stats")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
