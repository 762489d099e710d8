"""CPU stand-ins for the SGLang tests and benchmark (not used at serving time).

SGLang's server needs a CUDA GPU or an AMX CPU, so the real scheduler and
model runner cannot run here.  What does run is SGLang's own code around
them: ``UnifiedRadixCache`` on real CPU memory pools (both tree cores),
``SchedulePolicy``, ``ServerArgs`` and ``OpenAIServingChat``'s request
conversion.  The stand-ins below are only what those need:

* :func:`publish_server_args`: the runtime context SGLang's scheduler-side
  code reads (SGLang's own tests publish a ``ServerArgs(model_path="dummy")``);
* :func:`make_cache`: a ``UnifiedRadixCache`` over real ``ReqToTokenPool``,
  ``MHATokenToKVPool`` and token allocators, and :func:`insert_tokens`,
  which inserts a request's prefix the way ``checkpoint_into_tree`` does;
* :class:`StandInTokenizerManager`: the attributes ``OpenAIServingChat``
  reads of the tokenizer manager (the real one starts the scheduler).
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace
from typing import Any, Sequence

__all__ = ["publish_server_args", "make_cache", "insert_tokens", "StandInTokenizerManager", "make_serving_chat"]


def publish_server_args(role: str = "scheduler", **fields: Any) -> Any:
    """Publish ``ServerArgs(model_path="dummy", device="cpu", **fields)`` as this process's runtime context."""
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    reset_context()
    extra = fields.pop("_contextpilot", None)
    args = ServerArgs(model_path="dummy", device="cpu", **fields)
    if extra is not None:
        args._contextpilot = extra
    publish(args, role=role)
    return args


def make_cache(core: str, page_size: int, slots: int = 1024, events: bool = False):
    """A real ``UnifiedRadixCache`` on CPU pools; returns ``(cache, allocator)``.

    ``core`` is the tree core, ``"rust"`` (SGLang's default) or ``"python"``.
    """
    import torch
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    r2t = ReqToTokenPool(size=8, max_context_len=4096, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=slots, page_size=page_size, dtype=torch.bfloat16, head_num=1, head_dim=8,
                          layer_num=1, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(size=slots, dtype=torch.bfloat16, device="cpu", kvcache=kv, need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(size=slots, page_size=page_size, dtype=torch.bfloat16, device="cpu",
                                            kvcache=kv, need_sort=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=page_size,
        enable_kv_cache_events=events, tree_components=(ComponentType.FULL,), tree_core_backend=core,
    )
    return UnifiedRadixCache(params), alloc


def insert_tokens(cache: Any, alloc: Any, tokens: Sequence[int], page_size: int) -> int | None:
    """Insert ``tokens``' full pages as a finished request's checkpoint does; None if the pool is full.

    The KV slots come from the allocator (evicting from the tree first, as
    the scheduler does, when the pool is short); the partial last page is
    not inserted and its slots are freed.  Returns the prefix the tree
    already held.
    """
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    need = len(tokens) if page_size == 1 else -(-len(tokens) // page_size) * page_size
    if alloc.available_size() < need:
        cache.evict_for_alloc(EvictParams(num_tokens=need - alloc.available_size()))
    slots = alloc.alloc(need)
    if slots is None:
        return None
    slots = slots.to(torch.int64)
    key = RadixKey(array("q", tokens)).page_aligned(page_size)
    n = len(key)
    result = cache.insert(InsertParams(key=key, value=slots[:n].clone()))
    if len(slots) > n:
        alloc.free(slots[n:])
    return int(result.prefix_len)


def cached_prefix(cache: Any, tokens: Sequence[int]) -> int:
    """Tokens of ``tokens`` the tree holds on the device, from the start (rounded to pages)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return int(cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)))).device_prefix_len)


class StandInTokenizerManager:
    """The attributes ``OpenAIServingChat`` and ``OpenAIServingBase`` read of SGLang's TokenizerManager."""

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str, server_args: Any):
        from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
        from sglang.srt.sampling.sampling_params import SamplingParams

        self.tokenizer = tokenizer
        self.model_path = model_path
        self.served_model_name = "tiny"
        self.server_args = server_args
        self.model_config = SimpleNamespace(is_multimodal=False, hf_config=hf_config, vocab_size=hf_config.vocab_size,
                                            get_default_sampling_params=lambda: {})
        self.request_logger = SimpleNamespace(log_requests=False, log_requests_level=0)
        self.processor = None
        self.rid_to_state: dict = {}
        self.preferred_sampling_params = None
        self.sampling_params_class = SamplingParams
        self.tokenized_generate_req_type = TokenizedGenerateReqInput
        self.fake_bootstrap_room_counter = 0

    def config_value(self, name: str) -> Any:
        return None


def make_serving_chat(model_dir: str, server_args: Any):
    """A real ``OpenAIServingChat`` over the stand-in tokenizer manager and the model's own chat template."""
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.srt.parser.template_manager import TemplateManager
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer
    from transformers import AutoConfig

    tokenizer = get_tokenizer(model_dir)
    manager = StandInTokenizerManager(tokenizer, AutoConfig.from_pretrained(model_dir), model_dir, server_args)
    templates = TemplateManager()
    templates.initialize_templates(manager, model_path=model_dir)
    return OpenAIServingChat(manager, templates)
