"""Train the demo DeepSeek-V2-architecture model (MLA + MoE with shared experts) from token files.

Reads ``train.bin`` / ``heldout.bin`` (uint16 token ids written by ``data.py encode``), trains
``transformers.DeepseekV2ForCausalLM`` from scratch and writes a standard Hugging Face checkpoint
(bf16 safetensors, sharded under ``--max-shard-size``) plus ``loss_log.tsv`` and
``train_summary.json`` into ``--out``.

Recipe: AdamW (decoupled weight decay on matrices only), linear warm-up then cosine decay to
``min_lr_ratio`` of the peak, bf16 autocast on CUDA (fp32 master weights), gradient clipping,
a Switch-style load-balancing loss on every MoE router, residual dropout on the attention and
MLP outputs (training only; the checkpoint is the plain architecture), random windows of
``seq_len + 1`` tokens from the concatenated corpus. The number of steps fits ``--time-budget-s``:
it is fixed after timing the first steps, so the cosine schedule always ends at its floor. The
held-out loss is measured every ``--eval-every`` steps on the whole held-out split and the best
weights are kept (multi-epoch training on a small corpus can overfit).

Usage (from the repository root)::

    python3 tools/demo_model/train.py --data .demo_data --out runs/demo                  # on a GPU
    python3 tools/demo_model/train.py --shape tiny --device cpu --seq-len 128 --batch-size 16 \
        --max-steps 20 --warmup-steps 5 --out /tmp/tiny                              # CPU check
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # fixed by chat_format.SPECIAL_TOKENS


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the demo model (DeepSeek-V2 names in the comments). Dimensions in elements."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    kv_lora_rank: int = 64  # width of MLA's compressed KV latent (what the KV cache stores)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # decoupled RoPE key, shared across heads
    v_head_dim: int = 32
    dense_intermediate_size: int = 768  # MLP width of the first_k_dense_replace dense layers
    routed_experts: int = 8
    experts_per_token: int = 2
    shared_experts: int = 2
    moe_intermediate_size: int = 128  # width of each routed expert; shared MLP is shared_experts x this
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    def hf_config(self):
        """The equivalent ``transformers.DeepseekV2Config`` (keys with the same meaning in 5.17 and 5.23)."""
        from transformers import DeepseekV2Config

        return DeepseekV2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.dense_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            q_lora_rank=None,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            n_routed_experts=self.routed_experts,
            num_experts_per_tok=self.experts_per_token,
            n_shared_experts=self.shared_experts,
            moe_intermediate_size=self.moe_intermediate_size,
            first_k_dense_replace=self.first_k_dense_replace,
            topk_method="greedy",
            n_group=None,
            topk_group=None,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            hidden_act="silu",
            rms_norm_eps=1e-6,
            initializer_range=0.02,
            tie_word_embeddings=False,
            attention_bias=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )


SHAPES = {
    "demo": ModelShape(),
    "tiny": ModelShape(hidden_size=64, num_layers=2, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=16, dense_intermediate_size=128, routed_experts=4,
                       moe_intermediate_size=32, max_position_embeddings=256),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Lengths in tokens, times in seconds."""

    seq_len: int = 2048
    batch_size: int = 16
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    dropout: float = 0.1
    time_budget_s: float = 390.0
    max_steps: int = 100_000
    eval_every: int = 200
    log_every: int = 50
    seed: int = 0


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``peak_lr`` to ``min_lr_ratio * peak_lr``."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * cfg.peak_lr
    return floor + 0.5 * (cfg.peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


class RouterStats:
    """Forward hooks on every MoE router: load-balancing loss and per-expert token counts."""

    def __init__(self, model, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counts: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook) for n, m in model.named_modules()
                        if n.endswith("mlp.gate")]

    def _hook(self, module, inputs, output):
        router_logits, _, topk_indices = output
        self.records.append((router_logits, topk_indices))

    def balance_loss(self) -> torch.Tensor:
        """Mean over layers of ``E * sum_i f_i * P_i`` (1.0 when perfectly balanced); clears the records."""
        losses = []
        for logits, indices in self.records:
            probs = logits.float().softmax(dim=-1)
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts).float()
            self.counts = counts if self.counts is None else self.counts + counts
            frac = counts / indices.numel()
            losses.append(self.num_experts * (frac * probs.mean(dim=0)).sum())
        self.records.clear()
        return torch.stack(losses).mean() if losses else torch.zeros(())


