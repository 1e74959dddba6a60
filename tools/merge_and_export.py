"""Merge a qllava checkpoint into its base and export a plain transformers LLaVA: `qllava merge` as a script.

    python tools/merge_and_export.py RUN/final --out merged/ [--dtype bf16] [--method dequantized] [--no-verify]
        [--base DIR] [--force]

The export loads with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
alone; `merge_report.json` beside it holds the parity figures measured against base + adapter.
"""

import typer

from qllava.cli import merge

if __name__ == "__main__":
    typer.run(merge)
