"""Without ``--enable-contextpilot`` / ``additional_config``, vLLM behaves exactly as before.

Two fresh interpreters run the same script on the real engine: one with the
plugin installed and loaded by vLLM (the flag simply absent), one with the
plugin excluded through vLLM's own allowlist (``VLLM_PLUGINS=none``).  They
must report the same prompt token ids, cached tokens and output tokens, and
in the first one vLLM's block pool, scheduler, renderer and chat endpoint
must be the original functions: only the three ``EngineArgs`` flag wrappers
are installed.  Fresh processes are needed because other tests in this
session turn the plugin on, which patches classes for the whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from contextpilot_engine.bench.engine import engine_env, make_llm
    engine_env()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = make_llm(sys.argv[1])
    from contextpilot_engine.integration.failopen import is_patched
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.renderers.base import BaseRenderer
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    patched = {
        "BlockPool." + n: is_patched(BlockPool, n)
        for n in ("_insert_block_hash", "_remove_cached_block_hashes", "reset_prefix_cache",
                  "cache_full_blocks", "cache_partial_block")
    }
    patched["Scheduler.__init__"] = is_patched(Scheduler, "__init__")
    patched["BaseRenderer.render_chat"] = is_patched(BaseRenderer, "render_chat")
    patched["BaseRenderer.render_chat_async"] = is_patched(BaseRenderer, "render_chat_async")
    patched["OpenAIServingChat.create_chat_completion"] = is_patched(OpenAIServingChat, "create_chat_completion")
    flags = {n: is_patched(EngineArgs, n) for n in ("add_cli_args", "from_cli_args", "create_engine_config")}
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    mirrored = "_contextpilot_mirror" in pool.__dict__

    docs = "".join(f"<document>Document {i}: " + "alpha beta gamma " * 30 + "</document>" for i in range(4))
    chats = [
        [{"role": "system", "content": docs}, {"role": "user", "content": "q1"}],
        [{"role": "system", "content": docs}, {"role": "user", "content": "q2",
          "contextpilot": {"contexts": ["ignored without the plugin"]}}],
    ]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    results = []
    for conv in chats:
        (o,) = llm.chat([conv], params, use_tqdm=False)
        results.append([list(o.prompt_token_ids), o.num_cached_tokens, list(o.outputs[0].token_ids)])
    prefix = list(range(50, 50 + 200))
    for p in (prefix, prefix + [7, 8, 9]):
        (o,) = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        results.append([len(o.prompt_token_ids), o.num_cached_tokens, list(o.outputs[0].token_ids)])
    print("RESULT " + json.dumps({"patched": patched, "flags": flags, "mirrored": mirrored, "results": results}))
    """
)


def run_script(model: str, plugins: str | None) -> dict:
    env = dict(os.environ)
    env.pop("CONTEXTPILOT_VLLM_ENGINE_HOOKS", None)  # set by other tests' engines in this process
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, model], env=env, capture_output=True, text=True, timeout=300, cwd="/"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_without_the_flag_vllm_is_untouched(tiny_model_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two independent interpreters, side by side
        loaded_f = pool.submit(run_script, tiny_model_path, None)
        excluded_f = pool.submit(run_script, tiny_model_path, "none")
        loaded, excluded = loaded_f.result(), excluded_f.result()

    assert loaded["results"] == excluded["results"]
    assert not any(loaded["patched"].values()), loaded["patched"]
    assert not loaded["mirrored"]
    assert all(loaded["flags"].values())  # the plugin did load: only its flag wrappers are in place
    assert not any(excluded["flags"].values())
    # The cached-token pattern is vLLM's own: the repeated prefix is reused.
    assert loaded["results"][3][1] == 192 and loaded["results"][1][1] > 0
