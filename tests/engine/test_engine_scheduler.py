"""Scheduler, block pool and prefix cache, without torch.

The end-to-end checks drive the scheduler with a simulated paged KV cache: every chunk writes its
token ids into the slots its block table names, and "sampling" reads the whole context back through
the block table and applies a fixed function of it. If blocks were shared, reused or overwritten
wrongly, the context read back differs from the true sequence and the output differs from the
reference, which is the same function applied to the plain token list (no batching, no paging).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from fractal.engine.block_pool import BlockPool, hash_block
from fractal.engine.config import SchedulerConfig
from fractal.engine.request import Sequence, SeqStatus, check_token_stop
from fractal.engine.scheduler import Scheduler
from fractal.errors import FractalError
from fractal.sampling_params import SamplingParams

VOCAB = 50


def next_token(context: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class PagedSim:
    """Drives a Scheduler to completion over a simulated paged KV cache."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.bs = sched.config.block_size
        self.slots: dict[int, int] = {}  # flat slot -> token id written there
        self.steps = []
        self.next_id = 0
        self.host: dict[int, list[list[int | None]]] = {}  # swapped-out sequences' block contents

    def add(self, prompt: list[int], max_tokens: int, n: int = 1) -> list[Sequence]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n)
        seqs = []
        for i in range(n):
            seq = Sequence(
                seq_id=self.next_id, request_id=f"r{self.next_id}", index=i, order=self.next_id,
                token_ids=list(prompt), num_prompt_tokens=len(prompt), params=params,
                parent=seqs[0] if i else None,
            )
            self.next_id += 1
            self.sched.add(seq)
            seqs.append(seq)
        return seqs

    def step(self):
        out = self.sched.schedule()
        cfg = self.sched.config
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.chunks) <= cfg.max_num_seqs
        assert len({c.seq_id for c in out.chunks}) == len(out.chunks)
        # the runner's KV moves: out first (those blocks may be reused by this step), then in
        for seq_id, blocks in out.swap_out:
            assert seq_id not in self.host
            self.host[seq_id] = [[self.slots.get(b * self.bs + o) for o in range(self.bs)] for b in blocks]
        for seq_id, blocks in out.swap_in:
            saved = self.host.pop(seq_id)
            assert len(saved) == len(blocks)
            for b, content in zip(blocks, saved):
                for o, tok in enumerate(content):
                    if tok is not None:
                        self.slots[b * self.bs + o] = tok
        sampled = {}
        for c in out.chunks:
            seq = self.sched.seqs[c.seq_id]
            assert c.token_ids == seq.token_ids[c.start_pos : c.seq_len]
            assert len(c.block_table) * self.bs >= c.seq_len
            for j, tok in enumerate(c.token_ids):
                pos = c.start_pos + j
                self.slots[c.block_table[pos // self.bs] * self.bs + pos % self.bs] = tok
        for c in out.chunks:  # read back after all writes, as attention does
            if c.sample:
                ctx = [self.slots[c.block_table[p // self.bs] * self.bs + p % self.bs] for p in range(c.seq_len)]
                sampled[c.seq_id] = next_token(ctx)
        self.steps.append(out)
        for seq in self.sched.update_from_output(out, sampled):
            stop = check_token_stop(seq, frozenset(), 10_000)
            if stop:
                self.sched.finish(seq, *stop)
        return out

    def run(self, max_steps: int = 10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, **kw):
    return Scheduler(
        SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, **kw,
        )
    )


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7], [8, 9, 10, 11, 12, 13, 14, 15], [3, 1, 4, 1, 5, 9, 2, 6, 5]]


def run_all(sched, prompts=PROMPTS, max_tokens=6):
    sim = PagedSim(sched)
    seqs = [sim.add(p, max_tokens)[0] for p in prompts]
    sim.run()
    for p, s in zip(prompts, seqs):
        assert s.output_token_ids == reference(p, max_tokens), p
        assert s.finish_reason == "length"
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    return sim, seqs


def test_plain_batch_matches_reference_and_frees_pool():
    sim, _ = run_all(make(enable_prefix_caching=False))
    first = sim.steps[0]
    assert [c.num_tokens for c in first.chunks] == [len(p) for p in PROMPTS]
    assert all(c.sample for c in first.chunks)
    # then pure decode steps, one token per sequence
    assert [c.num_tokens for c in sim.steps[1].chunks] == [1] * len(PROMPTS)


def test_chunked_prefill_small_chunk_decodes_first():
    sched = make(prefill_chunk_size=3, max_num_batched_tokens=7, enable_prefix_caching=False)
    sim, _ = run_all(sched)
    for out in sim.steps:
        sizes = [c.num_tokens for c in out.chunks]
        assert max(sizes) <= 3
        # decodes (one-token chunks of sequences past their prompt) come before any prefill chunk
        kinds = [sched_seq_is_decode(c) for c in out.chunks]
        assert kinds == sorted(kinds, reverse=True)
    # the 10-token prompt went in 3-token chunks, sampling only after the last
    seq1 = [[c for c in out.chunks if c.seq_id == 1] for out in sim.steps]
    prefill = [c[0] for c in seq1 if c and c[0].start_pos < 10]
    assert [(c.start_pos, c.num_tokens, c.sample) for c in prefill] == [(0, 3, False), (3, 3, False), (6, 3, False), (9, 1, True)]


def sched_seq_is_decode(chunk) -> bool:
    return chunk.num_tokens == 1 and chunk.sample and chunk.start_pos > 0


def test_sequence_cap_and_token_budget():
    sched = make(max_num_seqs=2, max_num_batched_tokens=5, prefill_chunk_size=5, enable_prefix_caching=False)
    sim, _ = run_all(sched)
    assert all(len(out.chunks) <= 2 and out.num_batched_tokens <= 5 for out in sim.steps)


def test_no_chunking_admits_whole_prompts_only():
    sched = make(enable_chunked_prefill=False, max_num_batched_tokens=64, enable_prefix_caching=False)
    sim, _ = run_all(sched)
    for out in sim.steps:
        for c in out.chunks:
            assert c.sample  # never a partial prompt


def test_no_chunking_needs_budget_for_max_model_len():
    with pytest.raises(FractalError, match="max_num_batched_tokens"):
        make(enable_chunked_prefill=False, max_num_batched_tokens=16, max_model_len=64)


def test_pool_smaller_than_context_is_rejected():
    with pytest.raises(FractalError, match="max_model_len=64 exceeds the KV pool"):
        make(num_blocks=8, block_size=4, max_model_len=64)


def test_preemption_by_recompute_newest_first():
    # 10 blocks of 4 = 40 slots; five sequences of up to 10+12 tokens cannot all stay resident
    sched = make(num_blocks=10, block_size=4, max_model_len=40, enable_prefix_caching=False)
    sim, seqs = run_all(sched, max_tokens=12)
    assert sched.num_preempted_total > 0
    first_victim = next(out.preempted_seq_ids[0] for out in sim.steps if out.preempted_seq_ids)
    # the first preemption takes the newest sequence then running
    assert first_victim == max(s.seq_id for s in seqs)
    assert seqs[0].num_preemptions == 0  # the oldest is never the victim while others run


def test_preemption_with_prefix_cache_and_chunks():
    sched = make(num_blocks=9, block_size=4, max_model_len=36, prefill_chunk_size=3, max_num_batched_tokens=8)
    _, seqs = run_all(sched, max_tokens=10)
    assert sched.num_preempted_total > 0


def test_prefix_cache_hits_counted_and_shared():
    sched = make(block_size=4)
    sim = PagedSim(sched)
    shared = list(range(1, 13))  # 3 full blocks
    a = sim.add(shared + [20, 21], 4)[0]
    sim.step()  # a's prompt computed and registered
    b = sim.add(shared + [30], 4)[0]
    out = sim.step()
    chunk_b = next(c for c in out.chunks if c.seq_id == b.seq_id)
    # 12 shared tokens are cached, but >= 1 token must be computed: b has 13 tokens, so 3 blocks hit
    assert chunk_b.start_pos == 12 and chunk_b.token_ids == [30]
    assert chunk_b.block_table[:3] == a.block_ids[:3]
    assert all(sched.kv.pool.blocks[i].ref_cnt == 2 for i in a.block_ids[:3])
    assert sched.kv.prefix_queries == 14 + 13 and sched.kv.prefix_hits == 12
    sim.run()
    assert a.output_token_ids == reference(shared + [20, 21], 4)
    assert b.output_token_ids == reference(shared + [30], 4)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_prefix_cache_survives_finish_then_evicts_lru():
    sched = make(num_blocks=6, block_size=4, max_model_len=24)
    sim = PagedSim(sched)
    p1 = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    sim.add(p1, 1)
    sim.run()
    assert sched.kv.pool.num_cached_blocks == 2  # blocks [1..4], [5..8]
    again = sim.add(p1, 1)[0]
    out = sim.step()
    assert out.chunks[0].start_pos == 8  # both blocks reused after their owner finished
    assert again.num_cached_tokens == 8
    sim.run()
    # a different prompt filling the pool evicts cached blocks
    sim.add(list(range(100, 123)), 1)
    sim.run()
    assert sched.kv.pool.lookup(hash_block(None, [1, 2, 3, 4])) is None
    assert sched.kv.pool.num_evictions >= 2


def test_block_pool_lru_order_and_refcounts():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.free([b, a])  # tail first: b is evicted before a
    pool.free([c])  # uncached: goes to the front, reused before cached ones
    assert pool.num_free_blocks == 4
    first = pool.allocate(1)[0]
    assert first is c
    got = pool.allocate(2)  # block 3 (never used) then b (oldest cached)
    assert [x.block_id for x in got] == [3, b.block_id]
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") is a
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.free([c, c])


def test_fork_shares_prompt_blocks():
    sched = make(block_size=4, enable_prefix_caching=False)
    sim = PagedSim(sched)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    parent, s1, s2 = sim.add(prompt, 5, n=3)
    first = sim.step()
    assert [c.seq_id for c in first.chunks] == [parent.seq_id]  # siblings wait for the parent's prompt
    second = sim.step()
    sib = [c for c in second.chunks if c.seq_id in (s1.seq_id, s2.seq_id)]
    assert [c.start_pos for c in sib] == [8, 8]
    for c in sib:
        assert c.block_table[:2] == parent.block_ids[:2]
    assert all(sched.kv.pool.blocks[i].ref_cnt == 3 for i in parent.block_ids[:2])
    assert sched.kv.num_used_blocks == 2 + 3 * 1 + 0  # shared prompt blocks + one tail block each
    sim.run()
    # deterministic "sampling": every sibling continues identically from the same prompt
    for s in (parent, s1, s2):
        assert s.output_token_ids == reference(prompt, 5)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_shortest_first_order():
    sched = make(max_num_seqs=1, prefill_order="shortest", enable_prefix_caching=False)
    sim = PagedSim(sched)
    long_, short, mid = (sim.add(p, 1)[0] for p in ([1] * 9, [2] * 2, [3] * 5))
    order = []
    while sched.has_unfinished():
        out = sim.step()
        order += [c.seq_id for c in out.chunks]
    assert order == [short.seq_id, mid.seq_id, long_.seq_id]


def test_fcfs_order():
    sched = make(max_num_seqs=1, prefill_order="fcfs", enable_prefix_caching=False)
    sim = PagedSim(sched)
    seqs = [sim.add(p, 1)[0] for p in ([1] * 9, [2] * 2, [3] * 5)]
    order = []
    while sched.has_unfinished():
        order += [c.seq_id for c in sim.step().chunks]
    assert order == [s.seq_id for s in seqs]


def test_abort_frees_everything():
    sched = make(block_size=4, prefill_chunk_size=4)
    sim = PagedSim(sched)
    seqs = [sim.add(p, 20)[0] for p in PROMPTS]
    for _ in range(3):
        sim.step()
    assert sched.kv.num_used_blocks > 0
    for s in seqs:
        sched.finish(s, "abort")
    assert not sched.has_unfinished() and not sched.running and not sched.waiting
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert all(b.ref_cnt == 0 for b in sched.kv.pool.blocks)
    assert all(s.finish_reason == "abort" and s.status is SeqStatus.FINISHED for s in seqs)


def test_stop_rules():
    p = SamplingParams(max_tokens=3, stop_token_ids=[7], min_tokens=1)
    s = Sequence(0, "r", 0, 0, [1, 2], 2, p)
    s.token_ids.append(9)
    assert check_token_stop(s, frozenset({9}), 100) == ("stop", None)
    s.token_ids[-1] = 7
    assert check_token_stop(s, frozenset(), 100) == ("stop", 7)
    s.token_ids[-1] = 5
    assert check_token_stop(s, frozenset(), 3) == ("length", None)
    s.token_ids += [5, 5]
    assert check_token_stop(s, frozenset(), 100) == ("length", None)
    q = SamplingParams(max_tokens=3, min_tokens=2, ignore_eos=True)
    t = Sequence(1, "q", 0, 1, [1], 1, q)
    t.token_ids.append(9)
    assert check_token_stop(t, frozenset({9}), 100) is None


def test_scheduler_imports_no_torch():
    code = (
        "import sys; import fractal.engine.scheduler, fractal.engine.kv_cache_manager, fractal.engine.config;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_preempts_newer_decode_already_scheduled():
    # A (older) prefills 15 tokens in chunks of 4 while B (newer, 3 tokens) decodes; at step 4 A needs a
    # block the pool no longer has, so B (newest) is preempted although it was already scheduled: its
    # chunk is withdrawn and its token returns to the budget.
    sched = make(num_blocks=5, block_size=4, max_model_len=20, prefill_chunk_size=4, max_num_batched_tokens=8,
                 enable_prefix_caching=False)
    sim = PagedSim(sched)
    a = sim.add(list(range(1, 16)), 3)[0]
    b = sim.add([40, 41, 42], 8)[0]
    for _ in range(3):
        sim.step()
    out = sim.step()
    assert out.preempted_seq_ids == [b.seq_id]
    assert [c.seq_id for c in out.chunks] == [a.seq_id]
    assert b.status is SeqStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    sim.run()
    assert a.output_token_ids == reference(list(range(1, 16)), 3)
    assert b.output_token_ids == reference([40, 41, 42], 8)
    assert sched.kv.num_free_blocks == 5


@pytest.mark.parametrize("caching", [False, True])
def test_fork_after_parent_finished(caching):
    # max_tokens=1: the parent finishes in the step that computes its prompt, before siblings can fork;
    # they then prefill on their own (from the prefix cache when it is on)
    sched = make(block_size=4, enable_prefix_caching=caching)
    sim = PagedSim(sched)
    prompt = list(range(1, 11))
    seqs = sim.add(prompt, 1, n=3)
    sim.run()
    assert all(s.output_token_ids == reference(prompt, 1) for s in seqs)
    assert sched.kv.prefix_hits == (16 if caching else 0)  # two siblings x two full blocks
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_engine_config_validation():
    from fractal.engine.config import EngineConfig

    with pytest.raises(FractalError, match="prefill_order='lifo'"):
        EngineConfig(model="m", prefill_order="lifo")
    with pytest.raises(FractalError, match="block_size=0"):
        EngineConfig(model="m", block_size=0)
    with pytest.raises(FractalError, match="device='tpu'"):
        EngineConfig(model="m", device="tpu")
    with pytest.raises(FractalError, match="unknown engine option.*max_seqs"):
        EngineConfig.from_kwargs("m", max_seqs=3)
    assert SchedulerConfig(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                           max_model_len=16, prefill_chunk_size=5).chunk_cap == 5


def _finish_steps(sim) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, out in enumerate(sim.steps):
        for c in out.chunks:
            last[c.seq_id] = i
    return last


def test_preemption_balance_ends_the_second_wave():
    """Sixteen sequences outgrow a 48-block pool midway. Without balancing the preempted ones wait until the
    others finish and then decode alone (a second wave); with it they take turns with the most advanced ones
    (swapped out to host memory), so everybody finishes close together, in fewer steps, with the same tokens
    (run_all checks them)."""
    prompts = [[(i * 7 + j) % VOCAB for j in range(8)] for i in range(16)]
    steps, spread, preempted = {}, {}, {}
    for balance in (0, 4):
        sched = make(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=False,
                     preemption_balance=balance, num_host_blocks=1000)
        sim, _ = run_all(sched, prompts=prompts, max_tokens=24)
        finish = sorted(_finish_steps(sim).values())
        steps[balance], spread[balance], preempted[balance] = len(sim.steps), finish[-1] - finish[0], \
            sched.num_preempted_total
        if balance:
            # a swap preempts a running decode although the pool had room for its next token: the swapped-out
            # sequence is never re-admitted in the step that preempted it
            for out in sim.steps:
                readmitted = {c.seq_id for c in out.chunks} & set(out.preempted_seq_ids)
                assert not readmitted
    assert preempted[4] > preempted[0]
    assert steps[4] < steps[0] and spread[4] < spread[0]


def test_preemption_balance_needs_swap_space_and_is_validated():
    prompts = [[(i * 7 + j) % VOCAB for j in range(8)] for i in range(16)]
    sched = make(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=False,
                 preemption_balance=4)  # no host blocks: preemption recomputes and balancing never swaps
    run_all(sched, prompts=prompts, max_tokens=24)
    assert sched.num_preempted_total > 0 and sched.num_balance_swaps == 0
    assert make().config.preemption_balance == 0
    with pytest.raises(FractalError, match="preemption_balance"):
        from fractal.engine.config import EngineConfig
        EngineConfig(model="x", preemption_balance=-1)



def test_swap_preemption_resumes_without_recompute():
    """With swap space every preempted sequence's KV goes to the host and comes back into new blocks (the paged
    replay copies slot contents both ways, so a wrong block list or count gives wrong tokens): no token is
    computed twice, and the host blocks are all free again at the end."""
    prompts = [[(i * 7 + j) % VOCAB for j in range(8)] for i in range(16)]
    max_tokens = 24
    for balance in (0, 4):
        sched = make(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=False,
                     preemption_balance=balance, num_host_blocks=1000)
        sim, seqs = run_all(sched, prompts=prompts, max_tokens=max_tokens)
        assert sched.num_swapped_out_total == sched.num_preempted_total > 0
        computed = sum(c.num_tokens for out in sim.steps for c in out.chunks)
        assert computed == sum(len(p) for p in prompts) + len(prompts) * (max_tokens - 1)
        assert sched.host_free_blocks == 1000 and not sim.host


def test_swap_space_too_small_falls_back_to_recompute():
    prompts = [[(i * 7 + j) % VOCAB for j in range(8)] for i in range(16)]
    sched = make(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=True,
                 preemption_balance=4, num_host_blocks=14)  # room for two sequences' KV at most
    sim, _ = run_all(sched, prompts=prompts, max_tokens=24)
    assert 0 < sched.num_swapped_out_total < sched.num_preempted_total
    assert sched.host_free_blocks == 14 and not sim.host
