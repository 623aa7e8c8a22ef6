"""Engine options shared by `fractal generate`, `fractal serve` and `fractal bench offline`."""
from __future__ import annotations

import argparse

from fractal.engine.config import DTYPES, LOAD_FORMATS, PREFILL_ORDERS


def add_engine_args(parser: argparse.ArgumentParser, seed_flag: str = "--seed") -> None:
    """The engine options; `seed_flag` names the engine-seed option (`fractal generate` keeps --seed for
    the sampling seed and calls it --engine-seed). Every option's value lands in `args.<field>`."""
    e = parser.add_argument_group("engine")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    e.add_argument("--dtype", default="auto", choices=DTYPES)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights at the config's shapes (no checkpoint needed)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens computed per step at most")
    e.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output, tokens")
    e.add_argument("--prefill-chunk-size", type=int, default=None)
    e.add_argument("--no-chunked-prefill", action="store_true")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--prefill-order", default="fcfs", choices=PREFILL_ORDERS)
    e.add_argument("--preemption-balance", type=int, default=32,
                   help="near the end of a batch that outgrew the KV pool, let a preempted request lag the running "
                        "ones by at most this many output tokens, swapping (0: off)")
    e.add_argument("--swap-space", type=float, default=None,
                   help="GiB of host memory for the KV of preempted requests, resumed without recompute (0: off; "
                        "default 4 on CUDA)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--num-gpu-blocks", type=int, default=None)
    e.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    e.add_argument("--floor-gpu", default=None,
                   help="compute each step's four-resource floor on this GPU (e.g. h100, or a GPU JSON file) and "
                        "report measured time against it (stats, /metrics)")
    e.add_argument(seed_flag, dest="seed", type=int, default=0, help="engine seed (requests without their own seed)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed options."""
    return dict(
        tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, load_format=args.load_format,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        prefill_chunk_size=args.prefill_chunk_size, enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching, prefill_order=args.prefill_order,
        preemption_balance=args.preemption_balance, swap_space=args.swap_space,
        gpu_memory_utilization=args.gpu_memory_utilization, num_gpu_blocks=args.num_gpu_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=args.seed, floor_gpu=args.floor_gpu,
    )
