"""Inference: load a base (4-bit as trained) with an optional adapter, and generate answers."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from qllava.data.dataset import encoder_from_recipe
from qllava.data.images import load_image
from qllava.data.templates import end_of_turn
from qllava.errors import QllavaError
from qllava.model.load import compute_dtype, guard_cpu_repack, load_base, load_processor
from qllava.recipe import Recipe


def load_for_inference(
    base: str | Path, adapter: str | Path | None = None, *, bits: int = 4, device: torch.device | None = None
):
    """(model in eval mode, processor); the adapter's LoRA and projector are applied when given."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_base(base, bits=bits, device=device)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise QllavaError(
                f"`{adapter}` is not an adapter directory (no adapter_config.json); pass a "
                "checkpoint-STEP/ or final/ directory of a qllava run"
            )
        model = PeftModel.from_pretrained(model, str(adapter))
    guard_cpu_repack(model)
    model.eval()
    return model, load_processor(base)


@torch.no_grad()
def generate_answers(
    model,
    processor,
    recipe: Recipe,
    questions: list[tuple[str | None, str]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to (image path or None, question) pairs, batched with left padding."""
    encoder = encoder_from_recipe(recipe, processor, model.config)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    dtype = compute_dtype(device)
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [encoder.prompt_ids([("user", q)], has_image=image is not None) for image, q in chunk]
        longest = max(map(len, prompts))
        input_ids = torch.full((len(prompts), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            attention_mask[row, longest - len(ids) :] = 1
        images = [
            load_image(Path(recipe.data.image_folder) / image, recipe.data.image_aspect, processor.image_processor)
            for image, _ in chunk
            if image is not None
        ]
        pixel_values = torch.stack(images).to(device, dtype) if images else None
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn(recipe.data.template, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, longest:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
