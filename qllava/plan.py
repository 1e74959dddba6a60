"""Predict the peak GPU memory of a training recipe before renting the GPU: `qllava plan`.

Everything is computed from the base's config.json (read with AutoConfig, the model is built on the
`meta` device to count parameters per group: no weights are read), where image tokens come from the processor
(AnyRes, Qwen2.5-VL, Gemma 3) its processor settings (the image-token count of the worst image), and the recipe.
Before a shipped recipe's base is downloaded, the copies of those files in `qllava.bases` stand in for it. The
estimate is a function of (shape, recipe, micro_batch, seq_len), so the largest fitting micro-batch is a search.

Where the bytes go, per component (B = micro-batch, S = seq_len image tokens included, H = hidden,
I = MLP intermediate, V = vocab, L = decoder layers, dt = activation dtype bytes: 2 on GPU, 4 on CPU):
- NF4 linear weights: 0.5 byte/param + double-quantized constants: one absmax per 64 weights stored
  as uint8 (1/64 byte/param) + one fp32 second-level absmax per 256 blocks (4/16384 byte/param):
  0.5159 byte/param. 8-bit (LLM.int8): 1 byte/param + one fp32 scale per output row. 16-bit: dt.
- frozen 16-bit parts (vision tower, embeddings, lm_head unless tied, norms, projector original that
  peft's modules_to_save keeps beside the fp32 trained copy).
- trained parameters (LoRA r*(in+out) per targeted linear, projector) in fp32, AdamW states (fp32:
  8 bytes/param; 8-bit: 2 bytes/param + fp32 absmax per 256 values; paged: same size, can spill to
  CPU under pressure, counted in full here); fp32 gradients, all alive at the optimizer step.
- with gradient checkpointing: every layer's input (B*S*H*dt) and ONE layer recomputed in backward:
  its whole saved set (sdpa/flash: no S*S matrix; RMSNorms' fp32 inputs; MLP intermediates; LoRA
  dropout copies) at the end of its recompute, with what its forward still holds there, or the
  gradients of its MLP's backward, whichever is larger; at layer 0 with the other layers' LoRA
  gradients when those outweigh their inputs. Without it every layer's saved set.
The peak is weights + states + the worst of these moments: the logits/loss, one layer's backward,
the optimizer step (all gradients), the vision tower forward.
- logits: 12 bytes per logit in the backward of log-softmax (its fp32 output and two fp32
  gradients; on CPU the full logits' forward, logits + shifted copy + log-softmax, is as large), on
  B*S*V logits (the largest row for big vocabularies); with `train.loss_chunk_size` = C > 0 on C*V.
- the vision tower runs without grad: its activations are transient (LLaVA's hidden states kept by
  output_hidden_states + one layer's working set per patch) and freed before the language model runs; the
  projector trains, so what autograd saves in it stays until backward; the batch's pixel_values stay all step.
The activation terms are what torch.profiler's memory timeline (tools/peak_memory.py) shows alive at
each peak: measured on CPU in fp32 (tests/test_plan.py); the bf16 counts from a LoRA layer and the
loss run in bf16 under autocast on CPU, by hand; no GPU run has checked them.
GPU-only constants: the CUDA context (~0.5 GiB: CUDA runtime, cuBLAS and bitsandbytes kernels; seen
by nvidia-smi, not by torch's allocator) and the caching allocator's fragmentation (reserved is
1.1-1.2x the peak of allocated tensors; 1.15x used). These are not validated by any test here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from qllava.errors import QllavaError
from qllava.recipe import Recipe

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
RESERVED_FACTOR = 1.15
TABLE_GPUS_GB = (12, 16, 24, 40, 80)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class Shape:
    """Parameter counts per group and the dimensions the activations depend on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int
    q_dim: int
    layer_norms: list[int]
    """Weight sizes of one decoder layer's RMSNorms (hidden-wide ones, head_dim-wide q/k norms)."""
    image_tokens: int
    """Tokens of the worst image the plan assumes (the most any admitted image gets)."""
    fewest_image_tokens: int
    """The fewest tokens any image gets: the loss's worst sample is the one with the most text, so the smallest
    image."""
    largest_image_tokens: int
    """The most tokens the processor makes of any image, admitted or not (more than `image_tokens` when a sample
    of data.max_length tokens cannot hold such an image)."""
    vision_tokens: int  # patches (+ CLS) of one tile that run through the vision tower
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_working: int
    """Elements per patch one vision layer holds at its worst moment (`_vision_working`)."""
    vision_keeps_hidden_states: bool
    """LLaVA families read a hidden layer of the vision tower (vision_feature_layer): every layer's output is kept."""
    pixels_per_tile: int
    """pixel_values elements of one tile (Qwen2.5-VL: of the worst image's patches)."""
    image_size: int  # the vision tower's input side; 0 where it runs at each image's own resolution
    tied: bool
    projector_keeps: int
    """Elements the trained projector keeps for its backward per tile (`_projector_keeps`)."""
    tile_tokens: int
    """Vision features per tile that the projector reads (its input: tiles x tile_tokens per image)."""
    worst_image: tuple[int, int] | None = None
    """Where the count depends on the image's size: the (height, width) of `image_tokens`."""
    params: dict[str, int] = field(default_factory=dict)
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # (LLM linear name, in, out)
    tiles: int = 1
    """Tiles of the largest image through the vision tower (AnyRes: the base image + the largest grid)."""

    @property
    def largest_linear(self) -> int:
        return max(i * o for _, i, o in self.linears)


