"""The recipe schema: typed dataclasses are the single source of defaults, docs and validation.

A recipe is a YAML file with the sections below; any key can be overridden on the command line
as ``section.key=value`` (the value is parsed as YAML, so ``train.max_steps=20`` is an int and
``lora.target_modules=[q_proj,v_proj]`` a list). Every problem is reported at once, naming the key.
An optional key (``data.eval``, ``train.resume``, ...) is unset by null, in a file or as ``data.eval=null``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qllava.errors import QllavaError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelSection:
    base: str = ""
    """Local LLaVA directory in HF format (LlavaForConditionalGeneration + processor files).
    `demo:tiny-llava` builds and caches the demo's tiny model."""

    bits: int = 4
    """Precision of the language model's linear layers: 4 (NF4 + double quantization), 8 (LLM.int8)
    or 16 (not quantized). Vision tower, projector and lm_head are never quantized."""

    attention: str = "auto"
    """Attention kernel of the language model: auto (flash_attention_2 when flash-attn imports and
    the GPU supports it, else sdpa), flash_attention_2, sdpa or eager."""

    gradient_checkpointing: bool = True
    """Recompute decoder-layer activations in the backward pass (non-reentrant) to save memory."""

    projector_from: str = ""
    """Start the projector from these weights instead of the base's: a stage-1 run's final/ or
    checkpoint directory (projector.safetensors), the file itself, or LLaVA's mm_projector.bin."""


@dataclass
class LoraSection:
    enabled: bool = True
    """false: no LoRA, the language model stays frozen and only the projector trains (stage 1,
    projector alignment); checkpoints then hold projector.safetensors instead of an adapter."""

    r: int = 16
    """LoRA rank."""

    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""

    dropout: float = 0.05
    """Dropout on the LoRA input."""

    target_modules: Any = "all-linear"
    """`all-linear` (every linear layer of the language model except lm_head) or a list of module
    name suffixes such as [q_proj, v_proj]. LoRA never touches the vision tower or projector."""


@dataclass
class DataSection:
    train: str = ""
    """Training data: a LLaVA JSON list or JSONL file of {id, image? (or video?), conversations}."""

    eval: str = ""
    """Optional held-out data in the same format; its loss is logged every train.eval_every steps."""

    image_folder: str = ""
    """Folder that the samples' `image` (and `video`) paths are relative to."""

    eval_image_folder: str = ""
    """Folder that data.eval's `image` paths are relative to; unset: data.image_folder."""

    template: str = "vicuna_v1"
    """Conversation template: vicuna_v1, llava_llama_2, mistral_instruct, chatml, gemma (Gemma 3's turns),
    plain (stage 1 alignment) or tokenizer (the tokenizer's own chat_template)."""

    system_prompt: str | None = None
    """Replaces the template's default system prompt when set."""

    max_length: int = 2048
    """Token limit per sample, image tokens included. Longer samples are cut on the right; the
    image-token block is never cut (a limit too small for it is an error)."""

    image_aspect: str = "pad"
    """`pad`: paste the image centered on a square of the processor's mean color (LLaVA-1.5);
    `resize`: stretch it to the processor's square input size."""

    video_frames: int = 8
    """Frames taken from each sample's `video` clip, spread evenly from its first frame to its last (a shorter clip
    repeats some), for the architectures that take video (llava_onevision, qwen2_5_vl). Each frame costs image
    tokens (OneVision: a pooled grid per frame; Qwen2.5-VL: a grid per two frames): this is a clip's token budget."""

    group_by_modality_length: bool = True
    """Batch image and text-only samples separately, each megabatch sorted by length (LLaVA-1.5)."""

    length_bucket: int | None = None
    """With group_by_modality_length: how many micro-batches (per process) are sorted by length
    together. Unset: train.grad_accum, so each optimizer step is one bucket: a random
    single-modality draw of samples, sorted among the step's micro-batches. A multiple of grad_accum
    sorts across steps (less padding, but each step then holds samples of similar length); other
    values let buckets straddle steps. Measured on LLaVA-1.5-like lengths at micro-batch 8
    (tools/padding_report.py): padding 32.8% with 1, 5.9% with 16, 2.1% with 50. A resumed run
    must keep the value its checkpoint was written with."""

    packing: bool = False
    """Padding-free micro-batches: the samples of a micro-batch are concatenated into one row (at most
    train.micro_batch_size * max_length tokens) with position_ids restarting per sample and a
    block-diagonal causal mask, so no sample sees another and no padding is computed. Same samples,
    order and loss as padded batches. Off by default: with sdpa or eager attention the mask is a dense
    row x row matrix, so attention costs grow with the square of the packed row (measured 2x slower
    on CPU). It should pay off with flash_attention_2 and long-tailed lengths; not measured yet."""

    num_workers: int = 2
    """Dataloader worker processes that decode images; 0 decodes in the training process."""

    on_bad_sample: str = "stop"
    """What training does with an image that cannot be read when its batch comes (deleted, truncated,
    no permission since the start-up check): `stop` writes a checkpoint at the last completed step and
    exits naming the sample and the resume command; `skip` leaves the sample out of its step, lists it
    in bad_samples.jsonl in output.dir and counts it as `skipped` in metrics.jsonl."""

    max_bad_fraction: float = 0.01
    """With on_bad_sample=skip: the run stops as `stop` does once more than this fraction of the samples
    drawn so far were skipped (a single bad sample never stops it)."""


