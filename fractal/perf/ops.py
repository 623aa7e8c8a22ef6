"""Per-operator cost on one GPU for one step: FLOPs, HBM bytes (weights, KV, activations), bytes sent.

Conventions (docs/perf-model.md has the derivations):
- A multiply-add is 2 FLOPs; a [T, k] x [k, n] matmul costs 2*T*k*n FLOPs, reads k*n weights and T*k
  inputs, writes T*n outputs.
- Causal attention is exact: a sequence with c cached and n new tokens has n*c + n*(n+1)/2 query-key pairs.
- Flash attention by default: scores never reach HBM (flash_attention=False stores and re-reads them in bf16).
- MLA: "mha" mode expands the latent KV with kv_b (prefill style); "absorb" folds W_UK/W_UV into the
  query/output (decode style); "auto" absorbs sequences that bring one new token and expands the others
  (so a mixed batch runs its decodes absorbed and its prefill chunks MHA-style, as vLLM's MLA backend does).
- Sharding follows fractal.spec.parallel: attention and dense FFN by tp; MLA's q_a/kv_a and the MLA latent
  KV replicated across tp; experts ep ways (and moe_tp = tp*dp/ep ways inside an expert). After the attention
  reduce-scatter each GPU dispatches T/tp tokens. The hottest EP rank carries `imbalance` times the mean
  routed load (1 = balanced, ep = every routed token on one rank).
- Communication counts bytes each GPU sends: all-reduce = reduce-scatter + all-gather = 2*(g-1)/g * payload;
  EP dispatch + combine = 2 * top_k * d per token times the remote fraction; the remote fraction is split
  into intra-node and inter-node parts assuming the group's GPUs are packed into nodes of gpus_per_node.
"""
from __future__ import annotations

from dataclasses import dataclass

from fractal.spec.gpu import GpuSpec
from fractal.spec.model import ModelSpec
from fractal.spec.parallel import PhasePlan
from fractal.spec.precision import Precision


@dataclass(frozen=True)
class SeqGroup:
    """count sequences, each bringing `new` tokens on top of `context` cached ones."""

    count: float
    new: int
    context: int


@dataclass(frozen=True)
class StepShape:
    """The work of one step on one attention replica (one DP rank). logits_rows = rows through the LM head."""

    groups: tuple[SeqGroup, ...]
    logits_rows: float

    @staticmethod
    def uniform(num_seqs: float, new_tokens: int, context: int) -> "StepShape":
        return StepShape((SeqGroup(num_seqs, new_tokens, context),), num_seqs)

    @property
    def tokens(self) -> float:
        return sum(g.count * g.new for g in self.groups)

    @property
    def seqs(self) -> float:
        return sum(g.count for g in self.groups)

    @property
    def pairs(self) -> float:
        return sum(g.count * (g.new * g.context + g.new * (g.new + 1) / 2) for g in self.groups)

    @property
    def kv_tokens(self) -> float:
        """Tokens whose KV is read this step (cached + new), summed over sequences."""
        return sum(g.count * (g.context + g.new) for g in self.groups)

    @property
    def cached_tokens(self) -> float:
        return sum(g.count * g.context for g in self.groups)


@dataclass(frozen=True)
class ModelOptions:
    mla_mode: str = "auto"  # auto | mha | absorb
    imbalance: float = 1.0
    flash_attention: bool = True


@dataclass
class OpCost:
    """One operator on one GPU; per-occurrence numbers, `layers` occurrences per step."""

    name: str
    part: str
    layers: float = 1.0
    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    act_bytes: float = 0.0
    comm_intra: float = 0.0
    comm_inter: float = 0.0
    dtype: str = "bf16"

    @property
    def hbm_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes


def split_by_node(group: int, gpus_per_node: int) -> tuple[float, float]:
    """Fractions of a uniform all-to-all's destinations inside the node and outside it (local excluded)."""
    if group <= 1:
        return 0.0, 0.0
    inside = min(group, gpus_per_node)
    return (inside - 1) / group, (group - inside) / group


def matmul(name: str, part: str, tokens: float, k: float, n: float, wbytes: float, abytes: float, dtype: str) -> OpCost:
    return OpCost(name, part, flops=2.0 * tokens * k * n, weight_bytes=k * n * wbytes,
                  act_bytes=tokens * (k + n) * abytes, dtype=dtype)


