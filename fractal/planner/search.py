"""Search deployments of a model on N GPUs under TTFT/TPOT targets, ranked by output tokens/s per GPU.

Layouts searched:
- aggregated: `n` identical instances of one phase plan (tp, dp, ep, pp) doing both phases with chunked
  prefill. Each step of a DP rank carries B decodes plus the prompt tokens that keep up with them,
  P = B * isl / osl (steady state: B/osl requests finish per step). TPOT = pp * t(B decodes + P prefill
  tokens); TTFT = ceil(isl / C) * pp * t(B decodes + C prefill tokens) for prefill chunk C >= P.
- disaggregated: n_p prefill instances (plan, prompts per step b) and n_d decode instances (plan, batch B),
  n_p*g_p + n_d*g_d <= N. TTFT = pp * t_prefill(b prompts) (KV push overlapped, layer-wise);
  TPOT = pp * t_decode(B at KV length isl + osl/2). Request rate = min(n_p * b*dp_p / t_p, n_d * B*dp_d / (t_d*osl)).
Output tokens/s per GPU = request rate * osl / GPUs used. A candidate is one (layout, batch, chunk, ratio)
combination; step costs are cached per (plan, shape), so tens of thousands of candidates take seconds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from fractal.errors import FractalError
from fractal.perf.ops import ModelOptions, SeqGroup, StepShape
from fractal.perf.step import Efficiency, StepCost, step_cost
from fractal.spec.gpu import GpuSpec
from fractal.spec.model import ModelSpec
from fractal.spec.parallel import PhasePlan
from fractal.spec.precision import Precision

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PREFILL_PROMPTS = (1, 2, 4, 8, 16)
CHUNKS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class PlanQuery:
    model: ModelSpec
    gpu: GpuSpec
    precision: Precision
    gpus: int
    isl: int
    osl: int
    ttft_s: float
    tpot_s: float
    prefix_hit: float = 0.0
    imbalance: float = 1.0
    eff: Efficiency = Efficiency()
    overlap: str = "op"
    reserve_bytes: float | None = None
    modes: tuple[str, ...] = ("aggregated", "disaggregated")


@dataclass(frozen=True)
class Candidate:
    mode: str
    prefill: PhasePlan
    decode: PhasePlan
    p_instances: int
    d_instances: int
    gpus_used: int
    decode_batch: int  # per DP rank
    prefill_chunk: int  # prompt tokens per DP rank per step (prefill instance or mixed step)
    ttft_s: float
    tpot_s: float
    tokens_per_s_per_gpu: float
    bound: str

    @property
    def plan_string(self) -> str:
        if self.mode == "aggregated":
            return str(self.decode)
        return f"prefill={self.prefill},decode={self.decode},pd={self.p_instances}:{self.d_instances}"


@dataclass
class SearchResult:
    best: list[Candidate]
    searched: int
    feasible: int
    seconds: float
    unique_steps: int
    notes: list[str] = field(default_factory=list)


def phase_plans(model: ModelSpec, max_gpus: int, gpn: int) -> list[PhasePlan]:
    """Valid plans up to max_gpus: tp <= 2 nodes, powers of two; dp > 1 and ep only for MoE models."""
    out = []
    pows = [1 << i for i in range(0, 10) if (1 << i) <= max_gpus]
    for pp in (1, 2, 4, 8):
        for tp in pows:
            if tp > 2 * gpn:
                continue
            for dp in pows if model.moe else [1]:
                if tp * dp * pp > max_gpus:
                    continue
                for ep in ([e for e in pows if (tp * dp) % e == 0] if model.moe else [1]):
                    plan = PhasePlan(tp, dp, ep, pp)
                    try:
                        plan.validate(model)
                    except FractalError:
                        continue
                    out.append(plan)
    return out


class _Evaluator:
    """Caches step costs by (plan, shape) and memory checks."""

    def __init__(self, q: PlanQuery):
        self.q = q
        self.opts = ModelOptions(imbalance=q.imbalance)
        self.cache: dict = {}

    def step(self, plan: PhasePlan, shape: StepShape, held: float, transfer: float = 0.0) -> StepCost:
        key = (plan, shape, held, transfer)
        hit = self.cache.get(key)
        if hit is None:
            q = self.q
            hit = step_cost(q.model, q.gpu, q.precision, plan, shape, opts=self.opts, eff=q.eff, overlap=q.overlap,
                            kv_tokens_held=held, reserve_bytes=q.reserve_bytes, kv_transfer_tokens=transfer)
            self.cache[key] = hit
        return hit

    def fits(self, cost: StepCost) -> bool:
        return cost.memory.total <= self.q.gpu.hbm_bytes


def _prefill_shape(tokens: float, isl: int, cached: int) -> StepShape:
    """`tokens` prompt tokens of prompts of length isl (cached prefix `cached`), as whole prompts or one chunk."""
    new = isl - cached
    if tokens >= new:
        return StepShape((SeqGroup(tokens / new, new, cached),), tokens / new)
    t = max(1, int(tokens))
    return StepShape((SeqGroup(1, t, cached + (new - t) // 2),), 1)


def _mixed_shape(batch: int, kv: int, prefill: StepShape) -> StepShape:
    return StepShape((SeqGroup(batch, 1, kv),) + prefill.groups, batch + prefill.logits_rows)


def search(q: PlanQuery, top: int = 5) -> SearchResult:
    t0 = time.perf_counter()
    ev = _Evaluator(q)
    plans = phase_plans(q.model, q.gpus, q.gpu.gpus_per_node)
    if not plans:
        raise FractalError(f"no parallel plan of {q.model.name} fits in {q.gpus} GPUs")
    cached = int(round(q.isl * q.prefix_hit))
    new = q.isl - cached
    kv_dec = q.isl + q.osl // 2
    held_dec = lambda b: b * (q.isl + q.osl)  # noqa: E731
    results: list[Candidate] = []
    searched = 0

    # decode-only and prefill-only costs shared by the disaggregated layouts
    dec: dict[tuple[PhasePlan, int], tuple[float, float, str]] = {}  # -> (tpot, tokens/s per instance, bound)
    pre: dict[tuple[PhasePlan, int], tuple[float, float, str]] = {}  # -> (ttft, requests/s per instance, bound)
    if "disaggregated" in q.modes:
        for plan in plans:
            for b in DECODE_BATCHES:
                c = ev.step(plan, StepShape.uniform(b, 1, kv_dec), held_dec(b))
                searched += 1
                if ev.fits(c) and plan.pp * c.step_time_s <= q.tpot_s:
                    dec[(plan, b)] = (plan.pp * c.step_time_s, b * plan.dp / c.step_time_s, c.bound)
            for n in PREFILL_PROMPTS:
                c = ev.step(plan, StepShape.uniform(n, new, cached), n * q.isl, transfer=n * q.isl)
                searched += 1
                if ev.fits(c) and plan.pp * c.step_time_s <= q.ttft_s:
                    pre[(plan, n)] = (plan.pp * c.step_time_s, n * plan.dp / c.step_time_s, c.bound)
        # keep, per plan, the prefill option with the best rate per GPU and every decode batch
        best_pre: dict[PhasePlan, tuple[int, tuple[float, float, str]]] = {}
        for (plan, n), v in pre.items():
            if plan not in best_pre or v[1] > best_pre[plan][1][1]:
                best_pre[plan] = (n, v)
        for (dplan, b), (tpot, tok_rate, dbound) in dec.items():
            for pplan, (n, (ttft, req_rate, pbound)) in best_pre.items():
                for n_d in range(1, q.gpus // dplan.gpus + 1):
                    left = q.gpus - n_d * dplan.gpus
                    max_p = left // pplan.gpus
                    searched += max_p
                    if max_p < 1:
                        continue
                    d_req = n_d * tok_rate / q.osl
                    n_p = min(max_p, max(1, math.ceil(d_req / req_rate)))
                    rate = min(n_p * req_rate, d_req)
                    used = n_p * pplan.gpus + n_d * dplan.gpus
                    bound = f"P:{pbound} D:{dbound}" + (" (P-limited)" if n_p * req_rate < d_req else "")
                    results.append(Candidate("disaggregated", pplan, dplan, n_p, n_d, used, b, n * new, ttft, tpot,
                                             rate * q.osl / used, bound))

    if "aggregated" in q.modes:
        for plan in plans:
            n_inst = q.gpus // plan.gpus
            for b in DECODE_BATCHES:
                p_tok = b * new / q.osl
                avg = ev.step(plan, _mixed_shape(b, kv_dec, _prefill_shape(p_tok, q.isl, cached)), held_dec(b))
                tpot = plan.pp * avg.step_time_s
                for chunk in CHUNKS:
                    searched += 1
                    if chunk < p_tok or not ev.fits(avg) or tpot > q.tpot_s:
                        continue
                    full = ev.step(plan, _mixed_shape(b, kv_dec, _prefill_shape(chunk, q.isl, cached)), held_dec(b) + chunk)
                    if not ev.fits(full):
                        continue
                    ttft = math.ceil(new / chunk) * plan.pp * full.step_time_s
                    if ttft > q.ttft_s:
                        continue
                    results.append(Candidate("aggregated", plan, plan, n_inst, n_inst, n_inst * plan.gpus, b, chunk, ttft,
                                             tpot, b * plan.dp / avg.step_time_s / plan.gpus, avg.bound))
    results.sort(key=lambda c: (-round(c.tokens_per_s_per_gpu, 6), c.ttft_s + c.tpot_s * q.osl, c.gpus_used))
    notes = []
    if not results:
        notes.append("no layout meets both targets; relax --ttft/--tpot, add GPUs or quantise weights")
    return SearchResult(_distinct(results, top), searched, len(results), time.perf_counter() - t0, len(ev.cache), notes)


def _distinct(cands: list[Candidate], top: int) -> list[Candidate]:
    """Best `top`, one per (mode, decode-side plan) so the list shows different layouts; the best layout of
    each mode is always included."""
    seen, out = set(), []
    for c in cands:
        key = (c.mode, str(c.decode))
        if key in seen:
            continue
        seen.add(key)
        out.append(c)
        if len(out) == top:
            break
    for mode in ("aggregated", "disaggregated"):
        best = next((c for c in cands if c.mode == mode), None)
        if best is not None and best not in out:
            out.append(best)
    return out
