"""`fractal serve [MODEL]`: the OpenAI-compatible HTTP server.

    fractal serve                                   # the shipped demo model on http://127.0.0.1:8000
    fractal serve path/to/model --port 8001 --api-key secret --max-num-seqs 32 --max-queue 128

Without MODEL it serves the demo model shipped in fractal/demo/model/ under the name "fractal-demo".
SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests finish (up to
--drain-timeout seconds), stops the engine thread and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fractal.errors import FractalError
from fractal.serve.engine_args import add_engine_args, engine_kwargs

DEMO_MODEL_NAME = "fractal-demo"


def demo_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractal serve", description="OpenAI-compatible server "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("model", nargs="?", default=None,
                   help=f"model directory (default: the demo model in {demo_model_dir()})")
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--api-key", default=os.environ.get("FRACTAL_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $FRACTAL_API_KEY)")
    h.add_argument("--served-model-name", action="append", default=None,
                   help="name clients use in `model` (repeatable; default: MODEL as given, or fractal-demo)")
    h.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs; more get 503 + Retry-After")
    h.add_argument("--max-n", type=int, default=16, help="largest `n` a request may ask for")
    h.add_argument("--chat-template", default=None, help="a Jinja2 chat template file overriding the model's")
    h.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    h.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_engine_args(p)
    return p


def _model_and_names(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    if args.model is None:
        path = demo_model_dir()
        if not path.is_dir():
            raise FractalError(f"no MODEL given and the demo model folder {path} is missing; "
                               "pass a model directory: fractal serve PATH")
        if not (path / "config.json").is_file():
            raise FractalError(f"no MODEL given and the demo model in {path} is incomplete (no config.json); "
                               "pass a model directory: fractal serve PATH")
        model, default_name = str(path), DEMO_MODEL_NAME
    else:
        model = default_name = args.model
    names = tuple(dict.fromkeys(args.served_model_name or [default_name]))
    return model, names


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    model, names = _model_and_names(args)
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise FractalError(f"--chat-template {args.chat_template!r} could not be read: {exc}") from exc

    from fractal.serve.config import ServerConfig

    config = ServerConfig(model_names=names, api_key=args.api_key, max_running=args.max_num_seqs,
                          max_queue=args.max_queue, max_n=args.max_n, chat_template=chat_template,
                          drain_timeout_s=args.drain_timeout)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    print(f"fractal serve: loading {model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    from fractal.engine.engine import LLMEngine

    engine = LLMEngine.from_args(model, **engine_kwargs(args))
    stats = engine.get_stats()
    print(f"fractal serve: engine ready in {time.perf_counter() - t0:.1f}s: max_model_len={engine.max_model_len}, "
          f"{stats.kv_blocks_total} KV blocks of {args.block_size} tokens; serving as {', '.join(names)} on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    from fractal.serve.server import serve

    serve(engine, config, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0
