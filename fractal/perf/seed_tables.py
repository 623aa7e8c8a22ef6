"""Recompute the seed article's tables 2-9 (DeepSeek-V3 on H20) under the article's own conventions.

The article mixes units on purpose-free grounds, and we keep its choices here (only here):
FLOPs in units of 10^9 although formulas 1-3 write /1024^3; memory, IO and traffic in 1024^3 bytes;
compute time = GFLOPs / (296 * 1024); IO time = GB / 4000; comm time = GB / 900 (intra) or / 50 (inter);
a multiply-add is 2 FLOPs; causal attention is halved (s' = s/2); decode attention uses s' = 3260 + 550;
worst-case routing puts all 9 activated experts on one GPU; activations follow formulas 9/10 (no flash).

Each row shows three numbers: the article's printed value, `arith` = the article's formulas on the
article's own rounded inputs (37 B - 11.4 B = 25.6 B, 14 GB dense, 657 GB MoE), and `ours` = the same
formulas on inputs derived exactly from the shipped DeepSeek-V3 config and the H20 entry. A footnote
marks where the article's printed value contradicts its own arithmetic (a slip) or where a rounded input
explains the gap. The general model (fractal.perf.step) does not use these conventions.
"""
from __future__ import annotations

from dataclasses import dataclass

from fractal.spec.gpu import load_gpu
from fractal.spec.model import ModelSpec, load_model_spec

G = 1024.0**3


@dataclass(frozen=True)
class ArticleInputs:
    n_layer: int
    n_moe: int
    d: int
    heads: int
    dh: int
    dr: int
    dc: int
    dqc: int
    moe_inter: int
    k: int  # activated experts per token incl. shared (9)
    experts: int  # routed + shared (257)
    routed_k: int  # 8
    nonattn_params: float  # activated params outside attention
    dense_gb: float  # Size_dense (fp8 bytes = params)
    moe_gb: float  # Size_MoE
    total_gb: float
    peak_tflops: float
    hbm_gbps: float
    intra_gbps: float
    inter_gbps: float
    reserve_gb: float = 10.0
    isl: int = 3260
    osl: int = 1100


def article_inputs() -> ArticleInputs:
    """The article's own (rounded) numbers."""
    return ArticleInputs(61, 58, 7168, 128, 128, 64, 512, 1536, 2048, 9, 257, 8, 25.6e9, 14.0, 657.0, 671.0,
                         296.0, 4000.0, 900.0, 50.0)


def model_inputs(model: ModelSpec | None = None, gpu_name: str = "h20") -> ArticleInputs:
    """The same inputs derived from the shipped config (exact) and the GPU table."""
    m = model or load_model_spec("deepseek-v3")
    g = load_gpu(gpu_name)
    a, moe = m.attention, m.moe
    assert moe is not None and a.kind == "mla"
    b = m.param_breakdown()
    moe_params = b["moe_routed"] + b["moe_shared"]
    return ArticleInputs(m.num_layers, m.num_moe_layers, m.hidden_size, a.num_heads, a.v_head_dim, a.qk_rope_head_dim,
                         a.kv_lora_rank, a.q_lora_rank or 0, moe.expert_intermediate, moe.top_k + moe.num_shared_experts,
                         moe.num_experts + moe.num_shared_experts, moe.top_k,
                         float(m.params_activated - b["attention"]), (m.params_total - moe_params) / 1e9, moe_params / 1e9,
                         m.params_total / 1e9, g.fp8_flops / 1e12, g.hbm_bw / 1e9, g.intra_node_bw / 1e9, g.inter_node_bw / 1e9)