def add_residual_dropout(model, p: float) -> None:
    """Dropout on each attention and MLP output before it joins the residual stream (training only)."""
    if p <= 0:
        return

    def attn_hook(module, inputs, output):
        return (F.dropout(output[0], p, module.training),) + tuple(output[1:])

    def mlp_hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(attn_hook)
        layer.mlp.register_forward_hook(mlp_hook)


def load_tokens(path: Path, device: torch.device) -> torch.Tensor:
    """uint16 token file -> int64 tensor on ``device``."""
    ids = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    return torch.from_numpy(ids).to(device)


def heldout_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``seq_len + 1`` windows covering the held-out split, shape [n, seq_len + 1]."""
    n = (tokens.numel() - 1) // seq_len
    starts = torch.arange(n, device=tokens.device) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)]


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats/token) over all windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i:i + batch_size]
        with autocast(device):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def choose_experts_implementation(model, device: torch.device, vocab_size: int, requested: str = "auto") -> str:
    """``grouped_mm`` if a forward/backward under autocast runs on this device, else ``eager``."""
    if device.type != "cuda" or requested == "eager":
        model.set_experts_implementation("eager")
        return "eager"
    try:
        model.set_experts_implementation("grouped_mm")
        x = torch.randint(0, vocab_size, (2, 64), device=device)
        with autocast(device):
            out = model(input_ids=x).logits.float().mean()
        out.backward()
        model.zero_grad(set_to_none=True)
        return "grouped_mm"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the portable loop
        print(f"grouped_mm unavailable ({type(exc).__name__}: {str(exc)[:200]}); using eager experts")
        model.zero_grad(set_to_none=True)
        model.set_experts_implementation("eager")
        return "eager"


def check_logits(model_dir: Path, check_ids: list[int]) -> dict:
    """Reload the saved checkpoint in fp32 (bf16 weights upcast) and report logits for ``check_ids``.

    The same function run on another machine/transformers version must give the same numbers.
    """
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.set_experts_implementation("eager")
    model.eval()
    ids = torch.tensor([check_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    loss = F.cross_entropy(logits[:-1], ids[0, 1:]).item()
    last = logits[-1]
    top = torch.topk(last, 5)
    return {"input_ids": check_ids, "loss": loss, "last_logits_first8": last[:8].tolist(),
            "last_top5_ids": top.indices.tolist(), "last_top5_logits": top.values.tolist()}


def train(data_dir: Path, out_dir: Path, shape: ModelShape, cfg: TrainConfig, device: torch.device,
          max_shard_size: str, experts_impl: str = "auto") -> dict:
    """Train, keep the best held-out weights, save the checkpoint and logs; return the summary."""
    from transformers import DeepseekV2ForCausalLM, GenerationConfig

    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_tokens = load_tokens(data_dir / "train.bin", device)
    heldout = heldout_windows(load_tokens(data_dir / "heldout.bin", device), cfg.seq_len)
    print(f"train tokens {train_tokens.numel():,}; held-out windows {heldout.shape[0]} x {cfg.seq_len}")

    config = shape.hf_config()
    model = DeepseekV2ForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    experts_impl = choose_experts_implementation(model, device, shape.vocab_size, experts_impl)
    print(f"parameters {n_params:,}; experts implementation {experts_impl}")
    router = RouterStats(model, shape.routed_experts, shape.experts_per_token)
    add_residual_dropout(model, cfg.dropout)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("mlp.gate.weight")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith("mlp.gate.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda",
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len + 1, device=device)
    high = train_tokens.numel() - cfg.seq_len - 1

    out_dir.mkdir(parents=True, exist_ok=True)
    log_rows = ["step\ttokens\tlr\ttrain_loss\taux_loss\theldout_loss\telapsed_s"]
    total_steps = cfg.max_steps
    best = (float("inf"), -1, None)
    run_loss = torch.zeros((), device=device)
    run_aux = torch.zeros((), device=device)
    run_n = 0
    model.train()
    start = time.perf_counter()
    step = 0
    timing_start = None
    while step < total_steps:
        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            timing_start = time.perf_counter()
        if step == 40 and timing_start is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - timing_start) / 30
            left = cfg.time_budget_s - (time.perf_counter() - start)
            eval_share = 0.9  # leave ~10% of the budget for held-out evaluations
            total_steps = min(cfg.max_steps, step + int(left * eval_share / per_step))
            print(f"{per_step * 1000:.1f} ms/step -> {total_steps} steps in {cfg.time_budget_s:.0f} s")
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, high, (cfg.batch_size,), device=device, generator=generator)
        batch = train_tokens[starts[:, None] + offsets]
        with autocast(device):
            logits = model(input_ids=batch[:, :-1]).logits
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux = router.balance_loss()
        loss = lm_loss + cfg.aux_loss_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        run_loss += lm_loss.detach()
        run_aux += aux.detach()
        run_n += 1
        step += 1
        is_eval = step % cfg.eval_every == 0 or step == total_steps
        if step % cfg.log_every == 0 or is_eval:
            train_loss, aux_loss = run_loss.item() / run_n, run_aux.item() / run_n
            run_loss.zero_()
            run_aux.zero_()
            run_n = 0
            heldout_loss = ""
            if is_eval:
                value = mean_loss(model, heldout, cfg.batch_size, device)
                heldout_loss = f"{value:.4f}"
                if value < best[0]:
                    best = (value, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            elapsed = time.perf_counter() - start
            log_rows.append(f"{step}\t{step * cfg.batch_size * cfg.seq_len}\t{lr:.3e}\t{train_loss:.4f}\t"
                            f"{aux_loss:.4f}\t{heldout_loss}\t{elapsed:.1f}")
            print(f"step {step:5d}/{total_steps} lr {lr:.2e} loss {train_loss:.4f} aux {aux_loss:.3f}"
                  + (f" heldout {heldout_loss}" if heldout_loss else "") + f" t {elapsed:.0f}s", flush=True)
        if time.perf_counter() - start > cfg.time_budget_s * 1.08:
            print(f"time budget exceeded at step {step}; stopping")
            break
    train_seconds = time.perf_counter() - start
    if not (step % cfg.eval_every == 0 or step == total_steps):  # stopped early: score the last weights too
        value = mean_loss(model, heldout, cfg.batch_size, device)
        if value < best[0]:
            best = (value, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
    for handle in router.handles:
        handle.remove()
    expert_share = (router.counts / router.counts.sum()).tolist() if router.counts is not None else []

    model.load_state_dict(best[2])
    model.to(torch.bfloat16)
    heldout_bf16 = mean_loss(model, heldout, cfg.batch_size, device)
    print(f"best held-out loss {best[0]:.4f} at step {best[1]} (fp32 weights); "
          f"bf16 weights: {heldout_bf16:.4f} nats/token, perplexity {math.exp(heldout_bf16):.2f}")
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=128)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    (out_dir / "loss_log.tsv").write_text("\n".join(log_rows) + "\n")
    check_ids = heldout[0, :64].tolist()
    summary = {
        "shape": asdict(shape), "train": asdict(cfg), "parameters": n_params, "experts_implementation": experts_impl,
        "steps": step, "planned_steps": total_steps, "train_seconds": round(train_seconds, 1),
        "tokens_seen": step * cfg.batch_size * cfg.seq_len, "train_tokens": int(train_tokens.numel()),
        "heldout_tokens_scored": int(heldout[:, 1:].numel()), "best_step": best[1],
        "best_heldout_loss_fp32": best[0], "heldout_loss_bf16": heldout_bf16,
        "heldout_perplexity_bf16": math.exp(heldout_bf16), "expert_token_share_all_layers": expert_share,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "check": check_logits(out_dir, check_ids),
    }
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("check:", json.dumps(summary["check"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".demo_data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-shard-size", default="12MB")
    parser.add_argument("--experts-impl", choices=["auto", "eager"], default="auto",
                        help="auto: grouped_mm on CUDA when it runs, else the per-expert loop")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = replace(TrainConfig(), **{k: getattr(args, k) for k in asdict(TrainConfig())})
    train(args.data, args.out, SHAPES[args.shape], cfg, torch.device(args.device), args.max_shard_size,
          args.experts_impl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
