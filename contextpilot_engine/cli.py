"""The ``contextpilot`` command.

Subcommands live in their own modules and are imported only when used, so
``contextpilot --help`` stays fast and never imports an engine.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
SUBCOMMANDS = {
    "demo": ("contextpilot_engine.demo", "run a real vLLM engine on a local tiny model with and without contextpilot"),
    "bench": ("contextpilot_engine.bench.suite", "run the benchmark suite and write its report"),
    "model": ("contextpilot_engine.model_cli", "the local test model: `contextpilot model path` prints its directory"),
    "serve": ("contextpilot_engine.proxy.cli", "an OpenAI-compatible proxy in front of an engine, synced by its KV events"),
    "engine": ("contextpilot_engine.engine_scripts", "the plugin in an engine's environment: status, install, verify, uninstall"),
}


#: subcommand -> the package extra that brings its optional dependencies
EXTRAS = {"serve": "proxy", "bench": "bench"}


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="contextpilot", description="contextpilot-engine " + __version__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    wanted = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted == [name]:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:  # an optional dependency of this subcommand is missing
                if (exc.name or "").split(".")[0] == "contextpilot_engine":
                    raise  # our own module: a broken install, not a missing extra
                extra = EXTRAS.get(name)
                how = f"; install it with: pip install 'contextpilot-engine[{extra}]'" if extra else ""
                print(f"contextpilot {name}: needs {exc.name or exc}, which is not installed{how}", file=sys.stderr)
                return 1
            mod.add_arguments(p)
            modules[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
