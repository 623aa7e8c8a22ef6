"""Render a phase result: the four-resource table, the per-operator breakdown, and JSON (SI units)."""
from __future__ import annotations

from dataclasses import dataclass

from fractal.perf.step import PhaseResult, Workload
from fractal.spec.gpu import GpuSpec
from fractal.spec.model import ModelSpec
from fractal.spec.parallel import Deployment
from fractal.spec.precision import Precision


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    gpu: GpuSpec
    precision: Precision
    deployment: Deployment
    workload: Workload
    overlap: str


def _si(x: float, unit: str) -> str:
    for scale, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _ms(s: float) -> str:
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _prec(p: Precision) -> str:
    parts = {k: getattr(p, k) for k in ("attn", "dense", "moe", "shared", "embed", "head")}
    w = ",".join(f"{k}={v}" for k, v in parts.items()) if len(set(parts.values())) > 1 else p.attn
    return f"weights {w}; act {p.act}; kv {p.kv}; comm {p.comm}"


def to_json(sc: Scenario, r: PhaseResult, by_op: bool = False) -> dict:
    s, m, g, wl = r.step, sc.model, sc.gpu, sc.workload
    v = {x.resource: x.text for x in r.verdicts}
    out = {
        "model": m.name, "gpu": g.name, "plan": str(sc.deployment), "phase": r.phase, "phase_plan": str(r.plan),
        "gpus_per_instance": r.plan.gpus,
        "params_total": m.params_total, "params_activated": m.params_activated,
        "precision": {k: getattr(sc.precision, k) for k in ("attn", "dense", "moe", "shared", "router", "embed", "head", "act", "kv", "comm")},
        "workload": {"batch_per_dp_rank": wl.batch, "isl": wl.isl, "osl": wl.osl, "decode_kv_len": wl.decode_kv_len,
                     "prefix_hit": wl.prefix_hit, "imbalance": wl.imbalance},
        "per_gpu": {
            "compute": {"flops": s.flops, "time_s": s.compute_time_s, "peak_flops": g.peak_flops(sc.precision.compute_dtype),
                        "mfu": r.mfu, "verdict": v["compute"]},
            "hbm": {"bytes": s.hbm_bytes, "weight_bytes": s.weight_bytes, "kv_bytes": s.kv_bytes, "act_bytes": s.act_bytes,
                    "time_s": s.hbm_time_s, "bandwidth_bytes_per_s": g.hbm_bw, "io_to_compute": r.hbm_ratio, "verdict": v["hbm"]},
            "memory": {"bytes": s.memory.total, "capacity_bytes": g.hbm_bytes, "weights_bytes": s.memory.weights,
                       "kv_bytes": s.memory.kv, "activation_bytes": s.memory.activations, "reserve_bytes": s.memory.reserve,
                       "utilisation": s.memory.utilisation, "verdict": v["memory"]},
            "comm": {"bytes": s.comm_bytes, "intra_node_bytes": s.comm_intra_bytes, "inter_node_bytes": s.comm_inter_bytes,
                     "time_s": s.comm_time_s, "comm_to_compute": r.comm_ratio, "verdict": v["comm"]},
        },
        "overlap": sc.overlap, "step_time_s": s.step_time_s, "pipeline_stage": s.stage,
        ("ttft_s" if r.phase == "prefill" else "tpot_s"): r.latency_s,
        "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu, "bottleneck": r.bottleneck,
    }
    if by_op:
        out["ops"] = [{"name": o.name, "part": o.part, "layers": o.layers, "flops": o.flops, "weight_bytes": o.weight_bytes,
                       "kv_bytes": o.kv_bytes, "act_bytes": o.act_bytes, "comm_bytes": o.comm_bytes,
                       "compute_s": o.compute_s, "hbm_s": o.hbm_s, "comm_s": o.comm_s, "bound": o.bound} for o in s.ops]
    return out


