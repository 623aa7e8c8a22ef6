"""IncrementalDetokenizer against whole-sequence decoding with the tiny byte-level BPE tokenizer."""
from __future__ import annotations

import random

import pytest

from fractal.engine.detokenizer import IncrementalDetokenizer
from fractal.engine.tokenizer import load_tokenizer
from fractal.engine.tokenizer_testing import make_tiny_tokenizer
from fractal.errors import FractalError
from fractal.sampling_params import SamplingParams

FFFD = "\ufffd"
CHAR_POOL = (
    list("abcdefghij klmnop,.!?\n") + list("éüßçñ") + list("我能吞下玻璃中文日本語한국어") + ["🙂", "🚀", "👍🏽", "❤️", "👨‍👩‍👧", "🐍"]
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny"))))


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHAR_POOL) for _ in range(n))


def stream(tok, prompt_ids, output_ids, params, flush=False):
    """Feed ids one by one; check the delta invariants at each step; return (deltas, stop, detokenizer)."""
    det = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, stop = [], None
    for token in output_ids:
        delta, stop = det.append(token)
        deltas.append(delta)
        assert "".join(deltas) == det.text
        if stop is not None:
            break
    if flush:
        deltas.append(det.flush())
        assert "".join(deltas) == det.text
    return deltas, stop, det


def test_concatenated_deltas_equal_decode_for_multibyte_text(tok):
    rng = random.Random(0)
    split_chars = 0
    for case in range(60):
        prompt = tok.encode(random_text(rng, rng.randrange(0, 8)))
        output = tok.encode(random_text(rng, rng.randrange(1, 30)), add_special_tokens=False)
        split_chars += sum(tok.decode([t]).count(FFFD) for t in output)
        skip = case % 2 == 0
        params = SamplingParams(max_tokens=len(output), skip_special_tokens=skip)
        deltas, stop, det = stream(tok, prompt, output, params)
        assert stop is None and det.finished
        assert all(FFFD not in d for d in deltas)  # no replacement character mid-stream
        assert det.text == tok.decode(output, skip_special_tokens=skip)
    assert split_chars > 50  # the cases really split characters over tokens


def test_random_ids_including_invalid_bytes_and_special_tokens(tok):
    rng = random.Random(1)
    for case in range(60):
        output = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        output = [t for t in output if t not in tok.eos_token_ids]
        skip = case % 2 == 1
        # max_tokens=None: the request ends another way and the engine flushes.
        params = SamplingParams(max_tokens=None, skip_special_tokens=skip)
        _, _, det = stream(tok, tok.encode("prompt"), output, params, flush=True)
        assert det.text == tok.decode(output, skip_special_tokens=skip)


def reference_visible_ok(full_so_far: str, text: str, stops: list[str]) -> bool:
    """The visible text is a prefix of the decoded text, and what is not yet visible is either a proper
    prefix of a stop string or waits on an incomplete character."""
    if not full_so_far.startswith(text):
        return False
    rest = full_so_far[len(text):]
    return rest == "" or FFFD in rest or any(len(s) > len(rest) and s.startswith(rest) for s in stops)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_match_a_whole_text_reference(tok, include):
    rng = random.Random(2 + include)
    hits = 0
    for _ in range(80):
        output = tok.encode(random_text(rng, rng.randrange(5, 30)), add_special_tokens=False)
        full = tok.decode(output)
        if rng.random() < 0.8:
            start = rng.randrange(len(full))
            stop_str = full[start:start + rng.randrange(1, 6)]
        else:
            stop_str = "zz"
        params = SamplingParams(max_tokens=len(output), stop=[stop_str], include_stop_str_in_output=include)
        det = IncrementalDetokenizer(tok, [], params)
        deltas, stop = [], None
        for t, token in enumerate(output, start=1):
            delta, stop = det.append(token)
            deltas.append(delta)
            assert "".join(deltas) == det.text
            if stop is not None:
                break
            if not include:
                assert stop_str not in det.text
                assert reference_visible_ok(tok.decode(output[:t]), det.text, [stop_str]), (det.text, stop_str)
        index = full.find(stop_str)
        if index < 0:
            assert stop is None and det.text == full
        else:
            hits += 1
            assert stop == stop_str
            assert det.text == full[: index + (len(stop_str) if include else 0)]
    assert hits > 40


def test_several_stop_strings_and_min_tokens(tok):
    output = tok.encode("hello world, foo bar baz", add_special_tokens=False)
    params = SamplingParams(stop=["bar", "o w", "zzz"], max_tokens=100)
    _, stop, det = stream(tok, [], output, params)
    assert (stop, det.text) == ("o w", "hell")
    # Two stops completed by the same token: the one that starts first wins, whatever the list order.
    same_token = tok.encode("xyz abcdef", add_special_tokens=False)
    _, stop, det = stream(tok, [], same_token, SamplingParams(stop=["ef", "cdef"]))
    assert (stop, det.text) == ("cdef", "xyz ab")
    # Before min_tokens stop strings do not count (as in vLLM); "bar" comes after.
    n_before_bar = len(tok.encode("hello world, foo ", add_special_tokens=False))
    params = SamplingParams(stop=["bar", "o w"], min_tokens=n_before_bar - 1, max_tokens=100)
    _, stop, det = stream(tok, [], output, params)
    assert (stop, det.text) == ("bar", "hello world, foo ")


def test_held_back_text_is_released_at_the_end(tok):
    output = tok.encode("the answer is ba", add_special_tokens=False)
    params = SamplingParams(stop=["bar"], max_tokens=len(output))
    det = IncrementalDetokenizer(tok, [], params)
    texts = []
    for token in output:
        det.append(token)
        texts.append(det.text)
    assert texts[-1] == "the answer is ba" and det.finished
    assert "ba" not in texts[-2] and texts[-2].startswith("the answer is")
    # Same with an explicit flush (request ended by the context limit or an abort).
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["bar"], max_tokens=None))
    streamed = "".join(det.append(t)[0] for t in output)
    assert streamed == "the answer is " and streamed + det.flush() == "the answer is ba" == det.text


def test_eos_and_stop_tokens_add_no_text(tok):
    eos = next(iter(tok.eos_token_ids))
    body = tok.encode("hi there", add_special_tokens=False)
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=skip, max_tokens=50))
        for t in body + [eos]:
            det.append(t)
        assert det.text == "hi there" and det.finished
    # ignore_eos: EOS is an ordinary (special) token.
    det = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False, ignore_eos=True, max_tokens=50))
    for t in body + [eos] + body:
        det.append(t)
    assert det.text == "hi there<|eos|>hi there" and not det.finished
    stop_id = body[-1]
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop_token_ids=[stop_id], max_tokens=50))
    for t in body:
        det.append(t)
    assert det.text == tok.decode(body[:-1]) and det.finished
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True))
    for t in body:
        det.append(t)
    assert det.text == "hi there"


def test_prompt_context_and_partial_prompt_characters(tok):
    text = "中文🙂"
    ids = tok.encode(text, add_special_tokens=False)
    for cut in range(1, len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        det = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=len(output)))
        for t in output:
            det.append(t)
        assert det.text == tok.decode(output)


def test_without_tokenizer(tok):
    det = IncrementalDetokenizer(None, [1, 2], SamplingParams())
    assert det.append(5) == ("", None) and det.text == "" and det.flush() == ""
    with pytest.raises(FractalError, match="stop"):
        IncrementalDetokenizer(None, [1], SamplingParams(stop=["x"]))