def formulas(i: ArticleInputs) -> dict[str, float]:
    """Every quantity of tables 2-9, by key, following the article's formulas and derivations."""
    v: dict[str, float] = {}
    s, L, d, H = i.isl, i.n_layer, i.d, i.heads
    s_dec = i.isl + i.osl / 2
    # table 2 (formulas 1-5), GFLOPs with 10^9
    v["t2.prefill_nonattn"] = 2 * i.nonattn_params * s / 1e9
    v["t2.prefill_mha"] = L * 2 * (s / 2) * H * (2 * i.dh + i.dr) * s / 1e9
    v["t2.prefill_total"] = v["t2.prefill_nonattn"] + v["t2.prefill_mha"]
    v["t2.prefill_nonattn_share"] = v["t2.prefill_nonattn"] / v["t2.prefill_total"]
    v["t2.decode_nonattn"] = 2 * i.nonattn_params / 1e9
    v["t2.decode_mla"] = L * 2 * s_dec * H * (2 * i.dc + i.dr) / 1e9
    v["t2.decode_total"] = v["t2.decode_nonattn"] + v["t2.decode_mla"]
    v["t2.decode_mla_share"] = v["t2.decode_mla"] / v["t2.decode_total"]
    v["text.h20_32seq_50tps"] = v["t2.decode_total"] / i.peak_tflops / 1024 * 50 * 32
    # table 3 (formulas 6-11), GB with 1024^3 for KV/activations
    v["t3.weights_fp8"] = i.total_gb
    v["t3.weights_w4a8"] = i.dense_gb + i.moe_gb / 2
    v["t3.kv"] = L * s * (i.dc + i.dr) / G
    v["t3.act_mla"] = ((i.dqc + (i.dc + i.dr) + d) + 2 * H * s * 1 + 2 * i.k * i.moe_inter + d) / G
    v["t3.act_mha"] = (5 * s * d + 2 * H * s * s + 2 * s * i.k * i.moe_inter + s * d) / G
    kv, am, ah = v["t3.kv"], v["t3.act_mla"], v["t3.act_mha"]
    per_tok_moe = i.moe_gb / 2 / i.experts  # W4A8 bytes of one expert across the 58 layers
    # table 4 (formulas 12-25)
    v["t4.prefill_io"] = i.dense_gb / 8 + per_tok_moe * i.k + kv + ah * L * 2
    v["t4.prefill_io_time"] = v["t4.prefill_io"] / i.hbm_gbps
    v["t4.prefill_compute_time"] = (v["t2.prefill_mha"] / 1e3 / 8 + v["t2.prefill_nonattn"] / 1e3) / i.peak_tflops  # 推导一
    v["t4.prefill_ratio"] = v["t4.prefill_io_time"] / v["t4.prefill_compute_time"]
    v["t4.decode1_io"] = i.dense_gb + per_tok_moe * i.k + kv + am * L * 2
    v["t4.decode1_io_time"] = v["t4.decode1_io"] / i.hbm_gbps
    v["t4.decode_compute_time"] = v["t2.decode_total"] / i.peak_tflops / 1024  # 推导二
    v["t4.decode1_ratio"] = v["t4.decode1_io_time"] / v["t4.decode_compute_time"]
    v["t4.decode32_io"] = i.dense_gb + per_tok_moe * i.k + kv * 32 + am * L * 2 * 32
    v["t4.decode32_io_time"] = v["t4.decode32_io"] / i.hbm_gbps
    v["t4.decode32_ratio"] = v["t4.decode32_io_time"] / v["t4.decode_compute_time"]
    # table 5 / 6 (formulas 26-28, 推导三/四)
    v["t5.ep_prefill"] = i.n_moe * 2 * s * d * (i.k - 1) * 2 / G
    v["t5.ep_prefill_time"] = v["t5.ep_prefill"] / i.intra_gbps
    v["t5.tp1_compute_time"] = (v["t2.prefill_mha"] / 1e3 + v["t2.prefill_nonattn"] / 1e3 / 8) / i.peak_tflops
    v["t5.tp1_ratio"] = v["t5.ep_prefill_time"] / v["t5.tp1_compute_time"]
    v["t5.tp_prefill"] = L * 2 * s * d * 2 * (8 - 1) / 8 / G
    v["t5.tp8_total"] = v["t5.ep_prefill"] + v["t5.tp_prefill"]
    v["t5.tp8_time"] = v["t5.tp8_total"] / i.intra_gbps
    v["t5.tp8_compute_time"] = (v["t2.prefill_mha"] / 8 + v["t2.prefill_nonattn"] / 8) / 1e3 / i.peak_tflops
    v["t5.tp8_ratio"] = v["t5.tp8_time"] / v["t5.tp8_compute_time"]
    v["t5.ep_decode"] = i.n_moe * 2 * 1 * d * (i.k - 1) * 2 / G
    v["t5.ep_decode_time"] = v["t5.ep_decode"] / i.intra_gbps
    v["t5.decode_ratio"] = v["t5.ep_decode_time"] / v["t4.decode_compute_time"]
    v["t6.tp1_tflops"] = v["t2.prefill_mha"] / 1e3 + v["t2.prefill_nonattn"] / 1e3 / 8
    v["t6.tp8_tflops"] = (v["t2.prefill_mha"] + v["t2.prefill_nonattn"]) / 1e3 / 8
    # table 8 (推导五-八), balanced routing: k = 1 + 8/EP experts read per layer
    v["t8.ep8_b1.mem"] = i.dense_gb + i.moe_gb / 2 / 8 + kv + am + i.reserve_gb
    v["t8.ep8_b1.io"] = i.dense_gb + i.moe_gb / i.experts / 2 * (1 + i.routed_k / 8) + kv + am * L * 2
    v["t8.ep8_b1.gflops"] = v["t2.decode_mla"] + v["t2.decode_nonattn"] / 8
    v["t8.ep8_b1.comm"] = v["t5.ep_decode"]
    for ep in (8, 16, 32):
        v[f"t8.ep{ep}_b32.mem"] = i.dense_gb + i.moe_gb / 2 / ep + kv * 32 + am * 32 + i.reserve_gb
        v[f"t8.ep{ep}_b32.io"] = i.dense_gb + i.moe_gb / i.experts / 2 * (1 + i.routed_k / ep) + kv * 32 + am * 32 * L * 2
        v[f"t8.ep{ep}_b32.gflops"] = v["t2.decode_mla"] * 32 + v["t2.decode_nonattn"] / ep * 32
        v[f"t8.ep{ep}_b32.comm"] = v["t5.ep_decode"] * 32
        # table 9: EP8 all intra-node, EP16 half inter-node, EP32 three quarters inter-node
        io_t = v[f"t8.ep{ep}_b32.io"] / i.hbm_gbps
        inter = {8: 0, 16: 16, 32: 24}[ep]
        comm_t = v["t5.ep_decode"] * inter / i.inter_gbps + v["t5.ep_decode"] * (32 - inter) / i.intra_gbps
        comp_t = v[f"t8.ep{ep}_b32.gflops"] / i.peak_tflops / 1024
        v[f"t9.ep{ep}.io_time"], v[f"t9.ep{ep}.comm_time"], v[f"t9.ep{ep}.compute_time"] = io_t, comm_t, comp_t
        v[f"t9.ep{ep}.total"] = io_t + comm_t + comp_t
    tp_unit = L * 2 * d * 2 / G  # 0.00163 GB per token
    v["text.tp16_time"] = tp_unit * 32 * (16 / 2 - 1) / 16 / i.intra_gbps + tp_unit * 32 * (16 / 2) / 16 / i.inter_gbps
    return v


