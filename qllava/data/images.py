"""Image loading: RGB, square by padding (LLaVA-1.5) or stretching, then the processor's normalization."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def input_size(image_processor) -> tuple[int, int]:
    """(height, width) the vision tower expects, from the processor's crop or resize setting."""
    crop = getattr(image_processor, "crop_size", None)
    if crop and getattr(image_processor, "do_center_crop", True):
        return crop["height"], crop["width"]
    size = image_processor.size
    if "height" in size:
        return size["height"], size["width"]
    return size["shortest_edge"], size["shortest_edge"]


def square(image: Image.Image, aspect: str, image_processor) -> Image.Image:
    if aspect == "pad":
        # LLaVA-1.5 (expand2square): center the image on a square filled with the normalization
        # mean, truncated to integers as LLaVA does, so no content is cropped away.
        w, h = image.size
        side = max(w, h)
        fill = tuple(int(m * 255) for m in image_processor.image_mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    height, width = input_size(image_processor)
    return image.resize((width, height), Image.BICUBIC)


def pixel_values(image: Image.Image, aspect: str, image_processor) -> torch.Tensor:
    """An RGB image as the normalized (3, H, W) float tensor the vision tower takes."""
    return image_processor(images=square(image, aspect, image_processor), return_tensors="pt")["pixel_values"][0]


def load_image(path: str | Path, aspect: str, image_processor) -> torch.Tensor:
    """Decode one image file into a normalized (3, H, W) float tensor."""
    with Image.open(path) as img:
        image = img.convert("RGB")
    return pixel_values(image, aspect, image_processor)
