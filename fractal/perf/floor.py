"""Stable API: the floor of one engine step, for the engine, benchmarks, simulator and metrics.

    from fractal.perf.floor import load_model_spec, load_gpu, step_floor

    model = load_model_spec("deepseek-v2-lite")   # shipped name, HF config dict, config.json or model dir
    gpu = load_gpu("h100")                         # shipped name or a GPU JSON file
    f = step_floor(model, gpu, num_seqs=32, new_tokens_per_seq=1, context_len=1024)      # decode step
    f = step_floor(model, gpu, num_seqs=1, new_tokens_per_seq=2048, context_len=0)       # prefill
    f = step_floor(model, gpu, num_seqs=3, new_tokens_per_seq=[1, 1, 512],               # mixed chunk:
                   context_len=[900, 40, 0])                                              # per-sequence lists
    f.floor_s, f.bound                                  # step time under the overlap rule; "compute"/"hbm"/"comm"
    mfu = f.flops / (measured_s * gpu.peak_flops(f.compute_dtype))     # or f.mfu(measured_s)
    mbu = f.hbm_bytes / (measured_s * gpu.hbm_bw)                      # or f.mbu(measured_s)

Units: FLOPs, bytes, seconds. Defaults: one GPU (plan None = tp1), efficiencies 1.0 (a true floor),
per-operator roofline overlap (see fractal.perf.step), flash attention, MLA absorbed when every sequence
brings one token and expanded (MHA-style) otherwise, LM head on one row per sequence. Numbers are for
the busiest GPU of the plan; `plan` is a string like "tp2" or "dp8-ep8" or a PhasePlan.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fractal.errors import FractalError
from fractal.perf.ops import ModelOptions, SeqGroup, StepShape
from fractal.perf.step import Efficiency, step_cost
from fractal.spec.gpu import GpuSpec, load_gpu
from fractal.spec.model import ModelSpec, load_model_spec
from fractal.spec.parallel import PhasePlan, parse_phase_plan
from fractal.spec.precision import parse_precision

__all__ = ["Floor", "load_model_spec", "load_gpu", "step_floor", "ModelSpec", "GpuSpec"]


@dataclass(frozen=True)
class Floor:
    flops: float
    hbm_bytes: float
    comm_bytes: float
    compute_time_s: float
    hbm_time_s: float
    comm_time_s: float
    floor_s: float
    bound: str
    compute_dtype: str
    peak_flops: float
    hbm_bw: float
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    act_bytes: float = 0.0

    def mfu(self, measured_s: float) -> float:
        return self.flops / (measured_s * self.peak_flops)

    def mbu(self, measured_s: float) -> float:
        return self.hbm_bytes / (measured_s * self.hbm_bw)


def _shape(num_seqs: int, new, ctx) -> StepShape:
    if num_seqs < 1:
        raise FractalError(f"num_seqs={num_seqs} is invalid: must be >= 1")
    news = list(new) if isinstance(new, Sequence) else [new] * num_seqs
    ctxs = list(ctx) if isinstance(ctx, Sequence) else [ctx] * num_seqs
    for name, values in (("new_tokens_per_seq", news), ("context_len", ctxs)):
        if len(values) != num_seqs:
            raise FractalError(f"{name} has {len(values)} entries: a list must have num_seqs={num_seqs}")
    bad_new = next((n for n in news if n < 1), None)
    if bad_new is not None:
        raise FractalError(f"new_tokens_per_seq={bad_new} is invalid: every sequence brings >= 1 token")
    bad_ctx = next((c for c in ctxs if c < 0), None)
    if bad_ctx is not None:
        raise FractalError(f"context_len={bad_ctx} is invalid: must be >= 0")
    groups: dict[tuple[int, int], int] = {}
    for n, c in zip(news, ctxs):
        groups[(int(n), int(c))] = groups.get((int(n), int(c)), 0) + 1
    return StepShape(tuple(SeqGroup(k, n, c) for (n, c), k in groups.items()), num_seqs)


def step_floor(model: ModelSpec | str, gpu: GpuSpec | str, *, num_seqs: int, new_tokens_per_seq: int | Sequence[int],
               context_len: int | Sequence[int], weight_dtype: str = "bf16", kv_dtype: str = "bf16",
               act_dtype: str | None = None, plan: PhasePlan | str | None = None, mla_mode: str = "auto",
               overlap: str = "op", eff: Efficiency = Efficiency()) -> Floor:
    """The floor of one step: num_seqs sequences each adding new_tokens_per_seq tokens after context_len
    cached ones (ints, or per-sequence lists for a mixed batch). act_dtype defaults to the weight dtype
    when that is fp8 (W8A8), else bf16."""
    m = load_model_spec(model)
    g = load_gpu(gpu)
    pl = PhasePlan() if plan is None else (parse_phase_plan(plan) if isinstance(plan, str) else plan)
    pl.validate(m)
    prec = parse_precision(weight_dtype, act_dtype, kv_dtype)
    cost = step_cost(m, g, prec, pl, _shape(num_seqs, new_tokens_per_seq, context_len),
                     opts=ModelOptions(mla_mode=mla_mode), eff=eff, overlap=overlap)
    return Floor(cost.flops, cost.hbm_bytes, cost.comm_bytes, cost.compute_time_s, cost.hbm_time_s, cost.comm_time_s,
                 cost.step_time_s, cost.bound, prec.compute_dtype, g.peak_flops(prec.compute_dtype), g.hbm_bw,
                 cost.weight_bytes, cost.kv_bytes, cost.act_bytes)
