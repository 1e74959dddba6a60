"""The settings of the bases the shipped recipes name (config.json and, where image-token counts come from the
processor, the processor settings those counts need), so that `qllava plan` works before a base is downloaded.
SOURCES.md says where each value comes from. Only the planner (and tools/bench.py, for the LLaVA-NeXT 7B shape)
reads them: training needs the real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

BASES_DIR = Path(__file__).parent
BASES = {
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b-hf": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-mistral-7b-hf": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-v1.6-vicuna-7b-hf": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-onevision-qwen2-7b-ov-hf": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct",
    "gemma-3-4b-it": "google/gemma-3-4b-it",
    "InternVL3-8B-hf": "OpenGVLab/InternVL3-8B-hf",
    # Not on the Hub: what `qllava compose --vision clip-vit-large-patch14-336 --llm vicuna-7b-v1.5` writes, the
    # base of the two-stage recipes.
    "clip-vicuna-7b": None,
}
"""Folder name under qllava/bases -> the Hub id it describes (None: a composed base)."""


def shipped_base(base: str) -> tuple[Path, str] | None:
    """(folder, what it describes) of the shipped settings for `base`, when `base` is the Hub id of a shipped
    base, or a path ending in its folder name (the `checkpoints/NAME` the recipes and the download hint use) that
    does not exist yet; else None."""
    name = str(base).rstrip("/").rsplit("/", 1)[-1]
    if name not in BASES:
        return None
    described = BASES[name] or f"the composed base `{name}` (recipes/pretrain-projector-7b.yaml)"
    if str(base) == BASES[name] or not Path(base).exists():
        return BASES_DIR / name, described
    return None


def cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's folder of `repo_id` when its config.json is cached there (read, never fetched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None
