"""Graph ladder: padding/slicing semantics on CPU (eager), and replay == eager on the GPU with real kernels."""
import pytest
import torch

from fractal.errors import FractalError
from fractal.kernels.cuda_graphs import CudaGraphLadder


def test_ladder_eager_padding_cpu():
    seen = []

    def fn(x, lens):
        seen.append((x.shape[0], lens.tolist()))
        return x * 2, lens + 1

    ladder = CudaGraphLadder(fn, {"x": torch.zeros(8, 3), "lens": torch.zeros(8, dtype=torch.int32)}, [1, 4, 8],
                             pad_values={"lens": 1})
    assert not ladder.enabled and ladder.padded_size(3) == 4 and ladder.padded_size(5) == 8
    y, lens = ladder.run(3, x=torch.ones(3, 3), lens=torch.tensor([5, 6, 7], dtype=torch.int32))
    assert seen[-1] == (4, [5, 6, 7, 1])  # padded to 4 rows, padding row valid
    assert y.shape == (3, 3) and torch.equal(y, torch.full((3, 3), 2.0)) and lens.tolist() == [6, 7, 8]
    with pytest.raises(FractalError):
        ladder.padded_size(9)


@pytest.mark.gpu
def test_ladder_replay_matches_eager_gpu():
    from fractal.kernels.paged_attention import paged_decode_attention
    from fractal.kernels.rmsnorm import rms_norm

    torch.manual_seed(0)
    page, hq, hkv, d, max_b, max_blocks = 16, 8, 2, 64, 16, 8
    cache = torch.randn(2, 200, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(hq * d, device="cuda", dtype=torch.bfloat16) + 0.5

    def step(q, block_tables, seq_lens):
        o = paged_decode_attention(q, cache, block_tables, seq_lens, d ** -0.5, max_seq_len=page * max_blocks)
        return rms_norm(o.reshape(o.shape[0], -1), w, 1e-6)

    static = {"q": torch.zeros(max_b, hq, d, device="cuda", dtype=torch.bfloat16),
              "block_tables": torch.zeros(max_b, max_blocks, device="cuda", dtype=torch.int32),
              "seq_lens": torch.ones(max_b, device="cuda", dtype=torch.int32)}
    ladder = CudaGraphLadder(step, static, [1, 2, 4, 8, 16], pad_values={"seq_lens": 1})
    assert ladder.enabled
    for n in (1, 3, 8, 13):
        q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
        bt = torch.randint(0, 200, (n, max_blocks), device="cuda", dtype=torch.int32)
        sl = torch.randint(1, page * max_blocks + 1, (n,), device="cuda", dtype=torch.int32)
        got = ladder.run(n, q=q, block_tables=bt, seq_lens=sl).clone()
        torch.testing.assert_close(got, step(q, bt, sl), rtol=0, atol=0)