@dataclass
class OptimSection:
    name: str = "auto"
    """auto (paged_adamw_8bit on CUDA, adamw elsewhere), paged_adamw_8bit, adamw_8bit or adamw."""

    lr: float = 2e-4
    """Learning rate of the LoRA adapters."""

    projector_lr: float = 2e-5
    """Learning rate of the multimodal projector, which trains fully."""

    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and norm weights."""

    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""

    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""

    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""


@dataclass
class TrainSection:
    max_steps: int = 0
    """Optimizer steps to run; 0 means train.epochs full passes over the data."""

    epochs: float = 1.0
    """Passes over the data when train.max_steps is 0."""

    micro_batch_size: int = 4
    """Samples per forward pass on each process."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    loss_chunk_size: int = 1024
    """Cross-entropy over the vocabulary this many trained tokens at a time, from the final hidden
    states, each chunk's logits recomputed in backward: the full fp32 logits (batch x length x vocab,
    256 MiB per 2048-token sample at a 32k vocabulary, and as much again for their gradient) are never
    built. 0: the model's full logits (the loss is the same to float rounding). Under FSDP lm_head is
    sharded, and the full logits are used."""

    seed: int = 42
    """Seed of model init (LoRA), data order and dropout."""

    resume: str = ""
    """Resume from a checkpoint: `auto` (the latest in output.dir), a checkpoint directory, or empty."""

    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, fp16 on GPUs without bf16, none on CPU), bf16, fp16 or no. On a GPU the base's
    unquantized weights and the 4-bit compute take the autocast dtype; `no` loads them in fp32."""

    log_every: int = 10
    """Optimizer steps between metrics.jsonl lines."""

    eval_every: int = 0
    """Optimizer steps between evaluations on data.eval; 0 evaluates only at the end."""

    save_every: int = 500
    """Optimizer steps between checkpoints; 0 saves only final/."""

    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""

    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is NaN or inf is skipped (no update, the schedule waits) and
    counted as `nonfinite_steps` in metrics.jsonl; after this many in a row the run stops with a
    checkpoint that holds the weights of the last finite step."""


@dataclass
class OutputSection:
    dir: str = "runs/qllava"
    """Run directory: recipe.yaml, metrics.jsonl, checkpoint-STEP/ and final/."""


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.bits": (4, 8, 16),
    "model.attention": ("auto", "flash_attention_2", "sdpa", "eager"),
    "data.template": ("vicuna_v1", "llava_llama_2", "mistral_instruct", "chatml", "gemma", "plain", "tokenizer"),
    "data.image_aspect": ("pad", "resize"),
    "optim.name": ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "bf16", "fp16", "no"),
    "data.on_bad_sample": ("stop", "skip"),
}
POSITIVE = (
    "lora.r",
    "lora.alpha",
    "data.max_length",
    "data.length_bucket",
    "data.video_frames",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.log_every",
    "train.keep_last",
    "train.max_nonfinite_steps",
    "optim.lr",
)
NON_NEGATIVE = (
    "train.max_steps",
    "train.epochs",
    "train.loss_chunk_size",
    "train.eval_every",
    "train.save_every",
    "data.num_workers",
    "data.max_bad_fraction",
    "optim.projector_lr",
    "optim.weight_decay",
    "optim.max_grad_norm",
    "optim.warmup_ratio",
    "lora.dropout",
)
FRACTIONS = ("data.max_bad_fraction",)
REQUIRED = ("model.base", "data.train")


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Recipe)}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


@functools.cache
def field_docs() -> dict[str, str]:
    """`section.key` -> the docstring written under the field (read from this module's source)."""
    docs = {}
    for section, cls in _sections().items():
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[f"{section}.{node.target.id}"] = " ".join(nxt.value.value.split())
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _field_types(cls)]


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _closest_key(dotted: str) -> str:
    """A suggestion for an unknown `section.key`: the same key in its own section (`train.lr` -> `optim.lr`),
    otherwise the closest key."""
    leaf = dotted.split(".", 1)[-1]
    moved = [key for key in all_keys() if key.split(".")[1] == leaf]
    return f" (did you mean `{moved[0]}`?)" if moved else _closest(dotted, all_keys())


