"""Token sampling on the device with per-row parameters and no host round-trip before the ids are ready.

sample(logits [B, V], temperature [B], top_k int [B], top_p [B]) -> ids int64 [B]
    temperature <= 0: greedy (argmax of the raw logits)
    top_k <= 0 or >= V: no top-k cut;  top_p >= 1: no nucleus cut
    else: logits / temperature, keep the top_k best, then the smallest prefix of the sorted tokens whose
    probability mass reaches top_p (the best token always stays), and draw from the renormalised softmax by the
    exponential race argmax(p / E), E ~ Exp(1) i.i.d. (equivalent to a multinomial draw, but with no
    host synchronisation, so it can sit in a CUDA graph). `noise` [B, V] (Exp(1) per vocab id) may be given
    for reproducible tests; otherwise it is drawn with `generator`.
Only device ops are used (sort or topk, softmax, cumsum, argmax): the single host copy is the caller's .tolist().
"""
from __future__ import annotations

import torch


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Row-by-row plain torch (host loop), same rule as `sample`."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    for i in range(B):
        t, k, p = float(temperature[i]), int(top_k[i]), float(top_p[i])
        if t <= 0:
            out[i] = logits[i].argmax()
            continue
        lg = logits[i].float() / t
        if 0 < k < V:
            kth = lg.topk(k).values[-1]
            lg = lg.masked_fill(lg < kth, float("-inf"))
        if p < 1:
            probs = torch.softmax(lg, dim=-1)
            sp, order = probs.sort(descending=True)
            drop = (sp.cumsum(0) - sp) > p
            lg = lg.clone()
            lg[order[drop]] = float("-inf")
        probs = torch.softmax(lg, dim=-1)
        out[i] = (probs / noise[i]).argmax()
    return out


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Vectorised sampling (see module docstring). max_top_k: host bound on top_k when every row has one; then a
    topk of that width replaces the full vocabulary sort."""
    B, V = logits.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    lg = logits.float() / t[:, None]
    if max_top_k is not None and 0 < max_top_k < V:
        sorted_l, idx = lg.topk(max_top_k, dim=-1)
    else:
        sorted_l, idx = lg.sort(dim=-1, descending=True)
    width = sorted_l.shape[1]
    k = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k).to(torch.long)
    ranks = torch.arange(width, device=logits.device)
    sorted_l = sorted_l.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_l, dim=-1)
    drop = (probs.cumsum(-1) - probs) > top_p.float()[:, None]
    sorted_l = sorted_l.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_l, dim=-1)
    if noise is None:
        e = torch.empty_like(probs).exponential_(generator=generator)
    else:
        e = noise.float().gather(1, idx)
    choice = (probs / e).argmax(dim=-1, keepdim=True)
    ids = idx.gather(1, choice).squeeze(1)
    return torch.where(greedy, logits.argmax(dim=-1), ids)
