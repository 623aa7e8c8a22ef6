"""Does vLLM's dummy-weight init concentrate MoE routing in a greedy decode? (the peer figures' workload)

    python3 tools/peer_dummy_routing.py [--steps 256] [--batch 64]

vLLM's `--load-format dummy` fills every floating-point tensor with uniform(-1e-3, 1e-3) from a generator freshly
seeded 1234 per tensor, on the GPU (vllm/model_executor/model_loader/weight_utils.py, initialize_dummy_weights). So
tensors of one shape are equal: every layer is the same, the lm_head equals the embedding, every RMSNorm weight is
one vector g. With weights of 1e-3, a layer adds ~1e-7 to a residual stream of ~6e-4 (the embedding), so the hidden
state at every layer is the current token's embedding to within a few 0.1 %, and greedy decoding becomes the map
t -> argmax_j <E_j, norm(E_t)>; routing is top-k of softmax(W_gate norm(E_t)). This script iterates that map from
random prompt ends, on the GPU with vLLM's generator calls, and prints per decode step how many distinct tokens
and distinct experts (per layer; all layers are equal) a batch touches, against what uniform routing touches.
"""
from __future__ import annotations

import argparse

import torch

SHAPES = {  # vocab, hidden, routed experts, top-k
    "deepseek-v2-lite": (102400, 2048, 64, 6),
    "qwen3-30b-a3b": (151936, 2048, 128, 8),
}


def vllm_dummy(shape, dtype=torch.bfloat16) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    t.uniform_(-1e-3, 1e-3, generator=gen)
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def run(name: str, steps: int, batch: int) -> None:
    V, H, E, K = SHAPES[name]
    emb, lm_head, g, gate = vllm_dummy((V, H)), vllm_dummy((V, H)), vllm_dummy((H,)), vllm_dummy((E, H))
    print(f"\n{name}: lm_head == embedding: {torch.equal(emb, lm_head)}; batch {batch}, {steps} greedy steps")
    tok = torch.randint(0, V, (batch,), generator=torch.Generator().manual_seed(0)).cuda()
    uniform = E * (1 - (1 - K / E) ** batch)
    rows = []
    for step in range(steps):
        x = rms_norm(emb[tok], g)
        experts = torch.softmax((x @ gate.t()).float(), -1).topk(K).indices.unique().numel()
        tok = (x @ lm_head.t()).argmax(-1)
        rows.append((step, tok.unique().numel(), experts))
    for step, toks, experts in rows:
        if step in (0, 1, 2, 4, 8, 16, 32, 64, 128, steps - 1):
            print(f"  step {step:4d}: distinct tokens {toks:4d}, distinct experts {experts:3d} "
                  f"(uniform routing: {uniform:.1f})")
    mean = sum(r[2] for r in rows) / len(rows)
    print(f"  mean distinct experts per step {mean:.1f} of {E}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    for name in SHAPES:
        for b in (a.batch, 256):
            run(name, a.steps, b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