def _allreduce(name: str, group: int, payload: float, gpn: int) -> OpCost:
    intra, inter = split_by_node(group, gpn)
    frac = 2.0  # reduce-scatter + all-gather, each sending (g-1)/g of the payload
    return OpCost(name, "comm", comm_intra=frac * intra * payload, comm_inter=frac * inter * payload)


def _mla_split(opts: ModelOptions, shape: StepShape) -> tuple[StepShape | None, StepShape | None]:
    """(groups computed MHA-style, groups computed absorbed). auto: one-token groups absorbed, the rest MHA."""
    if opts.mla_mode not in ("auto", "mha", "absorb"):
        raise ValueError(f"mla_mode {opts.mla_mode!r}")
    if opts.mla_mode == "mha":
        return shape, None
    if opts.mla_mode == "absorb":
        return None, shape
    one = tuple(g for g in shape.groups if g.new == 1)
    many = tuple(g for g in shape.groups if g.new != 1)
    return (StepShape(many, 0) if many else None), (StepShape(one, 0) if one else None)


def attention_ops(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape, opts: ModelOptions, gpu: GpuSpec) -> list[OpCost]:
    """One layer's attention block (norm, projections, core, output, residual, TP all-reduce)."""
    a, d, tp = m.attention, m.hidden_size, plan.tp
    T, ab, wb, kvb, dt = shape.tokens, p.act_bytes, p.weight_bytes("attn"), p.kv_bytes, p.compute_dtype
    h = a.num_heads / tp
    ops = [OpCost("attn_norm", "norm", flops=4 * T * d, weight_bytes=d * 2, act_bytes=2 * T * d * ab)]
    if a.kind == "mla":
        nope, rope, v, lat = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            ops.append(matmul("q_a_proj", "attn", T, d, a.q_lora_rank, wb, ab, dt))
            ops.append(matmul("q_b_proj", "attn", T, a.q_lora_rank, h * (nope + rope), wb, ab, dt))
        else:
            ops.append(matmul("q_proj", "attn", T, d, h * (nope + rope), wb, ab, dt))
        kv_a = matmul("kv_a_proj", "attn", T, d, lat + rope, wb, ab, dt)
        kv_a.kv_bytes = T * (lat + rope) * kvb  # latent written to the cache
        ops.append(kv_a)
        mha, absorb = _mla_split(opts, shape)
        if mha is not None:
            kvt, tm = mha.kv_tokens, mha.tokens
            kv_b = matmul("kv_b_proj", "attn", kvt, lat, h * (nope + v), wb, ab, dt)
            kv_b.act_bytes = tm * lat * ab + kvt * h * (nope + v) * ab  # new latents in, expanded K/V out
            kv_b.kv_bytes = mha.cached_tokens * (lat + rope) * kvb  # cached latents read
            ops.append(kv_b)
            core = OpCost("attn_core(mha)", "attn", flops=2.0 * mha.pairs * h * (nope + rope + v), dtype=dt,
                          act_bytes=(kvt * h * (nope + rope + v) + tm * h * (nope + rope) + tm * h * v) * ab)
            if not opts.flash_attention:
                core.act_bytes += 2 * mha.pairs * h * 2.0
            ops.append(core)
        if absorb is not None:
            ta = absorb.tokens
            ops.append(OpCost("q_absorb(W_UK)", "attn", flops=2.0 * ta * h * nope * lat, weight_bytes=h * nope * lat * wb,
                              act_bytes=ta * h * (nope + lat) * ab, dtype=dt))
            core = OpCost("attn_core(absorb)", "attn", flops=2.0 * absorb.pairs * h * (2 * lat + rope), dtype=dt,
                          kv_bytes=absorb.kv_tokens * (lat + rope) * kvb, act_bytes=ta * h * (lat + rope + lat) * ab)
            if not opts.flash_attention:
                core.act_bytes += 2 * absorb.pairs * h * 2.0
            ops.append(core)
            ops.append(OpCost("o_absorb(W_UV)", "attn", flops=2.0 * ta * h * lat * v, weight_bytes=h * lat * v * wb,
                              act_bytes=ta * h * (lat + v) * ab, dtype=dt))
        ops.append(matmul("o_proj", "attn", T, h * v, d, wb, ab, dt))
    else:
        hd = a.head_dim
        kvh = a.num_kv_heads / tp if a.num_kv_heads >= tp else 1
        qkv = matmul("qkv_proj", "attn", T, d, (h + 2 * kvh) * hd, wb, ab, dt)
        qkv.kv_bytes = T * 2 * kvh * hd * kvb
        ops.append(qkv)
        core = OpCost("attn_core", "attn", flops=4.0 * shape.pairs * h * hd, dtype=dt,
                      kv_bytes=shape.kv_tokens * 2 * kvh * hd * kvb, act_bytes=2 * T * h * hd * ab)
        if not opts.flash_attention:
            core.act_bytes += 2 * shape.pairs * h * 2.0
        ops.append(core)
        ops.append(matmul("o_proj", "attn", T, h * hd, d, wb, ab, dt))
    ops.append(OpCost("attn_residual", "norm", flops=T * d, act_bytes=3 * T * d * ab))
    if tp > 1:
        ops.append(_allreduce("tp_allreduce(attn)", tp, T * d * p.comm_bytes, gpu.gpus_per_node))
    return ops


