"""`fractal <command> ...`: dispatches to the module that owns each command.

Each command module exposes `main(argv: list[str]) -> int`. Modules are imported only when their
command runs, so `fractal report` and `fractal plan` never import torch.
"""
from __future__ import annotations

import importlib
import sys

from fractal.errors import FractalError

COMMANDS = {
    "report": ("fractal.perf.cli", "four-resource report of a model on a GPU under a parallel plan"),
    "plan": ("fractal.planner.cli", "search parallel layouts and P:D ratios under TTFT/TPOT targets"),
    "generate": ("fractal.engine.cli", "offline generation with the engine"),
    "serve": ("fractal.serve.cli", "OpenAI-compatible HTTP server"),
    "bench": ("fractal.bench.cli", "serving and offline benchmarks (floor printed beside each row)"),
}


def _usage() -> str:
    lines = ["usage: fractal <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`fractal <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fractal import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fractal: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except FractalError as exc:
        print(f"fractal {name}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"fractal {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
