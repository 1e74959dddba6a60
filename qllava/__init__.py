"""qllava: QLoRA fine-tuning of LLaVA-style vision-language models on one GPU."""

from qllava.errors import QllavaError
from qllava.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["QllavaError", "Recipe", "load_recipe", "__version__"]