def dense_ffn_ops(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape, gpu: GpuSpec) -> list[OpCost]:
    d, tp, T, ab, dt = m.hidden_size, plan.tp, shape.tokens, p.act_bytes, p.compute_dtype
    i = m.dense_intermediate / tp
    wb = p.weight_bytes("dense")
    ops = [OpCost("ffn_norm", "norm", flops=4 * T * d, weight_bytes=d * 2, act_bytes=2 * T * d * ab),
           matmul("gate_up_proj", "dense", T, d, 2 * i, wb, ab, dt),
           OpCost("silu_mul", "dense", flops=4 * T * i, act_bytes=3 * T * i * ab),
           matmul("down_proj", "dense", T, i, d, wb, ab, dt),
           OpCost("ffn_residual", "norm", flops=T * d, act_bytes=3 * T * d * ab)]
    if tp > 1:
        ops.append(_allreduce("tp_allreduce(ffn)", tp, T * d * p.comm_bytes, gpu.gpus_per_node))
    return ops


def experts_touched(num_experts: int, top_k: int, ep: int, tokens: float, imbalance: float) -> float:
    """Expected distinct routed experts one EP rank must read when `tokens` tokens route uniformly;
    the hottest rank touches `imbalance` times as many, capped at the experts it holds."""
    local = num_experts / ep
    frac = 1.0 - (1.0 - top_k / num_experts) ** tokens if tokens > 0 else 0.0
    return min(local, imbalance * local * frac)


