"""``contextpilot model path``: the local test model, built on first use, for commands that need a model.

No model can be downloaded on the machines this project runs on, so the
demo, the tests and the benchmarks build a tiny random-weight Llama with a
locally trained tokenizer (:mod:`contextpilot_engine.bench.tiny_model`).
This command prints its directory, so a server can be started on it as
written::

    MODEL=$(python -m contextpilot_engine.cli model path)
    python -m vllm.entrypoints.openai.api_server --model "$MODEL" ...
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    path = sub.add_parser("path", help="print the directory of the local model (building it the first time)")
    path.add_argument("--size", choices=("tiny", "small"), default="tiny",
                      help="tiny: 0.8M parameters, for tests; small: 20M parameters, for benchmarks")


def run(args: argparse.Namespace) -> int:
    from .bench.engine import engine_env
    from .bench.tiny_model import cached_tiny_model

    engine_env()  # torch and transformers read their settings at import
    print(cached_tiny_model(args.size))
    return 0