FOOTNOTES = {
    "a": "Formulas 1-3 divide by 1024^3 but every printed GFLOPs value uses 10^9 (166912 = 2 x 25.6 x 3260); we follow "
         "the printed values. Times then divide by 296 x 1024 GFLOPS (derivation 2), mixing the two again.",
    "b": "Rounded input: the article takes 37 B - 11.4 B = 25.6 B activated non-attention parameters; the config gives "
         "37.55 B - 11.41 B = 26.14 B (embedding and LM head included, as the article includes them), so FFN FLOPs run ~2% higher.",
    "c": "Rounded input: Size_dense = 14 GB in the article; the config gives 671.0 - 656.5 = 14.5 GB.",
    "d": "Slip: table 3's KV 0.112 GB follows neither 1024^3 (0.107) nor 10^9 (0.115) in formula 7 with s = 3260; later tables use 0.11.",
    "e": "Slip: the row's own numbers give 0.008 / 0.000383 = 20.9 (21.0 unrounded), not 20.1 (compute time kept at the 1-sequence value, "
         "the article's 'ideal parallel' assumption).",
    "f": "Slip: derivation 5 prints 16.56 GB but its own sum 14 + 2.556 + 0.11 + 0.0976 is 16.76 GB.",
    "g": "Slip: table 8 lists 116 GFLOPs for 1 sequence on DP8/EP8, but derivation 5 derives 71.5 (= 65.1 + 51.2/8) for "
         "that case; 116 is table 2's unsplit per-token total. We compare with the derivation.",
    "h": "Slip: derivation 7 rounds 14 + 657/2/16 = 34.5 GB down to 34 GB, giving 47.5 instead of 48.1.",
    "i": "Convention: under TP8 each rank dispatches only 1/8 of the tokens after the reduce-scatter; the article counts all "
         "3260 tokens per GPU (an upper bound). The general model (fractal report) divides by tp.",
    "j": "Rounded input: the decode EP traffic 0.012 GB is 0.0124 unrounded; x32 gives 0.396, the article multiplies the rounded value.",
    "k": "Table 3's decode activation uses s' = 3260 (the text's '3260 KV cache length'), while table 2 uses 3260 + 550.",
    "l": "Worst-case routing: derivation 1 puts every token's 9 experts on one GPU (no /8 on the FFN FLOPs) while attention is TP8.",
    "m": "Convention: table 8/9 read 1 + 8/EP experts per layer (one sequence's routing); with 32 sequences x 8 DP ranks "
         "nearly every local expert is touched, so the general model reads far more expert weights (see docs/perf-model.md).",
    "n": "Omission: formula 1 counts only non-attention parameters and formulas 2-3 only the QK^T and PV products, so the "
         "attention projections (q_a, q_b, kv_a, kv_b, o: 11.4 B parameters) are missing: 2 x 11.4e9 x 3260 = 74 TFLOPs in "
         "prefill and 22.8 GFLOPs per decode token. The general model counts them.",
}

