"""qllava: QLoRA fine-tuning of LLaVA-style vision-language models on one GPU."""

# First, before any qllava module can import bitsandbytes (which logs the notice at import time).
from qllava._bnb_notice import silence_missing_kernels_notice

silence_missing_kernels_notice()

from qllava._peft_notice import silence_is_gradient_checkpointing_notice  # noqa: E402

silence_is_gradient_checkpointing_notice()

from qllava.errors import QllavaError  # noqa: E402
from qllava.recipe import Recipe, load_recipe  # noqa: E402

__version__ = "0.1.0"
__all__ = ["QllavaError", "Recipe", "load_recipe", "__version__"]