def render_text(sc: Scenario, r: PhaseResult, by_op: bool = False) -> str:
    s, m, g, wl = r.step, sc.model, sc.gpu, sc.workload
    v = {x.resource: x for x in r.verdicts}
    mark = {k: ("!" if x.flagged else " ") for k, x in v.items()}
    kv = f"kv {wl.decode_kv_len}" if r.phase == "decode" else f"prefix hit {wl.prefix_hit:.0%}"
    lines = [
        f"{m.name} on {g.name} | {r.phase} | plan {sc.deployment} ({r.plan.gpus} GPUs/instance) | "
        f"batch {wl.batch}/DP rank | isl {wl.isl} | osl {wl.osl} | {kv}",
        f"params {m.params_total / 1e9:.1f} B total, {m.params_activated / 1e9:.1f} B activated | {_prec(sc.precision)}"
        + (f" | imbalance {wl.imbalance:g}" if wl.imbalance != 1 else ""),
        "",
        f"  {'resource':<9} {'demand per GPU':<28} {'time':>10}  {'utilisation':<18} verdict",
        f"{mark['compute']} {'compute':<9} {_si(s.flops, 'FLOP'):<28} {_ms(s.compute_time_s):>10}  "
        f"{'MFU ' + format(r.mfu, '.0%'):<18} {v['compute'].text}",
        f"{mark['memory']} {'memory':<9} {_si(s.memory.total, 'B') + ' / ' + _si(g.hbm_bytes, 'B'):<28} {'-':>10}  "
        f"{format(s.memory.utilisation, '.0%') + ' of capacity':<18} {v['memory'].text}",
        f"{mark['hbm']} {'hbm':<9} {_si(s.hbm_bytes, 'B') + ' read+written':<28} {_ms(s.hbm_time_s):>10}  "
        f"{'MBU ' + format(s.hbm_time_s / s.step_time_s, '.0%'):<18} {v['hbm'].text}",
        f"{mark['comm']} {'comm':<9} {_si(s.comm_bytes, 'B') + ' sent':<28} {_ms(s.comm_time_s):>10}  "
        f"{format(s.comm_time_s / s.step_time_s, '.0%') + ' of step':<18} {v['comm'].text}",
        "",
        f"  memory: weights {_si(s.memory.weights, 'B')}, KV {_si(s.memory.kv, 'B')}, activations "
        f"{_si(s.memory.activations, 'B')}, reserve {_si(s.memory.reserve, 'B')} | HBM traffic: weights "
        f"{_si(s.weight_bytes, 'B')}, KV {_si(s.kv_bytes, 'B')}, activations {_si(s.act_bytes, 'B')} | comm: intra-node "
        f"{_si(s.comm_intra_bytes, 'B')}, inter-node {_si(s.comm_inter_bytes, 'B')}",
        f"  step {_ms(s.step_time_s)} (overlap rule '{sc.overlap}'"
        + (f", slowest of {s.stages} pipeline stages" if s.stages > 1 else "") + ") | "
        + (f"TTFT {_ms(r.latency_s)}" if r.phase == "prefill" else f"TPOT {_ms(r.latency_s)}")
        + f" | {r.tokens_per_s_per_gpu:,.0f} {'input' if r.phase == 'prefill' else 'output'} tokens/s per GPU"
        + f" | bottleneck: {r.bottleneck}",
    ]
    if by_op:
        lines += ["", f"  {'operator':<22} {'part':<7} {'x':>4} {'FLOPs':>11} {'HBM bytes':>11} {'comm bytes':>11} "
                      f"{'compute':>10} {'hbm':>10} {'comm':>10}  bound"]
        for o in s.ops:
            lines.append(f"  {o.name:<22} {o.part:<7} {o.layers:>4g} {_si(o.flops, ''):>11} {_si(o.hbm_bytes, 'B'):>11} "
                         f"{_si(o.comm_bytes, 'B'):>11} {_ms(o.compute_s):>10} {_ms(o.hbm_s):>10} {_ms(o.comm_s):>10}  {o.bound}")
    return "\n".join(lines)
