"""Keep one transformers deprecation warning, raised on peft's behalf, out of every command's output.

peft's `PeftModel` constructor reads `model.is_gradient_checkpointing`, which transformers 5 deprecated:
every `get_peft_model` and `PeftModel.from_pretrained` (train, merge, chat, the demo) printed
"FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6". The read is inside
peft, so qllava cannot avoid it, and a user can do nothing about the message. Only that message, from
transformers' modeling_utils, is ignored; qllava itself calls `activation_checkpointing_enable`.
"""

from __future__ import annotations

import warnings


def silence_is_gradient_checkpointing_notice() -> None:
    """Ignore exactly that FutureWarning (process-wide, as Python's warning filters are). Idempotent."""
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module="transformers.modeling_utils",
    )
