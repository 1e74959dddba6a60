"""Image loading: RGB, square by padding (LLaVA-1.5) or stretching, then the processor's normalization."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.models.llava import LlavaImageProcessorPil

from qllava.model.families import IMAGE_INPUTS

# What a padding image processor copies from the base's, so that resizing and normalization stay the same.
_COPIED_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def input_size(image_processor) -> tuple[int, int]:
    """(height, width) the vision tower expects, from the processor's crop or resize setting."""
    crop = getattr(image_processor, "crop_size", None)
    if crop and getattr(image_processor, "do_center_crop", True):
        return crop["height"], crop["width"]
    size = image_processor.size
    if "height" in size:
        return size["height"], size["width"]
    return size["shortest_edge"], size["shortest_edge"]


TYPICAL_PHOTO = (480, 640)
"""(height, width) of a typical photo, COCO's most common size."""


def typical_size(image_processor) -> tuple[int, int]:
    """(height, width) of a typical image as the processor takes it, for counts that must stand for any image
    (length grouping): its input size, or a typical photo where the processor resizes each image within a pixel
    budget instead. Those processors (Qwen2-VL's and its descendants', the ones with a patch `merge_size`) keep the
    budget's bounds in `size` as `shortest_edge` / `longest_edge`, which are pixel counts there, not sides: read as a
    side, Qwen2.5-VL's min_pixels 3136 would be a 3136x3136 image of 12544 tokens."""
    if hasattr(image_processor, "merge_size"):
        return TYPICAL_PHOTO
    return input_size(image_processor)


