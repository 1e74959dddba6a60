"""Build a tiny random LLaVA (CLIP-style vision, Llama-style LLM, own tokenizer) as an HF directory.

    python tools/make_tiny_model.py OUT_DIR [--corpus FILE]

Useful to try recipes and the data tools without a real checkpoint: the directory loads with
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`.
"""

from pathlib import Path

import typer

from qllava.model.tiny import build_tiny_llava


def main(
    out: Path, corpus: Path = typer.Option(None, help="Text file whose lines train the tokenizer"), seed: int = 0
) -> None:
    lines = corpus.read_text().splitlines() if corpus else ["What is in the image?", "A cat on a mat."]
    typer.echo(build_tiny_llava(out, lines, seed=seed))


if __name__ == "__main__":
    typer.run(main)
