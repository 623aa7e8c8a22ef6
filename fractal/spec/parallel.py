"""Parallel plans: how one model instance is spread over GPUs, per phase, aggregated or disaggregated.

Phase plan string: degrees joined by '-', any order, each defaulting to 1:
    tp<N>  tensor parallel for attention (heads split) and dense FFN
    dp<N>  data parallel attention: dp replicas of attention, each with its own sequences and KV cache
    ep<N>  expert parallel for MoE layers, over the tp*dp GPUs of one pipeline stage
    pp<N>  pipeline stages (layers split in pp contiguous groups)
GPUs per instance = tp * dp * pp. MoE experts are split ep ways; if ep < tp*dp each expert is further
tensor-split moe_tp = tp*dp/ep ways. Examples: `dp8-ep8` (article's decode), `tp8-ep8` (article's
prefill), `tp4-pp2`, `tp8`.

Deployment string: a phase plan alone = aggregated (one instance type does prefill and decode), or
`prefill=<plan>,decode=<plan>[,pd=P:D]` = prefill/decode disaggregated with P prefill instances per D
decode instances (default 1:1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fractal.errors import FractalError
from fractal.spec.model import ModelSpec

_TOKEN = re.compile(r"(tp|dp|ep|pp)(\d+)")


@dataclass(frozen=True)
class PhasePlan:
    tp: int = 1
    dp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def moe_tp(self) -> int:
        return (self.tp * self.dp) // self.ep

    def __str__(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("dp", self.dp), ("ep", self.ep), ("pp", self.pp)) if v > 1]
        return "-".join(parts) or "tp1"

    def validate(self, model: ModelSpec) -> None:
        """Raise FractalError (one line) if this plan cannot split `model`."""
        a, s = model.attention, str(self)
        if (self.tp * self.dp) % self.ep:
            raise FractalError(f"plan {s}: ep{self.ep} must divide tp*dp = {self.tp * self.dp} (EP spans the GPUs of one stage)")
        if a.num_heads % self.tp:
            raise FractalError(f"plan {s}: tp{self.tp} does not divide {model.name}'s {a.num_heads} attention heads")
        if a.kind == "gqa" and a.num_kv_heads % self.tp and self.tp % a.num_kv_heads:
            raise FractalError(f"plan {s}: tp{self.tp} and {a.num_kv_heads} KV heads do not divide each other")
        if self.pp > model.num_layers:
            raise FractalError(f"plan {s}: pp{self.pp} exceeds {model.name}'s {model.num_layers} layers")
        if model.num_dense_layers and model.dense_intermediate % self.tp:
            raise FractalError(f"plan {s}: tp{self.tp} does not divide the dense FFN width {model.dense_intermediate}")
        if model.moe is None:
            if self.ep > 1:
                raise FractalError(f"plan {s}: ep{self.ep} needs an MoE model; {model.name} is dense (use tp/dp/pp)")
            return
        m = model.moe
        if m.num_experts % self.ep:
            raise FractalError(f"plan {s}: ep{self.ep} does not divide {model.name}'s {m.num_experts} routed experts")
        if m.expert_intermediate % self.moe_tp:
            raise FractalError(f"plan {s}: experts would be tensor-split {self.moe_tp} ways (tp*dp/ep), which does not "
                               f"divide their width {m.expert_intermediate}; raise ep")


def parse_phase_plan(text: str) -> PhasePlan:
    t = text.strip().lower()
    if not t:
        raise FractalError("empty plan; write degrees like dp8-ep8, tp8-ep8, tp4-pp2")
    seen: dict[str, int] = {}
    for tok in t.split("-"):
        m = _TOKEN.fullmatch(tok)
        if not m or int(m.group(2)) < 1:
            raise FractalError(f"plan {text!r}: bad part {tok!r}; write degrees like dp8-ep8, tp8-ep8, tp4-pp2 (tp/dp/ep/pp + N>=1)")
        if m.group(1) in seen:
            raise FractalError(f"plan {text!r}: {m.group(1)} given twice")
        seen[m.group(1)] = int(m.group(2))
    return PhasePlan(**seen)


@dataclass(frozen=True)
class Deployment:
    """prefill/decode phase plans; disaggregated means separate instances in ratio p_instances:d_instances."""

    prefill: PhasePlan
    decode: PhasePlan
    disaggregated: bool = False
    p_instances: int = 1
    d_instances: int = 1

    def __str__(self) -> str:
        if not self.disaggregated:
            return str(self.decode)
        return f"prefill={self.prefill},decode={self.decode},pd={self.p_instances}:{self.d_instances}"

    def phase(self, phase: str) -> PhasePlan:
        return self.prefill if phase == "prefill" else self.decode

    @property
    def gpus(self) -> int:
        if not self.disaggregated:
            return self.decode.gpus
        return self.p_instances * self.prefill.gpus + self.d_instances * self.decode.gpus

    def validate(self, model: ModelSpec) -> None:
        self.prefill.validate(model)
        self.decode.validate(model)


def parse_plan(text: str) -> Deployment:
    """Parse an aggregated phase plan (`dp8-ep8`) or a disaggregated one (`prefill=tp8-ep8,decode=dp16-ep16,pd=2:1`)."""
    if "=" not in text:
        p = parse_phase_plan(text)
        return Deployment(p, p)
    fields: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise FractalError(f"plan {text!r}: {item!r} is not key=value; keys: prefill, decode, pd")
        k, v = (x.strip().lower() for x in item.split("=", 1))
        if k not in ("prefill", "decode", "pd"):
            raise FractalError(f"plan {text!r}: unknown key {k!r}; keys: prefill, decode, pd")
        fields[k] = v
    if "prefill" not in fields or "decode" not in fields:
        raise FractalError(f"plan {text!r}: a disaggregated plan needs both prefill= and decode=")
    p_n, d_n = 1, 1
    if "pd" in fields:
        m = re.fullmatch(r"(\d+):(\d+)", fields["pd"])
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise FractalError(f"plan {text!r}: pd={fields['pd']!r} must be P:D with positive integers, e.g. pd=2:1")
        p_n, d_n = int(m.group(1)), int(m.group(2))
    return Deployment(parse_phase_plan(fields["prefill"]), parse_phase_plan(fields["decode"]), True, p_n, d_n)