def padded_square(image: Image.Image, image_processor) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centered on a square filled with the normalization mean, truncated to
    integers as LLaVA does (no content is cropped away), resized to the vision tower's input size."""
    w, h = image.size
    side = max(w, h)
    fill = tuple(int(m * 255) for m in image_processor.image_mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    height, width = input_size(image_processor)
    return canvas.resize((width, height), Image.BICUBIC)


def stretching(image_processor):
    """The image processor with which `resize` makes an image's pixels: the base's own where it already stretches
    every image to the input square (SigLIP's, Gemma 3's), else (CLIP's resizes the short side and center-crops) the
    same settings resizing straight to the input square without a crop. Training and every saved processor use it,
    so an export given to plain transformers sees the pixels training saw, with the base's resample filter."""
    crops_or_pads = getattr(image_processor, "do_center_crop", False) or getattr(image_processor, "do_pad", False)
    if not crops_or_pads and "height" in image_processor.size:
        return image_processor
    height, width = input_size(image_processor)
    settings = {**image_processor.to_dict(), "size": {"height": height, "width": width}, "do_center_crop": False}
    if "do_pad" in settings:  # a base saved by a `pad` run (a LLaVA padding image processor) stretches here too
        settings["do_pad"] = False
    return type(image_processor)(**settings)


def pixel_values(image: Image.Image, aspect: str, image_processor) -> torch.Tensor:
    """An RGB image as the normalized (3, H, W) float tensor the vision tower takes: padded to a square (`pad`,
    LLaVA-1.5) or stretched to it (`resize`)."""
    if aspect == "pad":
        return image_processor(images=padded_square(image, image_processor), return_tensors="pt")["pixel_values"][0]
    return stretching(image_processor)(images=image, return_tensors="pt")["pixel_values"][0]


def image_missing(path: str | Path) -> str | None:
    """The image check `train` affords at start: the file is there (decoding every image takes too long)."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not an image file"
    return None if path.is_file() else "not found"


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as an image ("not found", "is a directory", ...), or None when it decodes.

    The whole image is decoded: a truncated file opens fine and fails only when its pixels are read.
    """
    path = Path(path)
    if missing := image_missing(path):
        return missing
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def load_image(path: str | Path, aspect: str, image_processor) -> torch.Tensor:
    """Decode one image file into a normalized (3, H, W) float tensor."""
    with Image.open(path) as img:
        image = img.convert("RGB")
    return pixel_values(image, aspect, image_processor)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (nothing is decoded): what an AnyRes image's token
    count depends on."""
    with Image.open(path) as img:
        width, height = img.size
    return height, width


def tiled_inputs(image: Image.Image, image_processor) -> dict:
    """An image of a `Family.tiles` family as the processor makes it from the unchanged image: `pixel_values`
    (AnyRes: (tiles, 3, H, W); Qwen2.5-VL: (patches, dim)), the count depending on its size, the family's image
    inputs of this image (`image_sizes`, `image_grid_thw`) and `size`, its (height, width)."""
    out = image_processor(images=image, return_tensors="pt")
    pixels = out["pixel_values"]
    # AnyRes processors return one tile stack per image (images, tiles, 3, H, W); Qwen2.5-VL's the images' patches
    # back to back (patches, dim) and InternVL's their tiles back to back (tiles, 3, H, W), here those of the one image.
    inputs = {"pixel_values": pixels if pixels.dim() in (2, 4) else pixels[0]}
    inputs |= {key: out[key][0] for key in IMAGE_INPUTS if key in out}
    return inputs | {"size": (image.height, image.width)}


def inputs_of_image(
    image: Image.Image, aspect: str, image_processor, *, tiles: bool = False
) -> dict[str, torch.Tensor]:
    """An RGB image as the model's inputs: `pixel_values` (3, H, W) squared as `aspect` says (LLaVA-1.5) or,
    with `tiles` (AnyRes families, which choose their own grid, so `aspect` does not apply), `tiled_inputs`."""
    if tiles:
        return tiled_inputs(image, image_processor)
    return {"pixel_values": pixel_values(image, aspect, image_processor)}


def images_inputs(
    images: list[Image.Image], aspect: str, image_processor, *, tiles: bool = False, sample_inputs: tuple[str, ...] = ()
) -> dict:
    """A sample's RGB images as the model's inputs. One image as `inputs_of_image` makes it; several each so,
    stacked in order: pixel_values (3-D images stacked; tile stacks and patch blocks concatenated), the image
    inputs (`image_sizes`, `image_grid_thw`: one row per image) and `size`, the list of their (height, width).
    `sample_inputs` (`Family.sample_inputs`, OneVision's `batch_num_images`): the processor
    processes an image by how many the sample has, so the sample's images go through it together, as its
    `__call__` passes a sample's images."""
    if sample_inputs:
        out = image_processor(images=[images], return_tensors="pt")
        # (images, tiles, 3, H, W), padded to the most tiles; an image among several is one tile: nothing is padded.
        sizes = [(image.height, image.width) for image in images]
        inputs = {"pixel_values": out["pixel_values"].flatten(0, 1), "image_sizes": out["image_sizes"], "size": sizes}
        if len(images) == 1:  # as `tiled_inputs` gives one image
            inputs = {"pixel_values": out["pixel_values"][0], "image_sizes": out["image_sizes"][0], "size": sizes[0]}
        inputs |= {key: torch.as_tensor(out[key]) for key in sample_inputs}
    elif len(images) == 1:
        inputs = inputs_of_image(images[0], aspect, image_processor, tiles=tiles)
    else:
        each = [inputs_of_image(image, aspect, image_processor, tiles=tiles) for image in images]
        # Tile stacks and patch blocks are concatenated (the forward splits them by the image inputs); untiled
        # images are stacked.
        inputs = {"pixel_values": (torch.cat if tiles else torch.stack)([e["pixel_values"] for e in each])}
        inputs |= {key: torch.stack([e[key] for e in each]) for key in each[0] if key not in ("pixel_values", "size")}
        if tiles:
            inputs["size"] = [e["size"] for e in each]
    return inputs


def open_rgb(path: str | Path) -> Image.Image:
    """An image file decoded to RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def sizes_of(inputs: dict) -> list[tuple[int, int]] | None:
    """The original (height, width) of each tiled image the inputs carry (what its token count depends on: `size`,
    one image's or a list of several), else None."""
    size = inputs.get("size")
    if size is None:
        return None
    return [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]


def processor_to_save(processor, aspect: str, *, tiles: bool = False):
    """The processor to save beside trained weights (checkpoints, merged exports): one that, loaded with plain
    `AutoProcessor.from_pretrained`, computes the pixels training computed.

    With `pad`, the base's image processor (CLIP's center-crops) becomes a `LlavaImageProcessor` with `do_pad=True`
    and the base's resize, crop and normalization settings: it pastes the image centered on a square of the mean
    color truncated to integers, as `padded_square` does, and gives the same pixels. With `resize`, the image
    processor is `stretching`'s. Families with `tiles` (whose processor chose each image's geometry in training,
    whatever `aspect` says) keep the processor. The given processor is left unchanged.
    """
    image_processor = processor.image_processor
    if tiles:
        return processor
    if aspect == "resize":
        stretched = stretching(image_processor)
        if stretched is image_processor:
            return processor
        processor = copy.copy(processor)
        processor.image_processor = stretched
        return processor
    if getattr(image_processor, "do_pad", False):
        return processor
    settings = {
        key: getattr(image_processor, key)
        for key in _COPIED_SETTINGS
        if getattr(image_processor, key, None) is not None
    }
    # SigLIP's resizes to the square input size and has no crop; LlavaImageProcessor would crop by default.
    settings["do_center_crop"] = bool(settings.get("do_center_crop"))
    if isinstance(image_processor, PilBackend):
        padding_class = LlavaImageProcessorPil
    else:  # the torchvision backend; importing it without torchvision warns, so only here
        from transformers.models.llava import LlavaImageProcessor as padding_class
    processor = copy.copy(processor)
    processor.image_processor = padding_class(do_pad=True, **settings)
    return processor