# (key, label, printed value as in the article, footnotes, is_slip)
ROWS: list[tuple[str, str, str, str, bool]] = [
    ("t2.prefill_nonattn", "T2 prefill non-attention GFLOPs", "166912", "ab", False),
    ("t2.prefill_mha", "T2 prefill MHA GFLOPs (s'=s/2)", "26569", "a", False),
    ("t2.prefill_total", "T2 prefill total GFLOPs", "193481", "abn", False),
    ("t2.prefill_nonattn_share", "T2 prefill non-attention share", "0.863", "", False),
    ("t2.decode_nonattn", "T2 decode non-attention GFLOPs", "51.2", "ab", False),
    ("t2.decode_mla", "T2 decode MLA GFLOPs (s'=3810)", "65.1", "a", False),
    ("t2.decode_total", "T2 decode total GFLOPs/token", "116.3", "abn", False),
    ("t2.decode_mla_share", "T2 decode MLA share", "0.56", "", False),
    ("text.h20_32seq_50tps", "2.3.1 H20 time for 32 seq x 50 tok/s (s)", "0.614", "b", False),
    ("t3.weights_fp8", "T3 weights FP8 (GB)", "671", "", False),
    ("t3.weights_w4a8", "T3 weights attn FP8 / MoE W4A8 (GB)", "342.5", "c", False),
    ("t3.kv", "T3 KV cache 1 seq, s=3260 (GB)", "0.112", "d", True),
    ("t3.act_mla", "T3 activations MLA decode (GB)", "0.0008", "k", False),
    ("t3.act_mha", "T3 activations MHA prefill (GB)", "2.78", "", False),
    ("t4.prefill_io", "T4 prefill TP8+EP8 IO (GB)", "352.5", "c", False),
    ("t4.prefill_io_time", "T4 prefill IO time (s)", "0.088", "", False),
    ("t4.prefill_compute_time", "T4 prefill compute time, derivation 1 (s)", "0.58", "bl", False),
    ("t4.prefill_ratio", "T4 prefill IO/compute", "0.15", "", False),
    ("t4.decode1_io", "T4 decode 1 seq IO (GB)", "25.7", "c", False),
    ("t4.decode1_io_time", "T4 decode 1 seq IO time (s)", "0.0064", "c", False),
    ("t4.decode_compute_time", "T4 decode compute time, derivation 2 (s)", "0.000383", "b", False),
    ("t4.decode1_ratio", "T4 decode 1 seq IO/compute", "16.7", "", False),
    ("t4.decode32_io", "T4 decode 32 seq IO (GB)", "32.15", "c", False),
    ("t4.decode32_io_time", "T4 decode 32 seq IO time (s)", "0.008", "", False),
    ("t4.decode32_ratio", "T4 decode 32 seq IO/compute", "20.1", "e", True),
    ("t5.ep_prefill", "T5 prefill EP traffic (GB)", "40.39", "i", False),
    ("t5.ep_prefill_time", "T5 prefill EP time (s)", "0.045", "", False),
    ("t5.tp1_compute_time", "T5 TP1+EP8 compute, derivation 3 (s)", "0.16", "b", False),
    ("t5.tp1_ratio", "T5 TP1+EP8 comm/compute", "0.28", "", False),
    ("t5.tp_prefill", "T5 TP8 traffic (GB)", "4.65", "", False),
    ("t5.tp8_total", "T5 TP8+EP8 traffic (GB)", "45.04", "i", False),
    ("t5.tp8_time", "T5 TP8+EP8 comm time (s)", "0.05", "", False),
    ("t5.tp8_compute_time", "T5 TP8+EP8 compute, derivation 4 (s)", "0.082", "b", False),
    ("t5.tp8_ratio", "T5 TP8+EP8 comm/compute", "0.61", "", False),
    ("t5.ep_decode", "T5 decode EP traffic 1 token (GB)", "0.012", "j", False),
    ("t5.ep_decode_time", "T5 decode EP time (s)", "0.000013", "j", False),
    ("t5.decode_ratio", "T5 decode comm/compute", "0.034", "j", False),
    ("t6.tp1_tflops", "T6 TP1+EP8 TFLOPs per GPU", "47.5", "b", False),
    ("t6.tp8_tflops", "T6 TP8+EP8 TFLOPs per GPU", "24", "b", False),
    ("t8.ep8_b1.mem", "T8 1 seq DP8/EP8 memory (GB)", "65", "c", False),
    ("t8.ep8_b1.io", "T8 1 seq DP8/EP8 IO (GB)", "16.56", "cf", True),
    ("t8.ep8_b1.gflops", "T8 1 seq DP8/EP8 GFLOPs (printed 116)", "116", "g", True),
    ("t8.ep8_b1.gflops", "T8 1 seq DP8/EP8 GFLOPs, derivation 5", "71.5", "b", False),
    ("t8.ep8_b1.comm", "T8 1 seq DP8/EP8 comm (GB)", "0.012", "j", False),
    ("t8.ep8_b32.mem", "T8 32 seq EP8 memory (GB)", "68.5", "c", False),
    ("t8.ep8_b32.io", "T8 32 seq EP8 IO (GB)", "23.2", "cm", False),
    ("t8.ep8_b32.comm", "T8 32 seq EP8 comm (GB)", "0.383", "j", False),
    ("t8.ep8_b32.gflops", "T8 32 seq EP8 GFLOPs", "2288", "b", False),
    ("t8.ep16_b32.mem", "T8 32 seq EP16 memory (GB)", "47.5", "ch", True),
    ("t8.ep16_b32.io", "T8 32 seq EP16 IO (GB)", "22.56", "cm", False),
    ("t8.ep16_b32.gflops", "T8 32 seq EP16 GFLOPs", "2185.6", "b", False),
    ("t8.ep32_b32.mem", "T8 32 seq EP32 memory (GB)", "37.8", "c", False),
    ("t8.ep32_b32.io", "T8 32 seq EP32 IO (GB)", "22.24", "cm", False),
    ("t8.ep32_b32.gflops", "T8 32 seq EP32 GFLOPs", "2134.4", "b", False),
    ("t9.ep8.io_time", "T9 EP8 IO time (s)", "0.0058", "c", False),
    ("t9.ep8.comm_time", "T9 EP8 comm time (s)", "0.0004", "j", False),
    ("t9.ep8.compute_time", "T9 EP8 compute time (s)", "0.0075", "", False),
    ("t9.ep8.total", "T9 EP8 total, no overlap (s)", "0.0137", "", False),
    ("t9.ep16.io_time", "T9 EP16 IO time (s)", "0.00564", "c", False),
    ("t9.ep16.comm_time", "T9 EP16 comm time (s)", "0.004", "j", False),
    ("t9.ep16.compute_time", "T9 EP16 compute time (s)", "0.0072", "", False),
    ("t9.ep16.total", "T9 EP16 total, no overlap (s)", "0.0168", "", False),
    ("t9.ep32.io_time", "T9 EP32 IO time (s)", "0.00556", "c", False),
    ("t9.ep32.comm_time", "T9 EP32 comm time (s)", "0.0059", "j", False),
    ("t9.ep32.compute_time", "T9 EP32 compute time (s)", "0.007", "", False),
    ("t9.ep32.total", "T9 EP32 total, no overlap (s)", "0.0185", "", False),
    ("text.tp16_time", "2.3.4 TP16 decode comm time, 32 seq (s)", "0.000547", "", False),
]

