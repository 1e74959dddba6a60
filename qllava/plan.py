"""Predict the peak GPU memory of a training recipe before renting the GPU: `qllava plan`.

Everything is computed from the base's config.json (read with AutoConfig, the model is built on the
`meta` device to count parameters per group: no weights are read) and the recipe. The estimate is a
function of (shape, recipe, micro_batch, seq_len), so the largest fitting micro-batch is a search.

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
- with gradient checkpointing: every layer's input (B*S*H*dt) and ONE layer recomputed in backward
  (sdpa/flash: no S*S matrix; MLP intermediates; LoRA dropout copies; its backward peak is 0.85 of
  its saved set, measured), or without it every layer's saved set.
The peak is weights + states + the worst of these moments: the logits/loss, one layer's backward,
the optimizer step (all gradients), the vision tower forward.
- logits: B*S*V in dt, its shifted fp32 copy, log-softmax and their gradients (the largest row for
  big vocabularies); with `train.loss_chunk_size` = C > 0 only C*V of them live at once.
- the vision tower runs without grad: its activations are transient (all hidden states kept by
  output_hidden_states + one layer's working set) and freed before the language model runs.
GPU-only constants: the CUDA context (~0.5 GiB: CUDA runtime, cuBLAS and bitsandbytes kernels; seen
by nvidia-smi, not by torch's allocator) and the caching allocator's fragmentation (reserved is
1.1-1.2x the peak of allocated tensors; 1.15x used). These are not validated by any test here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

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
    image_tokens: int
    vision_tokens: int  # patches (+ CLS) that run through the vision tower
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    tied: bool
    params: dict[str, int] = field(default_factory=dict)
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # (LLM linear name, in, out)

    @property
    def largest_linear(self) -> int:
        return max(i * o for _, i, o in self.linears)


def shape_from_config(config) -> Shape:
    """Count parameters per group on a `meta`-device model built from a LlavaConfig."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from qllava.data.dataset import num_image_tokens

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    params: dict[str, int] = {}
    for name, p in model.named_parameters():
        params[_group(name)] = params.get(_group(name), 0) + p.numel()
    linears = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.startswith("model.language_model.") and isinstance(m, torch.nn.Linear)
    ]
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    patches = (vision.image_size // vision.patch_size) ** 2
    return Shape(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        image_tokens=num_image_tokens(config),
        vision_tokens=patches + int(vision.model_type.startswith("clip")),
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        image_size=vision.image_size,
        tied="lm_head" not in params,
        params=params,
        linears=linears,
    )


def _group(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if re.search(r"_proj\.(weight|bias)$", name):
        return "llm_linear"
    return "llm_norms"


def read_shape(base: str) -> Shape:
    from transformers import AutoConfig

    from qllava.model.load import check_base

    return shape_from_config(AutoConfig.from_pretrained(check_base(base)))


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

    # Activations. Per token of one decoder layer (bytes), as autograd saves them: two RMSNorms
    # (fp32 input copy on GPU or the fp32 input itself on CPU, normalized, output: 8 H), rotary q and
    # k and v kept by attention (rotary muls save only cos/sin), attention output (sdpa/flash: O(S)
    # extra, no S*S), the residual, gate/up/act/product (4 I) and per LoRA target its dropout output
    # (GPU: the bf16 autocast copy) + bool mask, and lora_A's output (r).
    kv = shape.kv_dim
    gqa = 2 * (H - kv) if kv < H else 0  # repeat_kv copies before sdpa
    norm = 8 * H
    attn = dt * (H + 2 * kv + gqa + 2 * H)
    mlp = dt * 4 * Ii
    drop = recipe.lora.dropout > 0
    per_in = (dt + 1 if drop else (2 if dt == 2 else 0)) if lora else 0
    lora_act = sum(per_in * i + dt * r for _, i, _ in targets) // max(L, 1)
    layer_tok = 2 * norm + attn + mlp + lora_act
    tokens = B * S
    checkpoint = tokens * H * dt
    # Backward of one recomputed layer: the saved set is freed while the gradients appear, so its peak
    # is ~0.85 of the saved set (measured on CPU) + the hidden-state gradients flowing in and out + the
    # dequantized weight of the largest 4/8-bit linear + that layer's LoRA gradients.
    dequant = shape.largest_linear * dt if bits in (4, 8) else 0
    recompute = tokens * (layer_tok * 85 // 100 + dt * 2 * H) + dequant + 4 * lora_params // max(L, 1)
    chunk = getattr(recipe.train, "loss_chunk_size", 0)
    if chunk > 0:
        # One chunk of logits (dt) with its fp32 upcast (GPU) and log-softmax, recomputed in backward
        # with its gradient; chunks cover the trained positions only (at most S - image tokens).
        vocab_rows = min(chunk, B * max(S - shape.image_tokens, 1))
        per_logit = 8 if dt == 4 else 2 + 4 + 4 + 4
        logits = vocab_rows * V * per_logit + 2 * tokens * H * dt
    else:
        # Full logits: logits (dt), the shifted copy (dt), its fp32 upcast (GPU) and log-softmax (4)
        # live together at the end of the forward; the backward needs log-softmax + 2 fp32 gradients.
        vocab_rows = tokens
        per_logit = max(2 * dt + (4 if dt == 2 else 0) + 4, 12 + (dt if dt == 2 else 0))
        logits = vocab_rows * V * per_logit + tokens * H * dt
    proj_act = B * shape.image_tokens * (shape.vision_hidden + 3 * H) * dt
    if recipe.model.gradient_checkpointing:
        persistent = L * checkpoint + proj_act + tokens * (norm + H * dt)
        phases = {"logits + loss": logits, "one layer recomputed in backward": recompute}
        phases["optimizer step"] = grads + step_temp - persistent
        rows_act = [
            ("activations: layer inputs kept", L * checkpoint, f"{L} layers x B*S*H*{dt} B (checkpointing)"),
            ("activations: one layer recomputed", recompute, "backward working set, incl. dequantized weight"),
        ]
    else:
        layer_tok += H * dt  # each layer's input, saved by its first norm
        persistent = L * tokens * layer_tok + proj_act + tokens * (norm + H * dt)
        phases = {"logits + loss": logits, "backward gradients": tokens * dt * 2 * H + dequant}
        phases["optimizer step"] = grads + step_temp - persistent
        rows_act = [("activations: every layer saved", L * tokens * layer_tok, "no checkpointing")]
    vt = B * (shape.vision_tokens * shape.vision_hidden * dt * (shape.vision_layers + 1 + 4))
    vt += B * shape.vision_tokens * shape.vision_intermediate * dt + B * 3 * shape.image_size**2 * dt
    rows += rows_act + [
        ("gradients (LoRA + projector)", grads, "fp32, all alive at the optimizer step"),
        ("optimizer step temporaries", step_temp, "torch AdamW foreach" if opt == "adamw" else "one tensor"),
        ("activations: projector + final norm", proj_act + tokens * (norm + H * dt), "kept until backward"),
        (
            "logits + loss",
            logits,
            f"{vocab_rows} x {V} logits x {per_logit} B"
            + (" (train.loss_chunk_size)" if chunk > 0 else ", full B*S*V"),
        ),
        ("vision tower forward", vt, "no grad, transient: freed before the LLM runs"),
    ]
    return Estimate(rows, static, persistent, phases, vt)


def largest_micro_batch(shape: Shape, recipe: Recipe, seq_len: int, budget: int, device: str = "cuda") -> int:
    """Largest micro-batch whose device total (cuda) or peak (cpu) fits `budget` bytes; 0 if none."""

    def fits(b: int) -> bool:
        e = estimate(shape, recipe, b, seq_len, device)
        return (e.device_total if device == "cuda" else e.peak) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
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
    lines = [
        f"plan for micro_batch={mb}, seq_len={seq_len} (image tokens {shape.image_tokens} included), "
        f"bits={recipe.model.bits}, gradient_checkpointing={recipe.model.gradient_checkpointing}",
        f"{'component':{width}}  {'bytes':>15}  {'GiB':>8}  note",
    ]
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
            lines.append(f"{gb:g} GB: micro_batch={mb} {verdict}; largest micro-batch that fits: {best}")
    return "\n".join(lines)


def plan(recipe: Recipe, gpu_memory: float | None = None, seq_len: int | None = None) -> str:
    """`qllava plan`: the rendered plan for a recipe (gpu_memory in GB; default: the local GPU's)."""
    if gpu_memory is None:
        import torch

        if torch.cuda.is_available():
            gpu_memory = torch.cuda.get_device_properties(0).total_memory / 1e9
    if gpu_memory is not None and gpu_memory <= 0:
        raise QllavaError(f"--gpu-memory must be > 0 GB, got {gpu_memory}")
    shape = read_shape(recipe.model.base)
    return render(shape, recipe, seq_len or recipe.data.max_length, gpu_memory)
