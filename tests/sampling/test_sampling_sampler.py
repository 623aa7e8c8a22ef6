"""Sampler against a plain-python reference of each documented step, and statistical checks of the draw."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fractal.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    make_generator,
    process_logits,
)
from fractal.sampling_params import SamplingParams

NEG_INF = float("-inf")
AMBIGUOUS = 1e-4  # reference decisions this close to their threshold are float-rounding dependent: skipped


# ---- plain-python reference (doubles, lists) --------------------------------------------------------------
def ref_penalties(row, params, prompt, output, eos):
    row = list(row)
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            if t < len(row):
                row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
    for t in set(output):
        if t < len(row):
            row[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    if len(output) < params.min_tokens:
        for t in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos)):
            row[t] = NEG_INF
    return row


def ref_softmax(row):
    finite = [v for v in row if v != NEG_INF]
    top = max(finite)
    exps = [math.exp(v - top) if v != NEG_INF else 0.0 for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_process(row, params, prompt, output, eos):
    """Returns (processed logits with -inf for masked tokens, ambiguous flag)."""
    row = ref_penalties(row, params, prompt, output, eos)
    if params.temperature == 0.0:
        return row, False
    row = [v / params.temperature for v in row]
    ambiguous = False
    if params.top_k > 0:
        kth = sorted(row, reverse=True)[min(params.top_k, len(row)) - 1]
        row = [v if v >= kth else NEG_INF for v in row]
    if params.top_p < 1.0:
        probs = ref_softmax(row)
        order = sorted(range(len(row)), key=lambda i: -row[i])
        before, cutoff = 0.0, None
        for i in order:
            if abs(before - params.top_p) < AMBIGUOUS:
                ambiguous = True
            if before < params.top_p:
                cutoff = row[i]
            before += probs[i]
        row = [v if v >= cutoff else NEG_INF for v in row]
    if params.min_p > 0.0:
        probs = ref_softmax(row)
        threshold = params.min_p * max(probs)
        ambiguous |= any(abs(p - threshold) < AMBIGUOUS * threshold for p in probs)
        row = [v if p >= threshold else NEG_INF for v, p in zip(row, probs)]
    return row, ambiguous


ALL_KNOBS = ("top_k", "top_p", "min_p")


def random_case(rng: random.Random, vocab: int, knobs=ALL_KNOBS):
    params = SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, -1, 1, 3, 10, vocab + 5]) if "top_k" in knobs else 0,
        top_p=rng.choice([1.0, 0.9, 0.5, 0.2]) if "top_p" in knobs else 1.0,
        min_p=rng.choice([0.0, 0.05, 0.3]) if "min_p" in knobs else 0.0,
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        frequency_penalty=rng.choice([0.0, 0.7, -0.4]),
        presence_penalty=rng.choice([0.0, 1.1, -0.5]),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=rng.choice([[], [5, 6]]),
        ignore_eos=rng.random() < 0.3,
        max_tokens=20,
    )
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
    return params, prompt, output


# Each knob alone too: the sampler takes different paths when only some steps are needed.
@pytest.mark.parametrize("knobs", [ALL_KNOBS, ("top_k",), ("top_p",), ("min_p",), ()])
def test_every_step_matches_the_python_reference(knobs):
    rng = random.Random(len(knobs))
    torch.manual_seed(0)
    vocab, eos = 40, {1, 2}
    checked = 0
    for _ in range(6):
        cases = [random_case(rng, vocab, knobs) for _ in range(16)]
        logits = torch.randn(len(cases), vocab) * 3
        batch = SamplingBatch.build([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases],
                                    [None] * len(cases), "cpu", eos_token_ids=eos)
        got = process_logits(logits, batch)
        penalised = apply_penalties(logits.clone(), batch)
        for row, (params, prompt, output) in enumerate(cases):
            raw = logits[row].double().tolist()
            want_pen = ref_penalties(raw, params, prompt, output, eos)
            assert penalised[row].tolist() == pytest.approx(want_pen, rel=1e-5, abs=1e-5)
            want, ambiguous = ref_process(raw, params, prompt, output, eos)
            if ambiguous:
                continue
            checked += 1
            got_row = got[row].tolist()
            assert [v == NEG_INF for v in got_row] == [v == NEG_INF for v in want], (params, row)
            finite = [(g, w) for g, w in zip(got_row, want) if w != NEG_INF]
            assert [g for g, _ in finite] == pytest.approx([w for _, w in finite], rel=1e-5, abs=1e-5)
    assert checked >= 80


def test_greedy_is_argmax_with_ties_to_lowest_id():
    torch.manual_seed(1)
    logits = torch.randint(0, 4, (64, 30)).float()  # many ties
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5)] * 64
    batch = SamplingBatch.build(params, [[0]] * 64, [[]] * 64, [None] * 64, "cpu")
    out = Sampler()(logits, batch)
    want = [row.index(max(row)) for row in logits.tolist()]
    assert out.sampled.tolist() == want
    # Greedy rows inside a random batch are still exact argmax.
    mixed = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.0) for i in range(64)]
    out = Sampler()(logits, SamplingBatch.build(mixed, [[0]] * 64, [[]] * 64, [None] * 64, "cpu"))
    assert out.sampled.tolist()[1::2] == want[1::2]


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.6, temperature=2.0),
    SamplingParams(min_p=0.3),
    SamplingParams(top_k=5, top_p=0.8, min_p=0.1, temperature=0.7),
    SamplingParams(min_tokens=2, stop_token_ids=[7]),
])
def test_masked_tokens_are_never_sampled(params):
    torch.manual_seed(2)
    vocab, rows = 25, 4000
    base = (torch.randn(vocab) * 2).tolist()
    allowed, _ = ref_process(base, params, [1], [], {3})
    logits = torch.tensor([base] * rows)
    batch = SamplingBatch.build([params] * rows, [[1]] * rows, [[]] * rows, [None] * rows, "cpu", eos_token_ids={3})
    sampled = set(Sampler()(logits, batch).sampled.tolist())
    assert sampled <= {i for i, v in enumerate(allowed) if v != NEG_INF}
    assert len(sampled) > 1 or sum(v != NEG_INF for v in allowed) == 1


def test_frequencies_match_the_processed_softmax():
    torch.manual_seed(3)
    vocab, rows = 12, 40000
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9)
    base = torch.linspace(-1.0, 1.5, vocab)[torch.randperm(vocab)].tolist()
    processed, ambiguous = ref_process(base, params, [], [], set())
    assert not ambiguous
    expected = ref_softmax(processed)
    batch = SamplingBatch.build([params] * rows, [[]] * rows, [[]] * rows, [None] * rows, "cpu")
    counts = torch.bincount(Sampler()(torch.tensor([base] * rows), batch).sampled, minlength=vocab).tolist()
    support = [i for i in range(vocab) if expected[i] > 0]
    assert all(counts[i] == 0 for i in range(vocab) if expected[i] == 0)
    chi2 = sum((counts[i] - rows * expected[i]) ** 2 / (rows * expected[i]) for i in support)
    dof = len(support) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # ~ p < 1e-4 for a correct sampler


def test_seeded_rows_reproduce_whatever_the_batch():
    vocab = 50

    def run(position: int, others: int, steps: int = 12) -> list[int]:
        torch.manual_seed(100 + others)  # other rows (and their global-RNG draws) differ per run
        gen = make_generator(1234, "cpu")
        logit_rng = torch.Generator().manual_seed(9)  # the seeded row sees the same logits each step
        tokens = []
        for _ in range(steps):
            row_logits = torch.randn(vocab, generator=logit_rng)
            logits = torch.randn(others + 1, vocab)
            logits[position] = row_logits
            params = [SamplingParams(temperature=1.3, top_p=0.95, seed=5)] * (others + 1)
            params[position] = SamplingParams(temperature=1.0, top_k=20, seed=1234)
            gens = [None] * (others + 1)
            gens[position] = gen
            out = Sampler()(logits, SamplingBatch.build(params, [[1]] * (others + 1), [[]] * (others + 1),
                                                         gens, "cpu"))
            tokens.append(out.sampled[position].item())
        return tokens

    alone = run(0, 0)
    assert run(2, 5) == alone
    assert run(7, 9) == alone
    assert len(set(alone)) > 3  # actually random

    # A different seed gives a different stream.
    def stream(seed):
        gen = make_generator(seed, "cpu")
        logits = torch.zeros(1, vocab)
        batch = SamplingBatch.build([SamplingParams(seed=seed)], [[1]], [[]], [gen], "cpu")
        return [Sampler()(logits, batch).sampled.item() for _ in range(10)]

    assert stream(1) != stream(2)
    assert stream(3) == stream(3)


def test_logprobs_are_of_the_raw_distribution():
    torch.manual_seed(4)
    params = [SamplingParams(logprobs=5, repetition_penalty=1.5, temperature=0.5, top_k=2),
              SamplingParams(logprobs=2, temperature=0.0),
              SamplingParams()]
    logits = torch.randn(3, 30) * 2
    before = logits.clone()
    batch = SamplingBatch.build(params, [[1, 2, 3]] * 3, [[4]] * 3, [None] * 3, "cpu")
    out = Sampler()(logits, batch)
    assert torch.equal(logits, before)  # input untouched
    assert out.top_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    for row in range(3):
        raw = logits[row].double().tolist()
        top = max(raw)
        log_z = top + math.log(sum(math.exp(v - top) for v in raw))
        ref = [v - log_z for v in raw]
        assert out.sampled_logprob[row].item() == pytest.approx(ref[out.sampled[row].item()], abs=1e-5)
        want_ids = sorted(range(30), key=lambda i: -ref[i])[:5]
        assert out.top_ids[row].tolist() == want_ids
        assert out.top_logprobs[row].tolist() == pytest.approx([ref[i] for i in want_ids], abs=1e-5)
    none_asked = SamplingBatch.build([SamplingParams(logprobs=0)], [[1]], [[]], [None], "cpu")
    out = Sampler()(logits[:1], none_asked)
    assert out.top_ids is None and out.top_logprobs is None and out.sampled_logprob.shape == (1,)


def test_min_tokens_masks_eos_until_reached():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 50.0  # EOS would always win
    logits[:, 7] = 40.0  # stop token next
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])] * 2 + [
        SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[7])]
    batch = SamplingBatch.build(params, [[1]] * 3, [[4], [4, 5], [4]], [None] * 3, "cpu", eos_token_ids={2})
    assert Sampler()(logits, batch).sampled.tolist() == [0, 2, 2]


@pytest.mark.gpu
def test_cuda_matches_cpu_for_greedy_and_seeded_sampling():
    torch.manual_seed(5)
    logits = torch.randn(8, 1000)
    logits[4:] = logits[4]  # the seeded rows see the same logits
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2, min_tokens=2)] * 4 + [
        SamplingParams(top_p=0.9, top_k=50, min_p=0.01, frequency_penalty=0.5, seed=3, logprobs=3)] * 4
    prompts, outputs = [[1, 2, 3]] * 8, [[9]] * 8
    cpu = Sampler()(logits, SamplingBatch.build(params, prompts, outputs, [None] * 8, "cpu"))
    gens = [None] * 4 + [make_generator(3, "cuda") for _ in range(4)]
    batch = SamplingBatch.build(params, prompts, outputs, gens, "cuda")
    device_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host round-trip inside the sampler raises
    try:
        gpu = Sampler()(device_logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.sampled[:4].tolist() == cpu.sampled[:4].tolist()
    assert len(set(gpu.sampled[4:].tolist())) == 1  # same seed, same logits, same draw