TOLERANCE = 0.03


def agrees(value: float, printed: str, tol: float = TOLERANCE) -> bool:
    """Within tol relative, or within half a unit of the printed value's last digit (its rounding)."""
    art = float(printed)
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - art) <= max(tol * abs(art), 0.5 * 10.0**-decimals + 1e-15)


@dataclass(frozen=True)
class SeedRow:
    key: str
    label: str
    printed: str
    arith: float
    ours: float
    footnotes: str
    slip: bool

    @property
    def article(self) -> float:
        return float(self.printed)

    @property
    def rel_diff(self) -> float:
        return (self.ours - self.article) / self.article

    @property
    def self_consistent(self) -> bool:
        """The article's printed value follows from its own formula and inputs (not a slip, not a rounded intermediate)."""
        return not self.slip and agrees(self.arith, self.printed)

    @property
    def ok(self) -> bool:
        return agrees(self.ours, self.printed)

    def as_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "article": self.article, "arith": self.arith, "ours": self.ours,
                "rel_diff": self.rel_diff, "footnotes": self.footnotes, "slip": self.slip,
                "self_consistent": self.self_consistent, "agrees": self.ok}


def seed_rows() -> list[SeedRow]:
    art, ours = formulas(article_inputs()), formulas(model_inputs())
    return [SeedRow(key, label, printed, art[key], ours[key], notes, slip) for key, label, printed, notes, slip in ROWS]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def render_seed_tables() -> str:
    rows = seed_rows()
    out = ["Seed article tables 2-9 (DeepSeek-V3 on H20, isl 3260, osl 1100) under the article's conventions.",
           "article = printed value; arith = its formulas on its own rounded inputs; ours = the same formulas on the",
           "shipped config's exact inputs; diff = ours vs article. '!' = slip in the article; '~' = the article rounds",
           "an intermediate (its printed value does not follow from arith); see the footnotes.", "",
           f"  {'quantity':<46} {'article':>10} {'arith':>10} {'ours':>10} {'diff':>7}  notes"]
    for r in rows:
        flag = "!" if r.slip else (" " if r.self_consistent else "~")
        out.append(f"{flag} {r.label:<46} {r.printed:>10} {_fmt(r.arith):>10} {_fmt(r.ours):>10} {r.rel_diff:>+7.1%}  {r.footnotes}")
    sc = [r for r in rows if r.self_consistent]
    out += ["", f"{sum(r.ok for r in sc)}/{len(sc)} self-consistent rows agree within 3% (or the printed rounding); "
                f"{sum(r.slip for r in rows)} rows are slips, {sum(not r.slip and not r.self_consistent for r in rows)} "
                "print a rounded intermediate.", "", "Footnotes:"]
    out += [f"  [{k}] {t}" for k, t in FOOTNOTES.items()]
    return "\n".join(out)
