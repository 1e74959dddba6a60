"""Keep bitsandbytes' "no `kernels` package" notice out of every command's output.

bitsandbytes (0.50) tries, on import on CPUs with AVX512-BF16, to fetch a faster CPU 4-bit matmul from
the model hub through the optional `kernels` package and, without it, logs a warning that reads as an
error: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'".
qllava does not want `kernels`: it downloads code from the hub at run time, which offline machines
cannot, and bitsandbytes' built-in CPU path is the right one (qllava turns off the AVX512-BF16 repack
of Linear4bit for correctness anyway). Only that record, with that cause, is dropped: the same notice
with another cause (kernels installed but the fetch failed) and every other bitsandbytes warning pass.
"""

from __future__ import annotations

import logging

# The module that logs it: bitsandbytes/backends/cpu/ops.py, `logger = logging.getLogger(__name__)`.
_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _MissingKernelsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        missing_kernels = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
        return not (str(record.msg).startswith(_NOTICE) and missing_kernels)


def silence_missing_kernels_notice() -> None:
    """Install the filter on bitsandbytes' CPU-ops logger; must run before bitsandbytes is imported,
    since the notice is logged at import time. Idempotent."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _MissingKernelsFilter) for f in logger.filters):
        logger.addFilter(_MissingKernelsFilter())