def _closest_section(name: str) -> str:
    """A suggestion for an unknown section: a key written without its section (`max_steps=20`)
    means that key, otherwise the closest section name, otherwise the closest key."""
    by_leaf = {key.split(".")[1]: key for key in all_keys()}
    if name in by_leaf:
        return f" (did you mean `{by_leaf[name]}`?)"
    match = difflib.get_close_matches(name, list(_sections()), n=1, cutoff=0.5)
    if match:
        return f" (did you mean `{match[0]}`?)"
    match = difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.6)
    return f" (did you mean `{by_leaf[match[0]]}`?)" if match else ""


def _admits_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


@functools.cache
def optional_keys() -> dict[str, Any]:
    """`section.key` -> its unset value, for every key that has one: null (`~`, or nothing after the
    colon in YAML) sets such a key back to it. A key is optional when its type admits None, or when it
    is a string whose empty default means "not set" (data.eval, train.resume, ...) and it is not
    REQUIRED. Every other key refuses null, naming the key."""
    out = {}
    for section, cls in _sections().items():
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            if _admits_none(hints[f.name]) or (hints[f.name] is str and f.default == "" and dotted not in REQUIRED):
                out[dotted] = f.default
    return out


def _null_problem(dotted: str, hint: Any, default: Any) -> str:
    """Why `dotted` cannot be null: it has no unset state, so say what it takes and its default."""
    expected = _coerce(None, hint)[1] or "expected a value"
    return f"`{dotted}` cannot be null: {expected} (the default is {default!r})"


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Return the value converted to the field's type, or an error text."""
    if hint is Any:
        return value, None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))  # null is handled by build_recipe
    if hint is list or origin is list:
        return (value, None) if isinstance(value, list) else (value, "expected a list")
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (value, "expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, "expected an integer"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value), None
        except (TypeError, ValueError):
            return value, "expected a number"
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value), None
        return value, "expected a string"
    return value, None


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise QllavaError(
                f"override `{item}` is not of the form section.key=value (for example train.max_steps=20)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise QllavaError(f"override `{item}` conflicts with another override of `{part}`")
        node[parts[-1]] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _origins(overrides: list[str]) -> dict[str, str]:
    """`section.key`, and its `section`, -> the override that set it, to name it in problems."""
    origins = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        origins[key] = item
        origins.setdefault(key.split(".")[0], item)  # an unknown section is reported by its name
    return origins


def build_recipe(raw: dict, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate a nested dict against the schema; raise one QllavaError listing every problem.

    `overrides`: the `key=value` strings merged into `raw`; a problem with one of their keys names the
    override rather than blaming `source`.
    """
    problems: list[tuple[str, str]] = []  # (the key or section it is about, what is wrong)
    sections = _sections()
    values: dict[str, dict] = {name: {} for name in sections}
    if not isinstance(raw, dict):
        raise QllavaError(f"{source}: expected a mapping of sections ({', '.join(sections)})")
    for name, body in raw.items():
        if name not in sections:
            problems.append((str(name), f"unknown section `{name}`{_closest_section(str(name))}"))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append((name, f"`{name}` must be a mapping of keys, got {type(body).__name__}"))
            continue
        hints = _field_types(sections[name])
        for key, value in body.items():
            dotted = f"{name}.{key}"
            if key not in hints:
                problems.append((dotted, f"unknown key `{dotted}`{_closest_key(dotted)}"))
                continue
            if value is None:
                # null unsets an optional key; a required one is then reported missing by
                # _check_values (one problem, not two); any other key has no unset state.
                if dotted in optional_keys():
                    values[name][key] = optional_keys()[dotted]
                elif dotted not in REQUIRED:
                    default = getattr(sections[name](), key)
                    problems.append((dotted, _null_problem(dotted, hints[key], default)))
                continue
            if value is False and "no" in CHOICES.get(dotted, ()):
                value = "no"  # YAML 1.1 reads an unquoted `no` (train.mixed_precision: no) as false
            coerced, err = _coerce(value, hints[key])
            if err:
                problems.append((dotted, f"`{dotted}`: {err}, got {value!r}"))
            else:
                values[name][key] = coerced
    recipe = Recipe(**{name: cls(**values[name]) for name, cls in sections.items()})
    problems += _check_values(recipe)
    if problems:
        origins = _origins(overrides or [])
        listing = "\n".join(
            f"  - {text}" + (f" (from the override `{origins[key]}`)" if key in origins else "")
            for key, text in problems
        )
        where = f"{source} with {len(overrides)} override(s)" if overrides else source
        raise QllavaError(f"{where} has {len(problems)} problem(s):\n{listing}")
    return recipe


def get(recipe: Recipe, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def _check_values(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, problem) for every value the schema's types admit but the recipe cannot use."""
    problems = []
    for key, allowed in CHOICES.items():
        value = get(recipe, key)
        if value not in allowed:
            problems.append(
                (
                    key,
                    f"`{key}` is {value!r}; choose one of {', '.join(map(str, allowed))}"
                    f"{_closest(str(value), [str(a) for a in allowed])}",
                )
            )
    for key in POSITIVE:
        if isinstance(get(recipe, key), (int, float)) and get(recipe, key) <= 0:
            problems.append((key, f"`{key}` must be > 0, got {get(recipe, key)}"))
    for key in NON_NEGATIVE:
        if isinstance(get(recipe, key), (int, float)) and get(recipe, key) < 0:
            problems.append((key, f"`{key}` must be >= 0, got {get(recipe, key)}"))
    for key in FRACTIONS:
        if isinstance(get(recipe, key), (int, float)) and get(recipe, key) > 1:
            problems.append((key, f"`{key}` is a fraction between 0 and 1, got {get(recipe, key)} (0.02 for 2%)"))
    for key in REQUIRED:
        if not get(recipe, key):
            problems.append((key, f"`{key}` is required (set it in the recipe or as {key}=...)"))
    targets = recipe.lora.target_modules
    if not (
        targets == "all-linear" or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        problems.append(
            (
                "lora.target_modules",
                f"`lora.target_modules` must be `all-linear` or a list of module names, got {targets!r}",
            )
        )
    if recipe.train.max_steps == 0 and recipe.train.epochs == 0:
        problems.append(("train.max_steps", "set `train.max_steps` or `train.epochs` above 0"))
    if not 0 <= recipe.optim.warmup_ratio < 1:
        problems.append(
            ("optim.warmup_ratio", f"`optim.warmup_ratio` must be in [0, 1), got {recipe.optim.warmup_ratio}")
        )
    if not (isinstance(recipe.optim.betas, list) and len(recipe.optim.betas) == 2):
        problems.append(("optim.betas", f"`optim.betas` must be a list of two numbers, got {recipe.optim.betas!r}"))
    if not recipe.lora.enabled and recipe.optim.projector_lr == 0:
        problems.append(("lora.enabled", "`lora.enabled` is false and `optim.projector_lr` is 0: nothing would train"))
    if recipe.lora.dropout >= 1:
        problems.append(("lora.dropout", f"`lora.dropout` must be below 1, got {recipe.lora.dropout}"))
    return problems


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path as given, or the name of a shipped recipe (`demo`, `demo.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if candidate.is_file() and p.parent == Path("."):
            return candidate
    shipped = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise QllavaError(f"recipe file `{path}` not found (shipped recipes: {shipped})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, validate."""
    p = resolve_recipe_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise QllavaError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise QllavaError(f"{p}: expected a mapping of sections at the top level")
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_recipe(raw, source=str(p), overrides=overrides)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


PATH_KEYS = (
    "model.base",
    "model.projector_from",
    "data.train",
    "data.eval",
    "data.image_folder",
    "data.eval_image_folder",
    "train.resume",
)


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with each existing file or folder of `PATH_KEYS`, and output.dir, as absolute paths.

    A run saves its recipe into its directory and checkpoints, and merge, chat and a later
    `qllava train RUN/recipe.yaml train.resume=auto` read it from wherever they are run: a relative path
    would then point elsewhere (or nowhere). Missing inputs stay as written, so that errors quote them as
    the user wrote them; output.dir is made absolute before the run creates it.
    """
    absolute = {"output.dir": os.path.abspath(recipe.output.dir)}  # `..` folded, symlinks kept
    for dotted in PATH_KEYS:
        value = get(recipe, dotted)
        if value and value != "auto" and Path(value).exists():
            absolute[dotted] = os.path.abspath(value)
    return with_values(recipe, absolute)


def with_values(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A copy of the recipe with `section.key` -> value set (the recipe itself is frozen in use)."""
    sections: dict[str, dict] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    return dataclasses.replace(
        recipe, **{s: dataclasses.replace(getattr(recipe, s), **kv) for s, kv in sections.items()}
    )


def shipped_recipes() -> list[tuple[str, str]]:
    """(file name, the command on its first line) for every recipe under recipes/."""
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.read_text() else ""
        out.append((p.name, first.lstrip("# ").strip()))
    return out
