"""Cost of one step on the busiest GPU: totals, times per resource, the overlap rule, memory held.

Times: compute = sum over ops of flops / (peak(dtype) * eff.compute); HBM = bytes / (bandwidth * eff.hbm);
comm = intra / (intra_bw * eff.comm) + inter / (inter_bw * eff.comm) (the seed article adds the two parts).

Overlap rules (`overlap`):
- "op" (default): operators run one after another; inside an operator compute and HBM traffic overlap
  (roofline), communication does not overlap compute:  step = sum_op max(t_compute, t_hbm) + sum t_comm.
  Transfers marked `background` (PD KV push, layer-wise) overlap the whole step: step = max(that, rest).
- "full": everything overlaps: step = max(T_compute, T_hbm, T_comm).
- "none": nothing overlaps (seed article table 9): step = T_compute + T_hbm + T_comm.
The binding resource (`bound`) is the one whose time dominates the step: under "op", compute or HBM by the
summed time of the operators each one bounds, against the comm time.

Pipeline parallel: each stage is costed separately; the slowest stage's time and traffic are reported
together with the fullest stage's memory; pp micro-batches of this shape are in flight, so KV held is pp
times larger.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fractal.errors import FractalError
from fractal.perf import ops as O
from fractal.spec.gpu import GpuSpec
from fractal.spec.model import ModelSpec
from fractal.spec.parallel import PhasePlan
from fractal.spec.precision import Precision

GIB = 1024.0**3
OVERLAP_RULES = ("op", "full", "none")


@dataclass(frozen=True)
class Efficiency:
    """Achievable fraction of each peak (1.0 = the hardware floor). Calibrate from measurements:
    eff = modelled time at 1.0 / measured time for a step bound by that resource."""

    compute: float = 1.0
    hbm: float = 1.0
    comm: float = 1.0

    def __post_init__(self):
        for k in ("compute", "hbm", "comm"):
            v = getattr(self, k)
            if not 0 < v <= 1.0:
                raise FractalError(f"efficiency {k}={v} must be in (0, 1]")


@dataclass(frozen=True)
class MemoryUse:
    weights: float
    kv: float
    activations: float
    reserve: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations + self.reserve

    @property
    def utilisation(self) -> float:
        return self.total / self.capacity


@dataclass(frozen=True)
class OpTotal:
    """One operator summed over the layers of the reported stage, with its times."""

    name: str
    part: str
    layers: float
    flops: float
    weight_bytes: float
    kv_bytes: float
    act_bytes: float
    comm_intra: float
    comm_inter: float
    compute_s: float
    hbm_s: float
    comm_s: float
    background: bool = False  # overlaps the whole step (layer-wise PD KV push)

    @property
    def hbm_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def comm_bytes(self) -> float:
        return self.comm_intra + self.comm_inter

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.hbm_s) + self.comm_s

    @property
    def bound(self) -> str:
        if self.comm_s > max(self.compute_s, self.hbm_s):
            return "comm"
        return "compute" if self.compute_s >= self.hbm_s else "hbm"


@dataclass(frozen=True)
class StepCost:
    ops: tuple[OpTotal, ...]
    flops: float
    weight_bytes: float
    kv_bytes: float
    act_bytes: float
    comm_intra_bytes: float
    comm_inter_bytes: float
    compute_time_s: float
    hbm_time_s: float
    comm_time_s: float
    step_time_s: float
    bound: str
    memory: MemoryUse
    stage: int = 0
    stages: int = 1

    @property
    def hbm_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def comm_bytes(self) -> float:
        return self.comm_intra_bytes + self.comm_inter_bytes


def default_reserve(gpu: GpuSpec) -> float:
    """Runtime reserve (CUDA context, comm buffers, CUDA graphs): the article's ~10 GB per GPU, at most 10% of HBM."""
    return min(10 * GIB, 0.1 * gpu.hbm_bytes)


