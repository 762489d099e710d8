"""A tiny random-weight Llama model with a locally trained tokenizer, for engine tests.

Engine tests and benchmarks need a real causal LM that vLLM can load, but this
project must not download weights from a hub.  Prefix caching does not care
what the weights say, only that the engine runs the model and stores its KV
blocks, so a random-weight model is enough.  Everything is made here:

* the tokenizer is a byte-level BPE trained on the first 200 ``*.py`` files
  of the running Python's standard library (always on disk, so no data set
  is needed); byte-level means any text encodes without unknown tokens;
* the model is a ``LlamaForCausalLM`` initialised from a fixed seed and saved
  in bf16 with tied embeddings;
* a ChatML-style chat template is saved so vLLM's chat entry points work.

Builds are deterministic: two builds with the same library versions give
byte-identical ``model.safetensors`` and ``tokenizer.json``.

Head sizes are chosen from those vLLM's CPU attention supports
(32, 64, 80, 96, 112, 128, ...); hidden 64 with 16-dim heads would not load.

torch, transformers and tokenizers are imported inside functions only, so
importing this module (and the ``bench`` package) stays cheap.

CLI::

    python -m contextpilot_engine.bench.tiny_model OUT_DIR [--size tiny|small]
    python -m contextpilot_engine.bench.tiny_model --cached [--size small]   # prints the cached path
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "BUILDER_VERSION",
    "CHAT_TEMPLATE",
    "SIZES",
    "TinyModelSpec",
    "build_tiny_model",
    "cache_root",
    "cached_tiny_model",
]

#: Bump whenever a change here alters the files a build writes; it is part of
#: the cache key, so stale cached models are not reused.
BUILDER_VERSION = 1

#: ChatML layout: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, and an
#: open assistant turn when a generation prompt is requested.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MARKER_NAME = ".contextpilot-model-complete"


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture and build inputs; every field is part of the cache key."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 4096
    max_position_embeddings: int = 4096
    seed: int = 0
    tokenizer_files: int = 200


SIZES: dict[str, TinyModelSpec] = {
    # ~0.8M parameters: starts instantly, for functional tests.
    "tiny": TinyModelSpec(128, 256, 2, 4, 2, 32),
    # ~20M parameters: prefill is slow enough that cache hits show in wall time.
    "small": TinyModelSpec(512, 1536, 6, 8, 2, 64),
}

_CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _spec(size: str) -> TinyModelSpec:
    try:
        spec = SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}") from None
    if spec.head_dim not in _CPU_ATTENTION_HEAD_SIZES:
        raise ValueError(f"head_dim {spec.head_dim} is not supported by vLLM's CPU attention")
    return spec


def _training_files(limit: int) -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:limit]
    if not files:
        raise RuntimeError(f"no *.py files found in the standard library at {stdlib!r}")
    return files


def _train_tokenizer(spec: TinyModelSpec):
    """Train the byte-level BPE and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        # Read the files ourselves so an odd encoding cannot abort training.
        for path in _training_files(spec.tokenizer_files):
            with open(path, encoding="utf-8", errors="replace") as fh:
                yield fh.read()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.model_max_length = spec.max_position_embeddings
    return hf_tok


def build_tiny_model(out_dir: str | os.PathLike, *, size: str = "tiny") -> Path:
    """Build the model and tokenizer into ``out_dir`` (created if needed) and return it.

    Files written: ``config.json``, ``generation_config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
    ``chat_template.jinja``.  Existing files of the same names are replaced.
    """
    spec = _spec(size)
    from transformers.utils import logging as hf_logging

    # A progress bar for writing one 1.6 MB shard is noise in test logs.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _build(Path(out_dir), spec)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _build(out: Path, spec: TinyModelSpec) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)

    hf_tok = _train_tokenizer(spec)
    hf_tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    # Weights depend only on the seed: fork the RNG so callers' torch state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    return out


def cache_root() -> Path:
    """``$CONTEXTPILOT_CACHE`` or ``~/.cache/contextpilot-engine`` (shared with scripts/setup_env.sh)."""
    env = os.environ.get("CONTEXTPILOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "contextpilot-engine"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def _cache_key(size: str, spec: TinyModelSpec) -> str:
    # The library versions are included because tokenizer training and
    # weight initialisation may change between releases; the Python version
    # because the training text is that Python's standard library.
    params = {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "spec": asdict(spec),
        "python": "%d.%d" % sys.version_info[:2],
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "tokenizers": _package_version("tokenizers"),
    }
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_tiny_model(size: str = "tiny") -> Path:
    """Return a built model of ``size`` from the cache, building it on first use.

    The model lives in ``<cache_root>/models/<size>-<key>``.  A build goes into
    a temporary sibling directory that is renamed into place only once it is
    complete (with a marker file inside), so an interrupted build never leaves
    a half-written model behind and concurrent builders cannot see one: the
    first rename wins and the other builders discard their copy.
    """
    spec = _spec(size)
    models_dir = cache_root() / "models"
    final = models_dir / f"{size}-{_cache_key(size, spec)}"
    if (final / MARKER_NAME).is_file():
        return final

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=models_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cached model is meant to be shared
        build_tiny_model(tmp, size=size)
        (tmp / MARKER_NAME).write_text(json.dumps({"size": size, "spec": asdict(spec)}) + "\n")
        if final.exists() and not (final / MARKER_NAME).is_file():
            # Not produced by this function (renames are atomic): clear it out.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER_NAME).is_file():
                raise
            # Another process finished first; its copy is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contextpilot_engine.bench.tiny_model",
        description="Build a tiny random-weight Llama model and local tokenizer for vLLM tests.",
    )
    parser.add_argument("out_dir", nargs="?", help="directory to write the model into")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--cached", action="store_true",
                        help="build into (or reuse) the shared cache instead of OUT_DIR")
    args = parser.parse_args(argv)
    if args.cached == bool(args.out_dir):
        parser.error("give exactly one of OUT_DIR or --cached")
    path = cached_tiny_model(args.size) if args.cached else build_tiny_model(args.out_dir, size=args.size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
