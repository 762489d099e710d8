"""The plugin through SGLang's real entry-point loader, and its flags through SGLang's real argument parser."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_the_real_loader_finds_and_applies_the_plugin(sglang_plugins):
    code = (
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "import json\n"
        "print(json.dumps(sorted(t for t, hooks in HookRegistry._hooks.items()\n"
        "      if any('contextpilot_engine' in getattr(h, '__module__', '') for _, h, _ in hooks))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    targets = json.loads(out.stdout.strip().splitlines()[-1])
    for target in (
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.__init__",
        "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.insert",
        "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.evict_for_alloc",
        "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority",
        "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request",
    ):
        assert target in targets, target


def test_every_hook_point_matches_this_sglang(sglang_plugins):
    import importlib
    import inspect

    from contextpilot_engine.integration.hook_points import matches
    from contextpilot_engine.sglang_plugin.hook_points import HOOK_POINTS

    for point in HOOK_POINTS:
        owner = getattr(importlib.import_module(point.module), point.owner)
        func = owner.__dict__[point.method]
        func = getattr(func, "__func__", func)
        func = getattr(func, "__wrapped__", func)
        assert matches(point, list(inspect.signature(func).parameters)), point.path


def parse(argv):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", "dummy", *argv])


def test_flags_become_the_options_every_process_sees(sglang_plugins):
    args = parse(["--enable-contextpilot", "--contextpilot-tenant", "team-a", "--contextpilot-cache-aware-scheduling",
                  "--no-contextpilot-implicit-documents"])
    assert args._contextpilot == {"tenant": "team-a", "cache_aware_scheduling": True, "implicit_documents": False}
    import pickle

    from contextpilot_engine.sglang_plugin.config import options_from_server_args

    options = options_from_server_args(pickle.loads(pickle.dumps(args)))  # what a scheduler process gets
    assert options.pilot.tenant == "team-a" and options.cache_aware_scheduling and not options.implicit_documents
    assert getattr(parse([]), "_contextpilot", None) is None


def test_flags_appear_in_help(sglang_plugins):
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert "--enable-contextpilot" in out.stdout and "--contextpilot-max-overtakes" in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--enable-contextpilot", "--contextpilot-popularity-decay", "1.5"],
         "argument --contextpilot-popularity-decay: popularity_decay: expected a number in (0, 1], got 1.5"),
        (["--contextpilot-tenant", "x"], "error: --contextpilot-tenant given without --enable-contextpilot"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(sglang_plugins, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_environment_variable_turns_it_on_for_the_python_engine(sglang_plugins, monkeypatch):
    from contextpilot_engine.integration.options import OptionError
    from contextpilot_engine.sglang_plugin.config import OPTIONS_ENV, options_from_server_args

    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path="dummy")
    assert options_from_server_args(args) is None
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"tenant": "py"}))
    assert options_from_server_args(args).pilot.tenant == "py"
    monkeypatch.setenv(OPTIONS_ENV, '{"bogus": 1}')
    with pytest.raises(OptionError, match=r"\$CONTEXTPILOT_SGLANG: unknown option\(s\) \['bogus'\]"):
        options_from_server_args(args)
