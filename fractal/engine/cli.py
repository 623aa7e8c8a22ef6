"""`fractal generate`: offline generation from the command line.

    fractal generate --model PATH --prompt "Hello" --max-tokens 32 --temperature 0
    fractal generate --model PATH --prompt-token-ids 1,2,3 --load-format dummy

Prints each completion (text, or token ids when the model has no tokenizer) and a one-line summary.
"""
from __future__ import annotations

import argparse
import sys
import time

from fractal.errors import FractalError
from fractal.serve.engine_args import add_engine_args, engine_kwargs


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise FractalError(f"--prompt-token-ids {text!r} is invalid: give comma-separated integers like 1,2,3") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractal generate", description="Generate completions offline.")
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-token-ids", action="append", default=[], help="a prompt as comma-separated ids")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--seed", dest="sampling_seed", type=int, default=None, help="sampling seed of the requests")
    s.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", type=int, default=None)
    add_engine_args(p, seed_flag="--engine-seed")  # --seed above is the sampling seed
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompts: list = list(args.prompt) + [{"prompt_token_ids": _token_ids(t)} for t in args.prompt_token_ids]
    if not prompts:
        raise FractalError("no prompt given: pass --prompt TEXT or --prompt-token-ids 1,2,3")

    from fractal.engine.llm import LLM
    from fractal.sampling_params import SamplingParams

    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.sampling_seed, stop=args.stop, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    t0 = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    t2 = time.perf_counter()
    has_text = llm.tokenizer is not None
    for i, out in enumerate(outputs):
        for comp in out.outputs:
            tag = f"[{i}]" if params.n == 1 else f"[{i}.{comp.index}]"
            body = repr(comp.text) if has_text else " ".join(map(str, comp.token_ids))
            print(f"{tag} {body}  ({len(comp.token_ids)} tokens, {comp.finish_reason})")
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    stats = llm.get_stats()
    summary = (
        f"load {t1 - t0:.2f}s, generate {t2 - t1:.2f}s, {num_tokens} tokens "
        f"({num_tokens / max(t2 - t1, 1e-9):.1f} tok/s), {stats.num_steps_total} steps, "
        f"{stats.num_preempted_total} preemptions, prefix hit rate {stats.prefix_hit_rate:.0%}"
    )
    if stats.last_step_floor_s is not None:
        summary += (
            f"; last step {stats.last_step_time_s * 1e6:.1f} us vs {args.floor_gpu} floor "
            f"{stats.last_step_floor_s * 1e6:.3f} us ({stats.last_step_bound}-bound)"
        )
    print(summary, file=sys.stderr)
    return 0
