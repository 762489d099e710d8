"""vLLM integration (work in progress): registered through the ``vllm.general_plugins`` entry point.

``register()`` is what vLLM calls in every process it starts; it does nothing yet.
"""


def register() -> None:
    """Entry point called by vLLM's plugin loader."""
