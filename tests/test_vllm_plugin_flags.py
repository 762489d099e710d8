"""``--enable-contextpilot`` / ``--contextpilot-*`` flags and the ``additional_config`` path.

The flags are parsed by vLLM's own server argument parser (``make_arg_parser``)
and turned into engine arguments by ``AsyncEngineArgs.from_cli_args``, exactly
as the OpenAI server does; the result must be the ``additional_config`` a
Python user would pass to ``LLM``, and both must give the same options once
vLLM has built its ``VllmConfig``.  Wrong options fail early, naming them.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def parser(vllm_ready):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.fixture(scope="module")
def model(tiny_model_path) -> str:
    return str(tiny_model_path)


def engine_args(parser, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_flags_map_into_additional_config(parser, model):
    args = engine_args(
        parser,
        [
            "--model", model,
            "--enable-contextpilot",
            "--contextpilot-cache-aware-scheduling",
            "--contextpilot-max-overtakes", "3",
            "--no-contextpilot-implicit-documents",
            "--contextpilot-tenant", "team-a",
            "--contextpilot-strategies", "merge_tree",
            "--contextpilot-max-delay", "none",
        ],
    )
    assert args.additional_config == {
        "contextpilot": {
            "cache_aware_scheduling": True,
            "max_overtakes": 3,
            "implicit_documents": False,
            "tenant": "team-a",
            "strategies": ["merge_tree"],
            "max_delay": None,
        }
    }


def test_flags_merge_over_additional_config_json(parser, model):
    args = engine_args(
        parser,
        [
            "--model", model,
            "--additional-config", json.dumps({"contextpilot": {"report": False, "tenant": "x"}, "other": 1}),
            "--enable-contextpilot",
            "--contextpilot-tenant", "y",
        ],
    )
    assert args.additional_config == {"contextpilot": {"report": False, "tenant": "y"}, "other": 1}


def test_the_switch_wins_over_a_config_that_says_off(parser, model):
    args = engine_args(parser, ["--model", model, "--enable-contextpilot",
                                "--additional-config", json.dumps({"contextpilot": {"enabled": False}})])
    assert args.additional_config == {"contextpilot": {"enabled": True}}


def test_without_the_switch_nothing_is_added(parser, model):
    args = engine_args(parser, ["--model", model])
    assert "contextpilot" not in (args.additional_config or {})


def test_option_without_the_switch_is_an_error(parser, model, capsys):
    with pytest.raises(SystemExit) as exit_:
        engine_args(parser, ["--model", model, "--contextpilot-tenant", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --contextpilot-tenant given without --enable-contextpilot" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--contextpilot-max-overtakes", "-1", "argument --contextpilot-max-overtakes: max_overtakes: expected an int >= 0"),
        ("--contextpilot-strategies", "nope", "argument --contextpilot-strategies: strategies: expected a non-empty list"),
        ("--contextpilot-popularity-decay", "1.5", "popularity_decay: expected a number in (0, 1], got 1.5"),
        ("--contextpilot-max-nodes", "many", "argument --contextpilot-max-nodes: 'many' is not a valid int"),
    ],
)
def test_bad_flag_values_are_one_line_naming_the_flag(parser, model, capsys, flag, value, message):
    with pytest.raises(SystemExit):  # argparse's own error: usage line, then one line naming the flag
        parser.parse_args(["--model", model, "--enable-contextpilot", flag, value])
    assert message in capsys.readouterr().err


def test_unknown_flag_is_argparses_error(parser, model):
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", model, "--contextpilot-bogus", "1"])


def test_flags_and_additional_config_give_the_same_engine_options(parser, model):
    from vllm.engine.arg_utils import EngineArgs

    from contextpilot_engine.vllm_plugin.config import options_from_vllm_config

    from_flags = engine_args(
        parser, ["--model", model, "--enable-contextpilot", "--contextpilot-max-overtakes", "5"]
    )
    from_python = EngineArgs(model=model, additional_config={"contextpilot": {"max_overtakes": 5}})
    a = options_from_vllm_config(from_flags.create_engine_config())
    b = options_from_vllm_config(from_python.create_engine_config())
    assert a is not None and a == b and a.max_overtakes == 5


def test_unknown_additional_config_option_is_named(model):
    from vllm import LLM

    named = r"unknown option\(s\) \['bogus'\]; known options: \[.*'cache_aware_scheduling'"
    with pytest.raises(ValueError, match=named):
        LLM(model=model, additional_config={"contextpilot": {"bogus": 1}})
    with pytest.raises(ValueError, match="hint_template"):
        LLM(model=model, additional_config={"contextpilot": {"hint_template": "{nope}"}})


def test_plugin_can_be_switched_off_in_config(model):
    from vllm.engine.arg_utils import EngineArgs

    from contextpilot_engine.vllm_plugin.config import options_from_vllm_config

    config = EngineArgs(model=model, additional_config={"contextpilot": {"enabled": False}})
    assert options_from_vllm_config(config.create_engine_config()) is None