def moe_ops(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape, opts: ModelOptions, gpu: GpuSpec) -> list[OpCost]:
    """One MoE layer on the hottest EP rank: norm, router, dispatch, routed experts, shared experts, combine."""
    moe, d, ab, dt = m.moe, m.hidden_size, p.act_bytes, p.compute_dtype
    assert moe is not None
    ep, mtp, k = plan.ep, plan.moe_tp, moe.top_k
    f = min(max(opts.imbalance, 1.0), float(ep))
    T = shape.tokens
    tg = T / plan.tp  # tokens this GPU dispatches (after the attention reduce-scatter)
    group_tokens = T * plan.dp  # tokens of the whole EP group
    assign = group_tokens * k / ep * f  # token-expert pairs on the hottest EP rank (each GPU of it does 1/moe_tp)
    ie = moe.expert_intermediate / mtp
    wb = p.weight_bytes("moe")
    touched = experts_touched(moe.num_experts, k, ep, group_tokens, f)
    ops = [OpCost("moe_norm", "norm", flops=4 * T * d, weight_bytes=d * 2, act_bytes=2 * T * d * ab),
           matmul("router", "router", tg, d, moe.num_experts, p.weight_bytes("router"), ab, "bf16")]
    ops.append(OpCost("experts(routed)", "moe", flops=assign * 6.0 * d * ie, weight_bytes=touched * 3 * d * ie * wb,
                      act_bytes=assign * (2 * d + 6 * ie) * ab, dtype=dt))
    if moe.shared_intermediate:
        s_tok, si = tg * mtp, moe.shared_intermediate / mtp
        ops.append(OpCost("experts(shared)", "shared", flops=s_tok * 6.0 * d * si,
                          weight_bytes=3 * d * si * p.weight_bytes("shared"),
                          act_bytes=s_tok * (2 * d + 6 * si) * ab, dtype=dt))
    ops.append(OpCost("moe_residual", "norm", flops=T * d, act_bytes=3 * T * d * ab))
    cb = p.comm_bytes
    if ep > 1:
        # an EP rank is moe_tp GPUs packed together, so a node holds gpus_per_node / moe_tp EP ranks
        intra, inter = split_by_node(ep, max(1, gpu.gpus_per_node // mtp))
        payload = 2.0 * tg * k * d * cb * f  # dispatch + combine
        ops.append(OpCost("ep_dispatch+combine", "comm", comm_intra=payload * intra, comm_inter=payload * inter))
    if mtp > 1:
        ops.append(_allreduce("moe_tp_allreduce", mtp, tg * mtp * d * cb, gpu.gpus_per_node))
    return ops


def embed_ops(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape) -> list[OpCost]:
    T = shape.tokens
    return [OpCost("embedding", "embed", weight_bytes=T * m.hidden_size * p.weight_bytes("embed"),
                   act_bytes=T * m.hidden_size * p.act_bytes)]


def head_ops(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape) -> list[OpCost]:
    d, T, R = m.hidden_size, shape.tokens, shape.logits_rows
    head = matmul("lm_head", "head", R, d, m.vocab_size / plan.tp, p.weight_bytes("head"), p.act_bytes, "bf16")
    head.act_bytes = R * d * p.act_bytes + R * m.vocab_size / plan.tp * 4.0  # fp32 logits
    return [OpCost("final_norm", "norm", flops=4 * T * d, weight_bytes=d * 2, act_bytes=2 * T * d * p.act_bytes), head]


def pp_send_op(m: ModelSpec, p: Precision, plan: PhasePlan, shape: StepShape, gpu: GpuSpec) -> OpCost:
    """Hidden states handed to the next stage (sent once per step per GPU; a stage's TP ranks each send 1/tp)."""
    payload = shape.tokens * m.hidden_size * p.comm_bytes / plan.tp
    inter = plan.tp * plan.dp >= gpu.gpus_per_node
    return OpCost("pp_send", "comm", comm_intra=0.0 if inter else payload, comm_inter=payload if inter else 0.0)


def held_weights(m: ModelSpec, p: Precision, plan: PhasePlan) -> dict[str, float]:
    """Weight bytes one GPU holds, per layer kind: attn (per layer), dense (per dense layer),
    moe (per MoE layer, routed + shared + router), embed and head (whole)."""
    a, d, tp = m.attention, m.hidden_size, plan.tp
    wa = p.weight_bytes("attn")
    if a.kind == "mla":
        nope, rope, v, lat, h = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank, a.num_heads / tp
        q = (d * a.q_lora_rank + a.q_lora_rank * h * (nope + rope)) if a.q_lora_rank else d * h * (nope + rope)
        attn = (q + d * (lat + rope) + lat * h * (nope + v) + h * v * d) * wa
    else:
        kvh = a.num_kv_heads / tp if a.num_kv_heads >= tp else 1
        attn = (2 * d * a.num_heads / tp * a.head_dim + 2 * d * kvh * a.head_dim) * wa
    out = {"attn": attn + 2 * d * 2.0, "dense": 3 * d * m.dense_intermediate / tp * p.weight_bytes("dense"), "moe": 0.0}
    if m.moe:
        mo, mtp = m.moe, plan.moe_tp
        out["moe"] = (mo.num_experts / plan.ep * 3 * d * mo.expert_intermediate / mtp * p.weight_bytes("moe")
                      + 3 * d * mo.shared_intermediate / mtp * p.weight_bytes("shared")
                      + d * mo.num_experts * p.weight_bytes("router"))
    out["embed"] = m.vocab_size * d / tp * p.weight_bytes("embed")
    out["head"] = m.vocab_size * d / tp * p.weight_bytes("head")
    return out


def kv_bytes_per_token(m: ModelSpec, p: Precision, plan: PhasePlan) -> float:
    """KV-cache bytes one GPU holds per token per layer (MLA latent replicated across tp; GQA heads split)."""
    a = m.attention
    if a.kind == "mla":
        return a.kv_elems_per_token() * p.kv_bytes
    kvh = a.num_kv_heads / plan.tp if a.num_kv_heads >= plan.tp else 1
    return 2 * kvh * a.head_dim * p.kv_bytes
