"""Inference: load a model (base as trained, with or without adapter, or a merged export) and generate.

Prompts are rendered with the template the model was trained with: the adapter checkpoint's recipe,
else the recipe a merge wrote beside the export, else the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig

from qllava.data.dataset import Encoder, encoder_from_recipe
from qllava.data.images import images_inputs, open_rgb, sizes_of
from qllava.data.templates import end_of_turn
from qllava.errors import QllavaError
from qllava.model.extras import load_extras, split_extras
from qllava.model.families import config_of_model, family_of, family_of_model, forward_image_inputs, image_batch
from qllava.model.fingerprint import MERGED_RECIPE, check_trained_on, is_merged_export
from qllava.model.load import check_base, load_base, load_processor
from qllava.model.precision import autocast_for, default_device, precision_for
from qllava.model.projector import PROJECTOR_FILE, load_projector
from qllava.recipe import CHOICES, Recipe, load_recipe, with_values
from qllava.train.checkpoint import run_dir_hint


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def check_adapter_dir(adapter: str | Path) -> None:
    """A stage-1 checkpoint (projector.safetensors) or an adapter directory, else a message saying what to pass."""
    path = Path(adapter)
    if (path / PROJECTOR_FILE).is_file():
        return
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise QllavaError(
            run_dir_hint(path)
            or f"`{adapter}` is not an adapter directory (adapter_config.json and adapter_model.safetensors); "
            "pass a checkpoint-STEP/ or final/ directory of a qllava run"
        )


def attach_adapter(model, adapter: str | Path):
    """The adapter's LoRA layers and trained projector on `model`, with a clear error when they do not fit.

    A stage-1 checkpoint (projector only) loads its projector into `model` instead.
    """
    path = Path(adapter)
    check_adapter_dir(path)
    if (path / PROJECTOR_FILE).is_file():
        load_projector(model, path)
        return model
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()
        raise QllavaError(
            f"adapter `{adapter}` does not fit the model `{model.name_or_path}` "
            f"({detail[-1].strip() if detail else type(exc).__name__}); was it trained on another base?"
        ) from None
    # peft skips the family's bare trained parameters (NeXT's image_newline): qllava saved them beside it.
    load_extras(peft_model, split_extras(peft_model, load_file(path / "adapter_model.safetensors")), path)
    return peft_model


def _trained_recipe(adapter: str | Path | None) -> Recipe | None:
    """The recipe an adapter checkpoint was trained with (None without an adapter or its recipe)."""
    recipe = Path(adapter) / "recipe.yaml" if adapter is not None else None
    return load_recipe(recipe) if recipe is not None and recipe.is_file() else None


def load_for_inference(
    model_path: str | Path,
    adapter: str | Path | None = None,
    *,
    bits: int | None = None,
    device: torch.device | None = None,
    force: bool = False,
):
    """(model in eval mode, processor).

    An adapter trained on another base than `model_path` (or `model_path` a merged export) is refused
    before anything loads; `force` loads it anyway, with a warning.

    `bits` defaults to the `model.bits` the adapter was trained with (its checkpoint's recipe), as an
    adapter only reproduces its training on the same base (and dtype: `train.mixed_precision`); without
    an adapter to 16 for a merged export (re-quantizing it would undo the exact merge); else to 4.
    """
    device = device or default_device()
    if adapter is not None:
        check_adapter_dir(adapter)
        check_trained_on(
            adapter,
            check_base(model_path),
            force=force,
            remedy="give the base it was trained on as MODEL, or --force to apply it anyway",
        )
    trained = _trained_recipe(adapter)
    if bits is None:
        if trained is not None:
            bits = trained.model.bits
        else:
            bits = 16 if is_merged_export(model_path) and adapter is None else 4
    if bits not in CHOICES["model.bits"]:
        raise QllavaError(f"bits {bits}: choose 4, 8 or 16")
    dtype = precision_for(device, trained.train.mixed_precision if trained else "auto").dtype
    model = load_base(model_path, bits=bits, device=device, dtype=dtype)
    if adapter is not None:  # peft wraps the guarded Linear4bit layers of load_base, adds none
        model = attach_adapter(model, adapter)
    model.eval()
    processor = load_processor(adapter if adapter is not None else model_path)
    return model, processor


def inference_recipe(
    model_path: str | Path, adapter: str | Path | None, processor, template: str | None = None
) -> Recipe:
    """A recipe whose data section says how to render prompts for this model."""
    for source in ([Path(adapter) / "recipe.yaml"] if adapter else []) + [Path(model_path) / MERGED_RECIPE]:
        if source.is_file():
            recipe = load_recipe(source)
            break
    else:  # a base never trained by qllava: only its prompts are needed, so no data files either
        family = family_of(AutoConfig.from_pretrained(model_path))
        default = "tokenizer" if getattr(processor.tokenizer, "chat_template", None) else family.default_template
        recipe = with_values(Recipe(), {"model.base": str(model_path), "data.template": default})
    if template:
        if template not in CHOICES["data.template"]:
            raise QllavaError(f"--template {template}: choose one of {', '.join(CHOICES['data.template'])}")
        recipe = with_values(recipe, {"data.template": template})
    return recipe


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(
    model,
    processor,
    encoder: Encoder,
    recipe: Recipe,
    batch: list[tuple[list[Path], list[tuple[str, str]]]],
    sampling: Sampling,
    streamer=None,
) -> list[str]:
    """Answers for (image paths, none or several; turns ending with the user's) pairs.

    Left padding with position ids from the attention mask gives each row the answer it gets alone.
    """
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    family = family_of_model(model)
    vision_dtype = next(p for n, p in model.named_parameters() if family.part_of(n) == "vision").dtype
    images = [
        images_inputs(
            [open_rgb(path) for path in paths],
            recipe.data.image_aspect,
            processor.image_processor,
            tiles=family.tiles,
            sample_inputs=family.sample_inputs,
        )
        if paths
        else {"pixel_values": None}
        for paths, _ in batch
    ]
    prompts = [
        encoder.prompt_ids(turns, images=len(paths), image_sizes=sizes_of(inputs))
        for (paths, turns), inputs in zip(batch, images)
    ]
    input_ids, attention_mask = _left_pad(prompts, tokenizer.pad_token_id)
    vision = forward_image_inputs(
        image_batch(images) | {"input_ids": input_ids}, device, vision_dtype, config_of_model(model)
    )
    if vision["pixel_values"] is None:
        vision = {}  # transformers 5 runs the vision tower for any `pixel_values` key in generate's kwargs, None too
    with autocast_for(model):
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            **vision,
            eos_token_id=end_of_turn(recipe.data.template, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling.generate_kwargs(),
        )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, input_ids.shape[1] :]]


def image_list(image: str | list[str] | None) -> list[str]:
    """A question's `image` (a path, a list of paths, or none) as a list."""
    return [] if not image else [image] if isinstance(image, str) else list(image)


def generate_answers(
    model,
    processor,
    recipe: Recipe,
    questions: list[tuple[str | list[str] | None, str]],
    *,
    image_folder: str | Path | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Answers to single-turn (image path, a list of them or None; question) pairs; relative images are under
    `image_folder`."""
    encoder = encoder_from_recipe(recipe, processor, model.config)
    folder = Path(image_folder or recipe.data.image_folder or ".")
    sampling = sampling or Sampling(max_new_tokens=16)
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = [
            ([folder / p for p in image_list(image)], [("user", q)])
            for image, q in questions[start : start + batch_size]
        ]
        answers += generate_batch(model, processor, encoder, recipe, batch, sampling)
    return answers