def stage_layers(model: ModelSpec, pp: int) -> list[tuple[int, int]]:
    """(dense layers, MoE layers) per pipeline stage, contiguous split, earlier stages take the remainder."""
    L = model.num_layers
    sizes = [L // pp + (1 if s < L % pp else 0) for s in range(pp)]
    out, start = [], 0
    for n in sizes:
        moe = sum(model.moe_layers[start:start + n])
        out.append((n - moe, moe))
        start += n
    return out


def _totals(op: O.OpCost, n: float, gpu: GpuSpec, eff: Efficiency) -> OpTotal:
    peak = gpu.peak_flops(op.dtype) if op.flops else 1.0
    ct = op.flops * n / (peak * eff.compute)
    ht = (op.weight_bytes + op.kv_bytes + op.act_bytes) * n / (gpu.hbm_bw * eff.hbm)
    mt = 0.0
    if op.comm_intra:
        mt += op.comm_intra * n / (gpu.intra_node_bw * eff.comm)
    if op.comm_inter:
        mt += op.comm_inter * n / (gpu.inter_node_bw * eff.comm)
    return OpTotal(op.name, op.part, n, op.flops * n, op.weight_bytes * n, op.kv_bytes * n, op.act_bytes * n,
                   op.comm_intra * n, op.comm_inter * n, ct, ht, mt)


def combine(all_ops: list[OpTotal], overlap: str) -> tuple[float, str, float, float, float]:
    """Apply the overlap rule: (step time, bound, compute time, hbm time, comm time)."""
    ops = [o for o in all_ops if not o.background]
    background = sum(o.comm_s for o in all_ops if o.background)
    c = sum(o.compute_s for o in ops)
    h = sum(o.hbm_s for o in ops)
    m = sum(o.comm_s for o in ops) + background
    if overlap == "op":
        c_b = sum(max(o.compute_s, o.hbm_s) for o in ops if o.compute_s >= o.hbm_s)
        h_b = sum(max(o.compute_s, o.hbm_s) for o in ops if o.compute_s < o.hbm_s)
        serial = sum(o.comm_s for o in ops)
        step = max(c_b + h_b + serial, background)
        shares = {"compute": c_b, "hbm": h_b, "comm": max(serial, background)}
    elif overlap == "full":
        step = max(c, h, m)
        shares = {"compute": c, "hbm": h, "comm": m}
    elif overlap == "none":
        step = c + h + m
        shares = {"compute": c, "hbm": h, "comm": m}
    else:
        raise FractalError(f"overlap rule {overlap!r} unknown; valid: {', '.join(OVERLAP_RULES)}")
    bound = max(shares, key=lambda k: shares[k])
    return step, bound, c, h, m


def step_cost(model: ModelSpec, gpu: GpuSpec, prec: Precision, plan: PhasePlan, shape: O.StepShape, *,
              opts: O.ModelOptions = O.ModelOptions(), eff: Efficiency = Efficiency(), overlap: str = "op",
              kv_tokens_held: float | None = None, reserve_bytes: float | None = None,
              kv_transfer_tokens: float = 0.0) -> StepCost:
    """Cost of one step of `shape` (per DP rank) under `plan`, on the slowest pipeline stage.

    kv_tokens_held: KV tokens this DP rank keeps (default: those the step reads, shape.kv_tokens).
    kv_transfer_tokens: prompt tokens whose KV is pushed to a decode instance (disaggregated prefill).
    """
    attn = O.attention_ops(model, prec, plan, shape, opts, gpu)
    dense = O.dense_ffn_ops(model, prec, plan, shape, gpu) if model.num_dense_layers else []
    moe = O.moe_ops(model, prec, plan, shape, opts, gpu) if model.moe else []
    held = O.held_weights(model, prec, plan)
    kv_tok = O.kv_bytes_per_token(model, prec, plan)
    kv_held = (shape.kv_tokens if kv_tokens_held is None else kv_tokens_held) * plan.pp
    reserve = default_reserve(gpu) if reserve_bytes is None else reserve_bytes
    act_peak = max(o.act_bytes for o in attn + dense + moe) + 2 * shape.tokens * model.hidden_size * prec.act_bytes
    worst: StepCost | None = None
    fullest: MemoryUse | None = None
    layout = stage_layers(model, plan.pp)
    for s, (n_dense, n_moe) in enumerate(layout):
        items: list[tuple[O.OpCost, float]] = [(o, n_dense + n_moe) for o in attn]
        items += [(o, n_dense) for o in dense] + [(o, n_moe) for o in moe]
        weights = held["attn"] * (n_dense + n_moe) + held["dense"] * n_dense + held["moe"] * n_moe
        if s == 0:
            items += [(o, 1) for o in O.embed_ops(model, prec, plan, shape)]
            weights += held["embed"]
        if s == len(layout) - 1:
            items += [(o, 1) for o in O.head_ops(model, prec, plan, shape)]
            if not (model.tie_word_embeddings and len(layout) == 1):
                weights += held["head"]
        else:
            items.append((O.pp_send_op(model, prec, plan, shape, gpu), 1))
        totals = [_totals(o, n, gpu, eff) for o, n in items if n]
        if kv_transfer_tokens:
            b = kv_transfer_tokens * kv_tok * (n_dense + n_moe) / plan.tp
            totals.append(OpTotal("pd_kv_transfer", "comm", 1, 0, 0, 0, 0, 0, b, 0.0, 0.0,
                                  b / (gpu.inter_node_bw * eff.comm), background=True))
        step, bound, c, h, m = combine(totals, overlap)
        mem = MemoryUse(weights, kv_held * kv_tok * (n_dense + n_moe), act_peak, reserve, gpu.hbm_bytes)
        cost = StepCost(tuple(totals), sum(t.flops for t in totals), sum(t.weight_bytes for t in totals),
                        sum(t.kv_bytes for t in totals), sum(t.act_bytes for t in totals),
                        sum(t.comm_intra for t in totals), sum(t.comm_inter for t in totals),
                        c, h, m, step, bound, mem, s, len(layout))
        if worst is None or cost.step_time_s > worst.step_time_s:
            worst = cost
        if fullest is None or mem.total > fullest.total:
            fullest = mem
    assert worst is not None and fullest is not None
    if fullest is not worst.memory:  # report the slowest stage's traffic with the fullest stage's memory
        worst = replace(worst, memory=fullest)
    return worst


# ---------------------------------------------------------------- phases: TTFT, TPOT, verdicts

TABLE1 = {"mfu_min": 0.60, "memory_max": 0.85, "hbm_ratio_max": 0.5, "comm_ratio_max": 0.5}


@dataclass(frozen=True)
class Workload:
    """batch = sequences per attention replica (per DP rank); kv_len = decode KV length (default isl + osl/2,
    the article's average); prefix_hit = fraction of the prompt already cached; imbalance = hottest EP rank's
    routed load / mean (1 balanced, ep = all on one rank)."""

    batch: int = 1
    isl: int = 3260
    osl: int = 1100
    kv_len: int | None = None
    prefix_hit: float = 0.0
    imbalance: float = 1.0

    def __post_init__(self):
        if self.batch < 1 or self.isl < 1 or self.osl < 1:
            raise FractalError(f"batch/isl/osl must be >= 1 (got {self.batch}/{self.isl}/{self.osl})")
        if not 0.0 <= self.prefix_hit < 1.0:
            raise FractalError(f"prefix hit ratio {self.prefix_hit} must be in [0, 1)")
        if self.imbalance < 1.0:
            raise FractalError(f"imbalance {self.imbalance} must be >= 1 (1 = balanced)")

    @property
    def decode_kv_len(self) -> int:
        return self.kv_len if self.kv_len is not None else self.isl + self.osl // 2


@dataclass(frozen=True)
class Verdict:
    resource: str
    flagged: bool
    text: str


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    plan: PhasePlan
    step: StepCost
    latency_s: float  # TTFT for prefill, TPOT for decode
    tokens_per_s_per_gpu: float
    mfu: float
    hbm_ratio: float
    comm_ratio: float
    verdicts: tuple[Verdict, ...]

    @property
    def bottleneck(self) -> str:
        return self.step.bound


def verdicts(step: StepCost) -> tuple[float, float, float, tuple[Verdict, ...]]:
    """Table 1 of the seed article: MFU < 60 %, memory > 85 %, IO/compute > 0.5, comm/compute > 0.5."""
    t = TABLE1
    mfu = step.compute_time_s / step.step_time_s if step.step_time_s else 0.0
    c = step.compute_time_s or 1e-30
    hr, cr = step.hbm_time_s / c, step.comm_time_s / c
    mu = step.memory.utilisation
    out = (
        Verdict("compute", mfu < t["mfu_min"], f"MFU {mfu:.0%} < 60%: compute not saturated" if mfu < t["mfu_min"]
                else f"MFU {mfu:.0%}: compute saturated"),
        Verdict("memory", mu > t["memory_max"], f"{mu:.0%} > 85%: OOM risk, shrink weights/KV" if mu > t["memory_max"]
                else f"{mu:.0%} <= 85%: fits with headroom"),
        Verdict("hbm", hr > t["hbm_ratio_max"], f"IO/compute {hr:.2f} > 0.5: HBM traffic dominates" if hr > t["hbm_ratio_max"]
                else f"IO/compute {hr:.2f} <= 0.5"),
        Verdict("comm", cr > t["comm_ratio_max"], f"comm/compute {cr:.2f} > 0.5: communication limits" if cr > t["comm_ratio_max"]
                else f"comm/compute {cr:.2f} <= 0.5"),
    )
    return mfu, hr, cr, out


def phase_result(model: ModelSpec, gpu: GpuSpec, prec: Precision, plan: PhasePlan, phase: str, wl: Workload, *,
                 opts: O.ModelOptions | None = None, eff: Efficiency = Efficiency(), overlap: str = "op",
                 reserve_bytes: float | None = None, disaggregated: bool = False, check_memory: bool = True) -> PhaseResult:
    """Prefill: `batch` prompts (minus the cached prefix) in one step; TTFT = pp * stage time.
    Decode: `batch` sequences at KV length kv_len; TPOT = pp * stage time. KV held = batch * (isl + osl)."""
    if phase not in ("prefill", "decode"):
        raise FractalError(f"phase {phase!r} unknown; valid: prefill, decode")
    plan.validate(model)
    opts = opts or O.ModelOptions(imbalance=wl.imbalance)
    held = wl.batch * (wl.isl + wl.osl)
    if phase == "prefill":
        cached = int(round(wl.isl * wl.prefix_hit))
        shape = O.StepShape.uniform(wl.batch, wl.isl - cached, cached)
        step = step_cost(model, gpu, prec, plan, shape, opts=opts, eff=eff, overlap=overlap, kv_tokens_held=held,
                         reserve_bytes=reserve_bytes, kv_transfer_tokens=wl.batch * wl.isl if disaggregated else 0.0)
        made = wl.batch * plan.dp * (wl.isl - cached)
    else:
        shape = O.StepShape.uniform(wl.batch, 1, wl.decode_kv_len)
        step = step_cost(model, gpu, prec, plan, shape, opts=opts, eff=eff, overlap=overlap, kv_tokens_held=held,
                         reserve_bytes=reserve_bytes)
        made = wl.batch * plan.dp
    if check_memory and step.memory.total > gpu.hbm_bytes:
        mem = step.memory
        raise FractalError(
            f"plan {plan} does not fit on {gpu.name}: {phase} needs {mem.total / 1e9:.1f} GB per GPU (weights "
            f"{mem.weights / 1e9:.1f}, KV {mem.kv / 1e9:.1f}, activations {mem.activations / 1e9:.1f}, reserve "
            f"{mem.reserve / 1e9:.1f}) > {gpu.hbm_bytes / 1e9:.0f} GB; raise ep/tp/pp, quantise weights (e.g. --weights fp8,moe=w4a8) or lower batch")
    mfu, hr, cr, vs = verdicts(step)
    return PhaseResult(phase, plan, step, plan.pp * step.step_time_s, made / step.step_time_s / plan.gpus, mfu, hr, cr, vs)