def shape_from_config(config, processor=None, max_image_tokens: int | None = None) -> Shape:
    """Count parameters per group on a `meta`-device model built from the config (any supported family).

    Image tokens: a LLaVA config's own arithmetic when no `processor` is given, else the base's processor
    (`counting_processor`), asked for the worst image: the plan assumes the most tokens any image gets, and the
    vision tower and projector over that image. Where the count depends on the image's size, the candidates are
    AnyRes's `image_grid_pinpoints` sizes and every size up to the largest grid, 32 px apart (an image of a grid's
    own size fills it without padding; AnyRes-max pools the largest grids down, so the worst need not be the
    largest grid), or, for a vision tower without a fixed input size (Qwen2.5-VL's, at the image's own
    resolution within the processor's pixel bounds), every size up to 8192x8192, 128 px apart. `max_image_tokens`:
    the worst image among those that get at most that many tokens (a sample's image must fit data.max_length)."""
    import torch

    from qllava.data.dataset import num_image_tokens
    from qllava.model.families import family_of, image_tokens

    family = family_of(config)
    # LLaVA configs count their image tokens; the other families' processors lay them out themselves.
    config_counts = hasattr(config, "vision_feature_select_strategy") and not family.tiles
    if processor is None and not config_counts:
        raise QllavaError(f"planning a `{family.model_type}` base needs its processor settings")
    with torch.device("meta"):
        model = family.model_class()(config)
    params: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = _group(name, family)
        params[group] = params.get(group, 0) + p.numel()
    linears = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.startswith(family.llm_prefix) and isinstance(m, torch.nn.Linear)
    ]
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # A tower of one input size (CLIP, SigLIP, InternViT: (height, width) pairs there) or one at each image's own
    # resolution (Qwen2.5-VL's ViT, whose merger makes one token of spatial_merge_size^2 patches).
    fixed_side = _side(getattr(vision, "image_size", None))
    patch = _side(vision.patch_size)
    merge = getattr(vision, "spatial_merge_size", 1)
    # InternVL's pixel shuffle folds (1 / downsample_ratio)^2 patches into one wider feature before its projector.
    shuffle = round(1 / getattr(config, "downsample_ratio", 1.0)) ** 2
    tower = model.get_submodule(family.vision)
    has_cls = any(name.endswith(("class_embedding", "cls_token")) for name, _ in tower.named_parameters())
    tile_patches = (fixed_side // patch) ** 2 + int(has_cls) if fixed_side else 0
    # The widths of a decoder layer's norms (Llama, Qwen2: two of the hidden size; Gemma 3: four, and q/k norms of
    # head_dim).
    layer_norms = [
        m.weight.numel()
        for name, m in model.named_modules()
        if name.startswith(f"{family.llm_prefix}layers.0.") and type(m).__name__.endswith("RMSNorm")
    ]
    tiles, worst, largest, fewest = 1, None, None, None
    if processor is None:
        tokens = tile_tokens = num_image_tokens(config)
    else:
        grids = [tuple(pinpoint) for pinpoint in getattr(config, "image_grid_pinpoints", None) or []]
        if grids:
            # AnyRes-max pools an image's features when they exceed its budget by 10%, so the worst image of
            # OneVision lies between grids, just under that threshold (8765 tokens, at 1248x1024 or 1168x960,
            # against 8154 for the worst grid, 1920x768; a 16 px sweep finds no more). Counting is arithmetic:
            # 0.4 s for OneVision's 5184 sizes.
            top_h, top_w = max(h for h, _ in grids), max(w for _, w in grids)
            sizes = grids + [(h, w) for h in range(32, top_h + 1, 32) for w in range(32, top_w + 1, 32)]
            tiles = 1 + max((h // fixed_side) * (w // fixed_side) for h, w in grids)
        elif fixed_side and family.tiles:
            # InternVL: a grid of up to max_patches tiles by the image's aspect ratio, plus a thumbnail; every size
            # up to max_patches tiles long, 64 px apart, reaches every grid.
            top = fixed_side * processor.image_processor.max_patches
            sizes = [(h, w) for h in range(64, top + 1, 64) for w in range(64, top + 1, 64)]
            sizes.sort(key=lambda size: max(size) / min(size))  # the squarest of the worst is reported
        elif fixed_side:
            sizes = [(fixed_side, fixed_side)]
        else:
            # Nearest to square first: the worst image reported is the squarest of those that get the most tokens.
            sizes = [(h, w) for h in range(128, 8193, 128) for w in range(128, 8193, 128)]
            sizes.sort(key=lambda size: max(size) / min(size))
        counts = image_tokens(processor, sizes)
        largest, fewest = max(counts), min(counts)
        admitted = [c if max_image_tokens is None or c <= max_image_tokens else -1 for c in counts]
        tokens = max(admitted) if max(admitted) > 0 else min(counts)
        if len(set(counts)) > 1:
            worst = sizes[admitted.index(tokens) if tokens in admitted else counts.index(tokens)]
            if not grids and fixed_side:  # InternVL: the worst image's tiles, as its processor counts them
                tiles = processor._get_num_multimodal_tokens(image_sizes=[list(worst)]).num_image_patches[0]
        if fixed_side:
            select = getattr(config, "vision_feature_select_strategy", "full")
            tile_tokens = (tile_patches - int(select == "default")) // shuffle
        else:
            tile_patches = tile_tokens = tokens * merge**2  # the merger reads every patch of the image
    keeps_hidden_states = hasattr(config, "vision_feature_layer")
    projector = model.get_submodule(family.projector)
    projector_keeps = _projector_keeps(projector, tile_tokens, vision.hidden_size * shuffle)
    return Shape(
        vision_working=_vision_working(tower, vision, keeps_hidden_states, fixed_side),
        projector_keeps=projector_keeps,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        q_dim=heads * head_dim,
        layer_norms=layer_norms,
        image_tokens=tokens,
        fewest_image_tokens=fewest or tokens,
        largest_image_tokens=largest or tokens,
        vision_tokens=tile_patches,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_keeps_hidden_states=keeps_hidden_states,
        pixels_per_tile=tile_patches * 3 * getattr(vision, "temporal_patch_size", 1) * patch**2
        if not fixed_side
        else 3 * fixed_side**2,
        image_size=fixed_side or 0,
        tied="lm_head" not in params,
        params=params,
        linears=linears,
        tiles=tiles,
        tile_tokens=tile_tokens,
        worst_image=worst,
    )


def _side(size) -> int | None:
    """A square's side from a config's size: an int, or InternVL's (height, width) pair."""
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise QllavaError(f"the plan assumes square vision inputs and patches, not {size}")
        return size[0]
    return size


def _vision_working(tower, vision, keeps_hidden_states: bool, fixed_side: int | None) -> int:
    """Elements per patch that one layer of the frozen vision tower holds at its worst moment (no grad), measured
    on CPU with tools/peak_memory.py on tiny towers of several widths (h hidden, I MLP intermediate): CLIP's
    quick_gelu holds 3 intermediate-wide tensors at once (h + 3I, beside the layer outputs LLaVA keeps), SigLIP's
    gelu-tanh 2 (4h + 2I); Qwen2.5-VL's windowed ViT at the image's own resolution, a gated MLP (3.5h + 3I) or its
    attention, whose rotary q and k are upcast to fp32 (10h + 2 head_dim), whichever is larger."""
    import torch

    h, inter = vision.hidden_size, vision.intermediate_size
    widths = [m.out_features for m in tower.modules() if isinstance(m, torch.nn.Linear)]
    gated = widths.count(inter) >= 2 * vision.num_hidden_layers  # gate and up projections
    if gated:
        mlp = 7 * h // 2 + 3 * inter
    elif vision.hidden_act == "quick_gelu":
        mlp = (1 if keeps_hidden_states else 4) * h + 3 * inter
    else:
        mlp = (1 if keeps_hidden_states else 4) * h + 2 * inter
    if fixed_side:
        return mlp
    head_dim = h // vision.num_attention_heads
    return max(mlp, 10 * h + 2 * head_dim)


def _projector_keeps(projector, rows: int, width: int) -> int:
    """Elements the trained projector keeps for its backward per tile of `rows` vision features: what autograd saves
    in its forward on the `meta` device (the storages of saved tensors, its own parameters aside). LLaVA's MLP keeps
    its input, linear_1's output and GELU's; Qwen2.5-VL's merger also its RMSNorm's input, all at 4 patches per
    token; Gemma 3's only its input pooled to the image's tokens."""
    import torch

    own = {p.untyped_storage()._cdata for p in projector.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        projector(torch.empty(1, rows, width, device="meta"))
    return sum(saved.values())


def _group(name: str, family) -> str:
    part = family.part_of(name)
    if part == "vision":
        return "vision"
    if part in ("projector", "extra"):
        return "projector"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if re.search(r"_proj\.(weight|bias)$", name):
        return "llm_linear"
    return "llm_norms"


def plan_base(base: str) -> tuple[Path, str | None]:
    """The folder whose config.json (and processor settings) the plan reads for model.base, and a note when that
    is not model.base itself: a Hub id's copy in the Hugging Face cache, or, before the base is downloaded,
    qllava's shipped copy of its settings (`qllava.bases`)."""
    from qllava.bases import cached_snapshot, shipped_base
    from qllava.model.load import _looks_like_hub_id, check_base

    path = Path(base)
    if (path / "config.json").is_file():
        return path, None
    if not path.exists() and _looks_like_hub_id(str(base)):
        cached = cached_snapshot(str(base))
        if cached is not None:
            return cached, f"model.base `{base}`: read from the Hugging Face cache ({cached})"
    shipped = shipped_base(str(base))
    if shipped is not None:
        folder, described = shipped
        return folder, (
            f"model.base `{base}` is not there yet: planned from the config.json (and processor settings) of "
            f"{described} that qllava ships"
        )
    if not path.exists() and (path.parts[0] == "checkpoints" or not _looks_like_hub_id(str(base))):
        # A recipe's local folder of a base qllava has no settings for (a Hub id gets check_base's download hint).
        from qllava.bases import BASES

        raise QllavaError(
            f"model.base `{base}` is not there yet and qllava ships no settings for it, so `qllava plan` needs the "
            f"downloaded base (shipped settings: {', '.join(sorted(BASES))})"
        )
    return check_base(base), None  # its error says what the directory lacks


def counting_processor(folder: Path):
    """The base's processor class holding its image processor and its processor_config.json settings: all that
    `_get_num_multimodal_tokens` reads. Made without `__init__`, which wants the tokenizer (shipped settings have
    none) and, for OneVision and Qwen2.5-VL, a video processor that transformers cannot build without torchvision;
    counting reads neither. A base without processor_config.json (Qwen2.5-VL's) names its processor class in
    preprocessor_config.json."""
    import transformers
    from transformers import AutoImageProcessor

    settings_file = folder / "processor_config.json"
    image_file = folder / "preprocessor_config.json"
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text())
    elif image_file.is_file():
        settings = {"processor_class": json.loads(image_file.read_text()).get("processor_class")}
    else:
        raise QllavaError(
            f"{folder} has no processor_config.json nor preprocessor_config.json: the plan asks the processor for "
            "this base's image-token counts"
        )
    settings.pop("image_processor", None)  # transformers 5 nests the image processor's settings here
    settings.pop("chat_template", None)
    processor_class = getattr(transformers, settings.pop("processor_class"))
    processor = processor_class.__new__(processor_class)
    processor.image_processor = AutoImageProcessor.from_pretrained(folder)
    for key, value in settings.items():
        setattr(processor, key, value)
    return processor


def read_shape(base: str, max_image_tokens: int | None = None) -> Shape:
    """The plan's shape of `base` (a folder or a shipped base's Hub id); `max_image_tokens`: as `shape_from_config`."""
    from transformers import AutoConfig

    from qllava.model.families import family_of

    folder, _ = plan_base(base)
    config = AutoConfig.from_pretrained(folder)
    try:
        family = family_of(config)
    except QllavaError as exc:
        raise QllavaError(f"model.base `{base}`: {exc}") from None
    config_counts = hasattr(config, "vision_feature_select_strategy") and not family.tiles
    processor = None if config_counts else counting_processor(folder)
    return shape_from_config(config, processor, max_image_tokens)


def lora_modules(shape: Shape, target_modules) -> list[tuple[str, int, int]]:
    """The LLM linear layers LoRA wraps (all-linear: every one of them, lm_head is not in the LLM)."""
    if target_modules == "all-linear":
        return list(shape.linears)
    wanted = set(target_modules)
    chosen = [lin for lin in shape.linears if lin[0].rsplit(".", 1)[-1] in wanted]
    available = sorted({n.rsplit(".", 1)[-1] for n, _, _ in shape.linears})
    unknown = sorted(wanted - set(available))
    if unknown:
        raise QllavaError(
            f"lora.target_modules {unknown} are not linear layers of the language model; available: {available}"
        )
    return chosen


@dataclass
class Estimate:
    """Rows of (name, bytes, note) and how they add up to the peak of live tensors."""

    rows: list[tuple[str, int, str]]
    static: int
    persistent_activations: int
    backward_phases: dict[str, int]
    vision_transient: int

    @property
    def worst_moment(self) -> str:
        during_llm = self.persistent_activations + max(self.backward_phases.values())
        if self.vision_transient > during_llm:
            return "vision tower forward"
        return max(self.backward_phases, key=self.backward_phases.get)

    @property
    def peak(self) -> int:
        """Peak of allocated tensors: the static part plus the worst moment of the step."""
        during_llm = self.persistent_activations + max(self.backward_phases.values())
        return self.static + max(self.vision_transient, during_llm)

    @property
    def reserved(self) -> int:
        return int(self.peak * RESERVED_FACTOR)

    @property
    def device_total(self) -> int:
        """What nvidia-smi would show: reserved + CUDA context."""
        return self.reserved + CUDA_CONTEXT_BYTES


def _weight_bytes(n: int, bits: int, dt: int, out_rows: int) -> int:
    if bits == 4:
        return math.ceil(n * NF4_BYTES_PER_PARAM)
    if bits == 8:
        return n + 4 * out_rows
    return n * dt


# What each LoRA-wrapped linear of a Llama layer reads: q/k/v share the input norm's output, gate/up
# the post-attention norm's output, o_proj reads the attention output (kept by attention anyway),
# down_proj the gate*up product.
_LORA_INPUT = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}


def _lora_activation_bytes(
    shape: Shape, targets: list[tuple[str, int, int]], recipe: Recipe, dt: int, r: int
) -> tuple[int, int, int, set[str]]:
    """LoRA's activations in bytes per token of one layer: (kept for backward by every target but
    down_proj, kept by down_proj's LoRA branch, alive only while that branch runs, which of the
    layer's own tensors LoRA keeps: "mlp_in" (post-attention norm output), "down_in" (gate*up)).

    With dropout, per input element: its output (kept by lora_A for its weight gradient) and what
    dropout keeps for its backward: on CPU (fp32) torch's unfused dropout keeps a noise tensor in
    the input dtype (2 x 4 B, measured); on GPU the bf16 output (4-bit: bf16 in, no autocast copy;
    16-bit: peft casts the input to the fp32 LoRA dtype, autocast copies the dropout output to bf16,
    measured) + fused dropout's bool mask: 3 B. Without dropout lora_A keeps its input itself (CPU,
    and 4/8-bit GPU: inputs shared by several targets once, o_proj's is the attention output kept
    anyway), or on 16-bit GPU a bf16 autocast copy of peft's fp32 cast per target (2 B, measured).
    Each target's lora_A output (r x dt) is kept by lora_B. On 16-bit GPU the fp32 cast (4 B) and
    the fp32 dropout output (4 B) of down_proj's input are alive while its LoRA branch runs.
    """
    if not targets:
        return 0, 0, 0, set()
    L = max(shape.layers, 1)
    gpu16 = dt == 2 and recipe.model.bits == 16
    groups = [(name.rsplit(".", 2)[0], _LORA_INPUT.get(name.rsplit(".", 1)[-1], name), i) for name, i, _ in targets]
    down_in = max((i for _, g, i in groups if g == "down_in"), default=0)
    down_targeted = any(g == "down_in" for _, g, _ in groups)
    others = [(prefix, g, i) for prefix, g, i in groups if g != "down_in"]
    lora_out = dt * r * len(others) // L
    down_out = dt * r if down_targeted else 0
    if recipe.lora.dropout > 0 or gpu16:
        per_in = (2 * dt if dt == 4 else 3) if recipe.lora.dropout > 0 else 2
        extra = (8 if recipe.lora.dropout > 0 else 4) * down_in if gpu16 else 0
        common = per_in * sum(i for _, _, i in others) // L + lora_out
        return common, per_in * down_in + down_out, extra, set()
    inputs = {(prefix, g): (0 if g in ("attn_out", "mlp_in") else dt * i) for prefix, g, i in others}
    keeps = {g for _, g in inputs} & {"mlp_in"} | ({"down_in"} if down_targeted else set())
    return sum(inputs.values()) // L + lora_out, down_out, 0, keeps


def _optimizer(recipe: Recipe, device: str) -> str:
    name = recipe.optim.name
    if name == "auto":
        return "paged_adamw_8bit" if device == "cuda" else "adamw"
    return name


def estimate(shape: Shape, recipe: Recipe, micro_batch: int, seq_len: int, device: str = "cuda") -> Estimate:
    """Memory of one training step of `recipe` at this micro-batch and sequence length.

    device="cuda": 16-bit parts and activations in bf16 (qllava's GPU load); device="cpu": fp32, as
    qllava loads and trains on CPU (used to validate the arithmetic against measured CPU peaks).
    """
    dt = 2 if device == "cuda" else 4
    B, S, H, Ii, V, L = micro_batch, seq_len, shape.hidden, shape.intermediate, shape.vocab, shape.layers
    bits, p = recipe.model.bits, shape.params
    lora = recipe.lora.enabled
    r = recipe.lora.r
    targets = lora_modules(shape, recipe.lora.target_modules) if lora else []
    lora_params = sum(r * (i + o) for _, i, o in targets)
    proj = p.get("projector", 0)
    trained = lora_params + proj
    opt = _optimizer(recipe, device)
    state_bytes = 8 * trained if opt == "adamw" else 2 * trained + 8 * math.ceil(trained / 256)
    out_rows = sum(o for _, _, o in shape.linears)
    rows = [
        (
            "LLM linear layers",
            _weight_bytes(p.get("llm_linear", 0), bits, dt, out_rows),
            {
                4: "NF4 0.5 B/param + double-quant absmax 1/64 B + fp32 absmax per 256 blocks",
                8: "LLM.int8 1 B/param",
            }.get(bits, f"{8 * dt}-bit"),
        ),
        ("LLM norms", p.get("llm_norms", 0) * dt, f"{8 * dt}-bit"),
        ("vision tower (frozen)", p.get("vision", 0) * dt, f"{8 * dt}-bit"),
        ("embeddings", p.get("embeddings", 0) * dt, f"{8 * dt}-bit" + (", tied with lm_head" if shape.tied else "")),
        ("lm_head", p.get("lm_head", 0) * dt, f"{8 * dt}-bit" if not shape.tied else "tied: shares embeddings"),
        ("projector, frozen original", proj * dt if lora else 0, "peft modules_to_save keeps it" if lora else "none"),
        ("projector, trained copy", proj * 4, "fp32"),
        ("LoRA adapters", lora_params * 4, f"fp32, r={r} on {len(targets)} linear layers" if lora else "LoRA off"),
        ("optimizer states", state_bytes, {"adamw": "AdamW fp32: 8 B/param"}.get(opt, f"{opt}: 2 B/param")),
    ]
    static = sum(b for _, b, _ in rows)
    # Gradients exist from the backward of their layer until zero_grad: all of them at the optimizer
    # step, with the step's temporaries (torch AdamW's foreach: ~2 fp32 copies; 8-bit: per tensor).
    grads = trained * 4
    step_temp = 2 * trained * 4 if opt == "adamw" else 4 * max((i + o) * r for _, i, o in targets or [("", 0, 0)])

    # Activations, in bytes per token of one decoder layer unless said otherwise. Measured with
    # tools/peak_memory.py's timeline (what is alive at the peak, by the op that allocated it): on CPU
    # (fp32) in qllava's real step, and for the GPU dtypes a LoRA-wrapped Llama layer in bf16 under
    # autocast, run on CPU (same autograd graph; CPU's unfused dropout keeps a noise tensor where
    # CUDA's fused dropout keeps a bool mask, the one difference accounted for below).
    tokens = B * S
    # Positions whose next token carries loss, in the sample with the most text: its image the smallest (the other
    # terms assume the largest; taking the worst of each over-counts a little where the two differ).
    trained_rows = B * max(S - shape.fewest_image_tokens, 1)
    kv = shape.kv_dim
    Q = shape.q_dim  # heads x head_dim: the hidden size, except where head_dim is set apart (Gemma 3)
    gqa = 2 * (Q - kv) if kv < Q else 0  # repeat_kv copies before sdpa
    # Saved for backward by one layer: rotary q and k, v (+ GQA copies) and the attention output
    # kept by sdpa/flash (no S*S matrix); the RMSNorms' fp32 inputs: on CPU the post-attention
    # norm keeps the residual sum itself and the input norm the layer input (counted as the layer
    # input), on GPU each keeps an fp32 copy of its bf16 input (4 B, the bf16 tensors are freed); the
    # MLP's gate output, silu output and up output (their product is not kept: down_proj's base is
    # frozen). Norm outputs are not kept (frozen norm weights).
    attn = dt * (Q + 2 * kv + gqa + Q)
    norms = 4 * H + (4 * H if dt == 2 else 0)
    # Norms beyond those two (Gemma 3: after attention and after the MLP, q and k norms over every head) keep their
    # input in fp32 (CPU: the tensor; GPU: the fp32 copy).
    hidden_norms = sum(1 for width in shape.layer_norms if width == H)
    head_norms = any(width != H for width in shape.layer_norms)
    norms += 4 * (H * max(hidden_norms - 2, 0) + (Q + kv if head_norms else 0))
    mlp = dt * 3 * Ii
    lora_common, lora_down, lora_down_extra, lora_keeps = _lora_activation_bytes(shape, targets, recipe, dt, r)
    core = attn + norms + mlp + lora_common  # kept until the layer's backward, down_proj's branch aside
    mlp_in, product = dt * H, dt * Ii  # post-attention norm output, gate*up product (down_proj's input)
    saved_tok = core + lora_down + mlp_in * ("mlp_in" in lora_keeps) + product * ("down_in" in lora_keeps)
    # The final norm keeps the last layer's output in fp32 (CPU: that tensor; GPU: its fp32 copy).
    final_keep = 4 * H
    checkpoint = tokens * H * dt
    dequant = shape.largest_linear * dt if bits in (4, 8) else 0
    # Two moments of one layer's backward, measured on CPU (the larger one is the peak):
    # - the end of its recompute (non-reentrant checkpointing recomputes the whole layer at the first
    #   unpack of its backward), in down_proj's LoRA branch: the whole saved set, plus what the
    #   forward still holds (the post-attention norm output, the gate*up product, down_proj's base
    #   output) and the gradient of the layer output (H x dt) with its copy scaled by down_proj's
    #   LoRA (H x dt, when down_proj has LoRA) that trigger the recompute; earlier
    #   in down_proj its dequantized 4/8-bit weight is alive instead of its LoRA branch;
    # - the backward of gate*up (down_proj's branch freed): the gradients of the product, of silu's
    #   output and of up's output (3 x I x dt) and the gradient of the layer output.
    grads_in = dt * H * (2 if lora_down else 1)
    end_of_recompute = tokens * (core + mlp_in + product + dt * H + grads_in) + max(
        dequant, tokens * (lora_down + lora_down_extra)
    )
    mlp_backward = tokens * (core + mlp_in * ("mlp_in" in lora_keeps) + dt * H + dt * 3 * Ii)
    # Around them: on GPU the layer's LoRA weights in bf16 (autocast copies kept by autograd); the
    # final norm's input is freed by then. Layers are recomputed last to first: at layer j, layers
    # 0..j keep their input and layers j+1.. have their fp32 LoRA gradients, so layer 0 is the worst
    # when one layer's LoRA gradients outweigh one layer input (small micro-batches, large r).
    lora_layer_grads = 4 * lora_params // max(L, 1)
    recompute = (
        max(end_of_recompute, mlp_backward)
        + (2 * lora_params // max(L, 1) if dt == 2 else 0)
        + max(0, (L - 1) * (lora_layer_grads - checkpoint))
        - tokens * final_keep
    )
    chunk = recipe.train.loss_chunk_size
    # Bytes per logit at the loss's worst moment, 12 on CPU and GPU (the loss is fp32 either way,
    # measured on CPU in fp32 and in bf16): the backward of log-softmax, when its saved fp32 output,
    # the gradient nll_loss_backward wrote (fp32) and the one log_softmax_backward writes (fp32) are
    # alive together. (The forward moment is lower: logits in dt + fp32 upcast + log-softmax; with
    # full logits on CPU the logits, their shifted copy and log-softmax: also 12.)
    per_logit = 12
    if chunk > 0:
        # One chunk of logits, recomputed in backward; chunks cover the trained positions only, whose
        # final hidden states (dt) and their gradient (dt, SliceBackward's zeros) are alive then.
        vocab_rows = min(chunk, trained_rows)
        logits = vocab_rows * V * per_logit + 2 * trained_rows * H * dt
    else:
        vocab_rows = tokens
        logits = vocab_rows * V * per_logit
    if dt == 2:
        # The loss runs inside bf16 autocast, whose cache still holds a bf16 copy of every trained
        # weight cast in the forward (2 B per trained parameter; from torch's autocast weight cache,
        # not measured on a GPU). Below the recompute moment for the shipped 7B recipes.
        logits += 2 * trained
    # Projector (trained, so what autograd saves in it is kept until backward), for every tile.
    proj_act = B * shape.tiles * shape.projector_keeps * dt
    pixels = B * shape.tiles * shape.pixels_per_tile * dt  # the batch's pixel_values, alive for the whole step
    if recipe.model.gradient_checkpointing:
        persistent = L * checkpoint + proj_act + pixels + tokens * final_keep
        phases = {"logits + loss": logits, "one layer recomputed in backward": recompute}
        phases["optimizer step"] = grads + step_temp + pixels - persistent
        rows_act = [
            ("activations: layer inputs kept", L * checkpoint, f"{L} layers x B*S*H*{dt} B (checkpointing)"),
            ("activations: one layer recomputed", recompute, "its saved set + held tensors + gradients in"),
        ]
    else:
        layer_tok = saved_tok + H * dt  # + each layer's input
        persistent = L * tokens * layer_tok + proj_act + pixels + tokens * final_keep
        # The last layer's backward: down_proj's (gradient out, LoRA-scaled copy, the product's
        # gradient, dequantized weight) or gate*up's (as with checkpointing; its down branch freed).
        last_layer = max(
            tokens * dt * (2 * H + Ii) + dequant,
            tokens * (dt * H + dt * 3 * Ii - lora_down - product * ("down_in" in lora_keeps)),
        )
        phases = {"logits + loss": logits, "backward gradients": last_layer - tokens * final_keep}
        phases["optimizer step"] = grads + step_temp + pixels - persistent
        rows_act = [("activations: every layer saved", L * tokens * layer_tok, "no checkpointing")]
    images = B * shape.tiles  # AnyRes: every tile of every image runs through the tower in one batch
    # One layer's working set; LLaVA families also keep every layer's output (output_hidden_states, to read
    # vision_feature_layer).
    kept = shape.vision_layers + 1 if shape.vision_keeps_hidden_states else 0
    vt = images * shape.vision_tokens * dt * (shape.vision_hidden * kept + shape.vision_working) + pixels
    rows += rows_act + [
        ("gradients (LoRA + projector)", grads, "fp32, all alive at the optimizer step"),
        ("optimizer step temporaries", step_temp, "torch AdamW foreach" if opt == "adamw" else "one tensor"),
        ("activations: projector + final norm", proj_act + tokens * final_keep, "kept until backward"),
        ("pixel_values", pixels, "the batch's images, alive for the whole step"),
        (
            "logits + loss",
            logits,
            f"{vocab_rows} x {V} logits x {per_logit} B"
            + (" (train.loss_chunk_size)" if chunk > 0 else ", full B*S*V"),
        ),
        ("vision tower forward", vt, "no grad, transient: freed before the LLM runs"),
    ]
    return Estimate(rows, static, persistent, phases, vt)


MICRO_BATCH_LIMIT = 1 << 16
"""Where the search for the largest micro-batch stops: a recipe that fits even there is reported as `>=` it."""


def largest_micro_batch(shape: Shape, recipe: Recipe, seq_len: int, budget: int, device: str = "cuda") -> int:
    """Largest micro-batch whose device total (cuda) or peak (cpu) fits `budget` bytes, up to MICRO_BATCH_LIMIT;
    0 if none."""

    def fits(b: int) -> bool:
        e = estimate(shape, recipe, b, seq_len, device)
        return (e.device_total if device == "cuda" else e.peak) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MICRO_BATCH_LIMIT and fits(hi):
        lo, hi = hi, hi * 2
    if lo == MICRO_BATCH_LIMIT:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def render(shape: Shape, recipe: Recipe, seq_len: int, gpu_gb: float | None) -> str:
    """The printed plan: the table of rows at the recipe's micro-batch, totals, and the verdicts."""
    mb = recipe.train.micro_batch_size
    e = estimate(shape, recipe, mb, seq_len)
    width = max(len(n) for n, _, _ in e.rows)
    if shape.worst_image is None:
        images = f"image tokens {shape.image_tokens} included"
    else:
        h, w = shape.worst_image
        images = f"image tokens {shape.image_tokens} included: the most one image gets, at {h}x{w}"
        images += " (one image per sample assumed)"
        if shape.tiles > 1:
            images += f"; the vision tower runs up to {shape.tiles} tiles per image"
    lines = [
        f"plan for micro_batch={mb}, seq_len={seq_len} ({images}), "
        f"bits={recipe.model.bits}, gradient_checkpointing={recipe.model.gradient_checkpointing}",
    ]
    if shape.image_tokens > seq_len:
        lines.append(
            f"warning: the smallest image becomes {shape.image_tokens} tokens, more than seq_len={seq_len}: "
            "data.max_length must exceed the image tokens of every sample (`qllava data check` reports them); "
            "plan with a larger data.max_length or --seq-len"
        )
    elif shape.largest_image_tokens > shape.image_tokens:
        lines.append(
            f"note: the largest image becomes {shape.largest_image_tokens} tokens, more than seq_len={seq_len} "
            "holds: data.max_length must exceed the image tokens of every sample (`qllava data check` reports "
            f"them), so the plan assumes the largest image that fits, {shape.image_tokens} tokens"
        )
    lines.append(f"{'component':{width}}  {'bytes':>15}  {'GiB':>8}  note")
    lines += [f"{n:{width}}  {b:15,d}  {_gib(b)}  {note}" for n, b, note in e.rows]
    lines += [
        f"{'torch peak allocated':{width}}  {e.peak:15,d}  {_gib(e.peak)}  "
        f"weights + states + the worst moment: {e.worst_moment}",
        f"{'reserved (x' + str(RESERVED_FACTOR) + ')':{width}}  {e.reserved:15,d}  {_gib(e.reserved)}  "
        "caching allocator fragmentation, 1.1-1.2x",
        f"{'device total (+ CUDA context)':{width}}  {e.device_total:15,d}  {_gib(e.device_total)}  "
        f"+{CUDA_CONTEXT_BYTES / GiB:.1f} GiB context, as nvidia-smi shows",
    ]
    budgets = [gpu_gb] if gpu_gb else list(TABLE_GPUS_GB)
    for gb in budgets:
        budget = int(gb * 1e9)
        best = largest_micro_batch(shape, recipe, seq_len, budget)
        verdict = "fits" if e.device_total <= budget else "does NOT fit"
        if best == 0:
            one = estimate(shape, recipe, 1, seq_len)
            biggest = sorted(one.rows, key=lambda row: -row[1])[:3]
            names = ", ".join(f"{n} {b / GiB:.2f} GiB" for n, b, _ in biggest)
            lines.append(
                f"{gb:g} GB: does NOT fit even at micro-batch 1 ({one.device_total / GiB:.2f} GiB needed); "
                f"biggest rows: {names}"
            )
        else:
            largest = f">= {best} (the search stops there)" if best == MICRO_BATCH_LIMIT else str(best)
            lines.append(f"{gb:g} GB: micro_batch={mb} {verdict}; largest micro-batch that fits: {largest}")
    return "\n".join(lines)


def plan(recipe: Recipe, gpu_memory: float | None = None, seq_len: int | None = None) -> str:
    """`qllava plan`: the rendered plan for a recipe (gpu_memory in GB; default: the local GPU's)."""
    if gpu_memory is None:
        import torch

        if torch.cuda.is_available():
            gpu_memory = torch.cuda.get_device_properties(0).total_memory / 1e9
    if gpu_memory is not None and gpu_memory <= 0:
        raise QllavaError(f"--gpu-memory must be > 0 GB, got {gpu_memory}")
    if recipe.train.mixed_precision == "no":
        # The arithmetic is that of the 16-bit GPU layout (2-byte base and activations, autocast copies).
        raise QllavaError(
            "qllava plan models the 16-bit GPU layout; train.mixed_precision=no loads the base in fp32, "
            "which about doubles its 16-bit rows: plan with train.mixed_precision=auto"
        )
    from qllava.demo import resolve_demo_paths

    recipe = resolve_demo_paths(recipe)  # the demo's tiny bases are generated (and cached) on first use
    folder, note = plan_base(recipe.model.base)
    seq_len = seq_len or recipe.data.max_length
    shape = read_shape(str(folder), max_image_tokens=seq_len)
    text = render(shape, recipe, seq_len, gpu_memory)
    return f"{note}\n{text}" if note else text
