"""The embedded default: a tiny LLaVA learns visual question answering with QLoRA on a CPU.

`qllava demo` (and any recipe whose paths start with `demo:`) materializes, once, deterministically
and cached under $QLLAVA_CACHE (default ~/.cache/qllava):
- a synthetic dataset of shapes drawn with PIL (color, kind, count, positions) with questions about
  them, and a held-out split of unseen images;
- a tiny "pretrained" LLaVA: a CLIP-style vision tower and a Llama-style LLM, pretrained in full
  precision to caption such images and to know the answer vocabulary (but not the task);
then trains it with recipes/demo.yaml through the real path (4-bit LLM, LoRA, trained projector,
frozen vision tower) and reports held-out exact-match accuracy before and after.

`qllava demo --two-stage` shows LLaVA's two stages instead: the tiny base is split into its vision
encoder and its LLM, `qllava compose` joins them again with a fresh projector, stage 1
(recipes/demo-pretrain-projector.yaml) aligns that projector on captions, and stage 2
(recipes/demo.yaml) tunes LoRA and projector on the questions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from qllava.errors import QllavaError
from qllava.model.families import family_of_model
from qllava.recipe import PATH_KEYS, Recipe, get, with_values

DEMO_VERSION = "v4"
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
KINDS = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
QUESTIONS = {
    "color": "What color are the shapes?",
    "kind": "What kind of shape is shown?",
    "count": "How many shapes are there?",
    "where": "Where is the shape?",
}
ANSWERS = {"color": list(COLORS), "kind": list(KINDS), "count": list(COUNTS), "where": list(QUADRANTS)}
FACTS = [
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What color is grass?", "green"),
    ("What color is the sky?", "blue"),
    ("Is a circle round?", "yes"),
    ("Is a square round?", "no"),
]
IMAGE_PX = 64
SPLITS = {"train": 2000, "eval": 200, "pretrain": 3000}


def cache_dir() -> Path:
    root = Path(os.environ.get("QLLAVA_CACHE", Path.home() / ".cache" / "qllava"))
    return root / f"demo-{DEMO_VERSION}"


# --- synthetic images and conversations -------------------------------------------------------


def _draw(scene: dict) -> Image.Image:
    scale = 4  # draw large, then downsample: smooth edges like a photo
    size = IMAGE_PX * scale
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    half = size // 2
    for place in scene["places"]:
        qx, qy = QUADRANTS[place]
        cx, cy = qx * half + half // 2 + scene["jitter"][0] * scale, qy * half + half // 2 + scene["jitter"][1] * scale
        r = scene["radius"] * scale
        box = (cx - r, cy - r, cx + r, cy + r)
        color = COLORS[scene["color"]]
        if scene["kind"] == "circle":
            d.ellipse(box, fill=color)
        elif scene["kind"] == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    return img.resize((IMAGE_PX, IMAGE_PX), Image.LANCZOS)


def _scene(rng: random.Random, count: int | None = None) -> dict:
    count = count or rng.randint(1, 3)
    return {
        "color": rng.choice(list(COLORS)),
        "kind": rng.choice(KINDS),
        "count": COUNTS[count - 1],
        "places": sorted(rng.sample(list(QUADRANTS), count)),
        "radius": rng.randint(11, 13),
        "jitter": (rng.randint(-2, 2), rng.randint(-2, 2)),
    }


def _caption(scene: dict) -> str:
    noun = scene["kind"] + ("s" if scene["count"] != "one" else "")
    return f"{scene['count']} {scene['color']} {noun} at {' and '.join(scene['places'])}"


def _kinds(scene: dict) -> list[str]:
    """Question kinds that have one answer for this scene: `where` only for a single shape."""
    return [k for k in QUESTIONS if k != "where" or scene["count"] == "one"]


def _qa(scene: dict, kind: str) -> tuple[str, str]:
    return QUESTIONS[kind], scene["places"][0] if kind == "where" else scene[kind]


def _turns(pairs: list[tuple[str, str]], image: bool) -> list[dict]:
    convs = []
    for i, (q, a) in enumerate(pairs):
        convs.append({"from": "human", "value": ("<image>\n" if image and i == 0 else "") + q})
        convs.append({"from": "gpt", "value": a})
    return convs


def make_dataset(root: Path, seed: int = 0) -> None:
    """Write images/ and train.json, eval.json (VQA) and pretrain.json (captions + answer vocabulary)."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for split, n in SPLITS.items():
        for i in range(n):
            # Held-out questions cycle through the kinds; `where` needs a single shape.
            kind = list(QUESTIONS)[i % len(QUESTIONS)] if split == "eval" else None
            scene = _scene(rng, count=1 if kind == "where" else None)
            name = f"{split}-{i:05d}.png"
            _draw(scene).save(images / name)
            sid = f"{split}-{i}"
            if split == "pretrain":
                splits[split].append(
                    {
                        "id": sid,
                        "image": name,
                        "scene": scene,
                        "conversations": _turns([("Describe the image.", _caption(scene))], True),
                    }
                )
                # The task's questions with random answers of the right type: the base knows the
                # answer vocabulary but not the task, so it scores near chance before tuning.
                kind = rng.choice(_kinds(scene))
                splits[split].append(
                    {
                        "id": f"{sid}-q",
                        "image": name,
                        "conversations": _turns([(QUESTIONS[kind], rng.choice(ANSWERS[kind]))], True),
                    }
                )
            elif split == "eval":
                splits[split].append({"id": sid, "image": name, "conversations": _turns([_qa(scene, kind)], True)})
            else:
                kinds = rng.sample(_kinds(scene), 2)
                splits[split].append(
                    {"id": sid, "image": name, "conversations": _turns([_qa(scene, k) for k in kinds], True)}
                )
                if i % 20 == 0:
                    splits[split].append({"id": f"{sid}-text", "conversations": _turns([rng.choice(FACTS)], False)})
    for split, records in splits.items():
        (root / f"{split}.json").write_text(json.dumps(records, indent=1))


# The resolution demo (`qllava demo --arch llava_next`): wide images of WIDE_PANELS demo-sized panels, one shape in
# one of them. A single square downscale (LLaVA-1.5) shrinks the shape by the panel count on top of the demo's own
# 2x; LLaVA-NeXT's tiles show each panel at the scale the demo base was pretrained on.
WIDE_PANELS = 3
WIDE_SPLITS = {"train": 1200, "eval": 200}
WIDE_QUESTION = "What kind of shape is shown?"


def make_wide_dataset(root: Path, seed: int = 0) -> None:
    """Write wide-images/ and wide-train.json, wide-eval.json: which kind of shape one panel of a wide image holds."""
    rng = random.Random(seed)
    images = root / "wide-images"
    images.mkdir(parents=True, exist_ok=True)
    for split, n in WIDE_SPLITS.items():
        records = []
        for i in range(n):
            scene = _scene(rng, count=1)
            canvas = Image.new("RGB", (IMAGE_PX * WIDE_PANELS, IMAGE_PX), (245, 245, 245))
            canvas.paste(_draw(scene), (IMAGE_PX * rng.randrange(WIDE_PANELS), 0))
            name = f"{split}-{i:05d}.png"
            canvas.save(images / name)
            records.append(
                {
                    "id": f"wide-{split}-{i}",
                    "image": name,
                    "conversations": _turns([(WIDE_QUESTION, scene["kind"])], True),
                }
            )
        (root / f"wide-{split}.json").write_text(json.dumps(records, indent=1))


def _corpus(root: Path) -> list[str]:
    texts = []
    for split in SPLITS:
        for record in json.loads((root / f"{split}.json").read_text()):
            texts += [t["value"] for t in record["conversations"]]
    return texts


# --- the tiny pretrained base -----------------------------------------------------------------


def _pretrain_vision(model, data_root: Path, image_processor, *, steps: int = 300, seed: int = 0) -> None:
    """Supervised attribute heads on the features LLaVA reads (layer -2 patches): a stand-in for CLIP
    pretraining that gives the vision tower features of shape kind, color, count and position."""
    from qllava.data.images import load_image

    records = [r for r in json.loads((data_root / "pretrain.json").read_text()) if "scene" in r]
    pixels = torch.stack([load_image(data_root / "images" / r["image"], "pad", image_processor) for r in records])
    targets = {
        "color": torch.tensor([list(COLORS).index(r["scene"]["color"]) for r in records]),
        "kind": torch.tensor([KINDS.index(r["scene"]["kind"]) for r in records]),
        "count": torch.tensor([COUNTS.index(r["scene"]["count"]) for r in records]),
        "places": torch.tensor([[float(q in r["scene"]["places"]) for q in QUADRANTS] for r in records]),
    }
    vision = model.get_submodule(family_of_model(model).vision)

    def patch_features(x: torch.Tensor) -> torch.Tensor:
        # What LLaVA reads: layer -2, CLS dropped (vision_feature_select_strategy "default").
        return vision(x, output_hidden_states=True).hidden_states[-2][:, 1:].flatten(1)

    with torch.no_grad():
        n_features = patch_features(pixels[:1]).shape[1]
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(n_features, 4 if k == "places" else len(ANSWERS[k])) for k in targets}
    )
    optimizer = torch.optim.AdamW([*vision.parameters(), *heads.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    vision.train()
    for _ in tqdm(range(steps), desc="demo base: vision tower", unit="step"):
        idx = torch.randint(len(records), (64,), generator=g)
        features = patch_features(pixels[idx])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(heads["places"](features), targets["places"][idx])
        for k in ("color", "kind", "count"):
            loss = loss + torch.nn.functional.cross_entropy(heads[k](features), targets[k][idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def pretrain_base(model_dir: Path, data_root: Path, *, steps: int = 500, seed: int = 0) -> None:
    """Full-precision pretraining of the tiny LLaVA, standing in for a downloaded base: the vision
    tower on image attributes, then the whole model on captions."""
    from functools import partial

    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText, get_scheduler

    from qllava.data.dataset import collate
    from qllava.data.validate import dataset_from_recipe
    from qllava.model.load import load_processor
    from qllava.train.loss import loss_sum, trained_tokens

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    family = family_of_model(model)
    processor = load_processor(model_dir)
    _pretrain_vision(model, data_root, processor.image_processor, seed=seed)
    recipe = Recipe()
    recipe.data.image_folder = str(data_root / "images")
    recipe.data.max_length = 256
    dataset = dataset_from_recipe(recipe, str(data_root / "pretrain.json"), processor, model.config)
    loader = DataLoader(
        dataset,
        batch_size=32,
        shuffle=True,
        drop_last=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=partial(collate, pad_token_id=processor.tokenizer.pad_token_id),
    )
    # A tenth of the LLM's rate for the vision tower (measured on 200 pretraining images after 600
    # steps: caption exact match 0.65 with 2e-3 / 2e-4, against 0.39 with 1e-3 for everything).
    vision = [p for n, p in model.named_parameters() if family.part_of(n) == "vision"]
    rest = [p for n, p in model.named_parameters() if family.part_of(n) != "vision"]
    optimizer = torch.optim.AdamW([{"params": vision, "lr": 2e-4}, {"params": rest, "lr": 2e-3}], weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    model.train()
    step = 0
    bar = tqdm(total=steps, desc="demo base: captions", unit="step")
    while step < steps:
        for batch in loader:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                use_cache=False,
            )
            loss = loss_sum(out.logits, batch["labels"]) / trained_tokens(batch["labels"]).clamp(min=1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            if step >= steps:
                break
    bar.close()
    model.save_pretrained(model_dir)


def materialize() -> Path:
    """Build the demo data and base once (deterministic) and return the cache directory."""
    from filelock import FileLock

    root = cache_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: concurrent runs (several ranks, a test beside a demo) wait for it.
    with FileLock(str(root) + ".lock"):
        if not (root / "COMPLETE").is_file():
            _build(root)
    return root


def _build(root: Path) -> None:
    from qllava.model.tiny import build_tiny_llava

    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    print(f"qllava: generating the demo dataset and tiny base model (once; cached in {root})", flush=True)
    make_dataset(tmp)
    build_tiny_llava(tmp / "tiny-llava", _corpus(tmp))
    pretrain_base(tmp / "tiny-llava", tmp)
    (tmp / "COMPLETE").write_text(f"built in {time.perf_counter() - start:.0f}s\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def _split_base(base: Path, vision_dir: Path, llm_dir: Path) -> None:
    """Save the tiny base's vision tower and LLM as the stand-alone checkpoints a user would download."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from qllava.model.load import load_processor

    llava = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    family = family_of_model(llava)
    processor = load_processor(base)
    llava.get_submodule(family.vision).save_pretrained(vision_dir)
    processor.image_processor.save_pretrained(vision_dir)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llava.config.text_config)
    llm.model, llm.lm_head = llava.get_submodule(family.language_model), llava.lm_head
    llm.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)


def _build_once(target: Path, build) -> Path:
    """`build(target)` unless an earlier build completed; `target` is returned either way.

    Built in place (what compose prints is where the model stays); COMPLETE, written last, marks a whole build,
    and the lock keeps readers (several ranks, a test beside a demo) out until then."""
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if not (target / "COMPLETE").is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / "COMPLETE").write_text("ok\n")
    return target


def materialize_two_stage() -> Path:
    """The two-stage demo's assets, built once from the demo cache: the composed model (fresh
    projector) and stage-1 caption data (`<image>` then the caption, LLaVA's pretraining format)."""
    from qllava.model.compose import compose_llava

    root = materialize()

    def build(target: Path) -> None:
        _split_base(root / "tiny-llava", target / "vision", target / "llm")
        compose_llava(
            target / "vision", target / "llm", target / "composed", projector="mlp2x_gelu", template="vicuna_v1"
        )
        captions = [
            {"id": r["id"], "image": r["image"], "conversations": _turns([("", _caption(r["scene"]))], True)}
            for r in json.loads((root / "pretrain.json").read_text())
            if "scene" in r
        ]
        (target / "captions.json").write_text(json.dumps(captions, indent=1))

    return _build_once(root / "two-stage", build)


def materialize_wide() -> Path:
    """The resolution demo's assets, built once from the demo cache: the wide-image data, and the demo base as a
    LLaVA-NeXT (`compose --arch llava_next` of its own vision tower and LLM, with its trained projector), so that
    both architectures start from the same weights and differ only in how an image reaches the vision tower."""
    from transformers import AutoModelForImageTextToText

    from qllava.model.compose import compose_llava

    root = materialize()
    split = materialize_two_stage()

    def build(target: Path) -> None:
        make_wide_dataset(target)
        next_dir = target / "tiny-llava-next"
        compose_llava(split / "vision", split / "llm", next_dir, template="vicuna_v1", arch="llava_next")
        base = AutoModelForImageTextToText.from_pretrained(root / "tiny-llava", dtype=torch.float32)
        next_model = AutoModelForImageTextToText.from_pretrained(next_dir, dtype=torch.float32)
        next_model.model.multi_modal_projector.load_state_dict(base.model.multi_modal_projector.state_dict())
        next_model.save_pretrained(next_dir)

    return _build_once(root / "wide", build)


def resolve_demo_paths(recipe: Recipe) -> Recipe:
    """Replace `demo:NAME` paths in a recipe with files of the materialized demo cache."""
    values = {key: str(get(recipe, key)) for key in PATH_KEYS}
    if not any(v.startswith("demo:") for v in values.values()):
        return recipe
    root = materialize()
    names = {
        "demo:tiny-llava": root / "tiny-llava",
        "demo:train": root / "train.json",
        "demo:eval": root / "eval.json",
        "demo:images": root / "images",
        "demo:composed": root / "two-stage" / "composed",
        "demo:captions": root / "two-stage" / "captions.json",
        "demo:tiny-llava-next": root / "wide" / "tiny-llava-next",
        "demo:wide-train": root / "wide" / "wide-train.json",
        "demo:wide-eval": root / "wide" / "wide-eval.json",
        "demo:wide-images": root / "wide" / "wide-images",
    }
    if any(v in ("demo:composed", "demo:captions") for v in values.values()):
        materialize_two_stage()
    if any(v.startswith(("demo:wide", "demo:tiny-llava-next")) for v in values.values()):
        materialize_wide()
    resolved = {}
    for key, value in values.items():
        if value.startswith("demo:"):
            if value not in names:
                raise QllavaError(f"`{key}: {value}` is not a demo asset; use one of {', '.join(names)}")
            resolved[key] = str(names[value])
    return with_values(recipe, resolved)


def held_out_accuracy(recipe: Recipe, adapter: Path | None) -> float:
    """Greedy exact-match accuracy on the demo's held-out split, base (4-bit) with or without adapter."""
    from qllava.data.validate import eval_image_folder
    from qllava.generate import Sampling, generate_answers, load_for_inference

    records = json.loads(Path(recipe.data.eval).read_text())
    questions = [(r.get("image"), r["conversations"][0]["value"].replace("<image>\n", "")) for r in records]
    truth = [r["conversations"][1]["value"] for r in records]
    model, processor = load_for_inference(recipe.model.base, adapter, bits=recipe.model.bits)
    answers = generate_answers(
        model,
        processor,
        recipe,
        questions,
        image_folder=eval_image_folder(recipe),
        sampling=Sampling(max_new_tokens=8),
        batch_size=50,
    )
    return sum(a == t for a, t in zip(answers, truth)) / len(truth)


def _fresh_run_dir(out: Path) -> None:
    """The demo's run directory is its own: a new demo replaces what an earlier one wrote there."""
    for name in ("metrics.jsonl", "metrics.json", "recipe.yaml"):
        (out / name).unlink(missing_ok=True)
    for old in [*out.glob("checkpoint-*"), out / "final", out / "stage1", out / "stage2"]:
        shutil.rmtree(old, ignore_errors=True)


def run_demo(out: Path, overrides: list[str] | None = None, two_stage: bool = False, arch: str = "llava") -> dict:
    """Materialize, evaluate the base, train with recipes/demo.yaml, evaluate again; write metrics.json.

    `two_stage`: start from the composed model (fresh projector), run stage 1 then stage 2 into
    out/stage1 and out/stage2, and evaluate after each. `overrides` apply to recipes/demo.yaml.
    `arch="llava_next"`: the resolution demo instead (`run_wide_demo`).
    """
    from qllava.recipe import load_recipe
    from qllava.train.loop import train

    if arch not in ("llava", "llava_next"):
        raise QllavaError(f"unknown --arch `{arch}`; choose llava (the default demo) or llava_next")
    if arch == "llava_next":
        if two_stage:
            raise QllavaError(
                "--two-stage belongs to the default demo (--arch llava); the resolution demo has one stage"
            )
        return run_wide_demo(out, overrides)

    start = time.perf_counter()
    out = Path(out)
    stage2_dir = out / "stage2" if two_stage else out
    recipe = resolve_demo_paths(load_recipe("demo", [f"output.dir={stage2_dir}", *(overrides or [])]))
    if not recipe.train.resume:
        _fresh_run_dir(out)
    metrics = {}
    if two_stage:
        stage1 = resolve_demo_paths(load_recipe("demo-pretrain-projector", [f"output.dir={out / 'stage1'}"]))
        recipe = with_values(recipe, {"model.base": stage1.model.base, "model.projector_from": ""})
        metrics["accuracy_composed"] = held_out_accuracy(recipe, None)
        print(f"qllava demo: composed model (fresh projector): accuracy {metrics['accuracy_composed']:.3f}", flush=True)
        stage1_final = train(stage1)
        metrics["accuracy_after_stage1"] = held_out_accuracy(recipe, stage1_final)
        print(
            f"qllava demo: after stage 1 (projector alone): accuracy {metrics['accuracy_after_stage1']:.3f}", flush=True
        )
        recipe = with_values(recipe, {"model.projector_from": str(stage1_final)})
        before = metrics["accuracy_after_stage1"]
    else:
        before = held_out_accuracy(recipe, None)
        print(f"qllava demo: held-out accuracy before training {before:.3f}", flush=True)
    final = train(recipe)
    after = held_out_accuracy(recipe, final)
    metrics.update(accuracy_before=before, accuracy_after=after, wall_time_s=round(time.perf_counter() - start, 1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"qllava demo: held-out accuracy before {before:.3f}, after {after:.3f} "
        f"({metrics['wall_time_s']:.0f}s); written to {out / 'metrics.json'}",
        flush=True,
    )
    return metrics


def run_wide_demo(out: Path, overrides: list[str] | None = None) -> dict:
    """The resolution demo: recipes/demo-next.yaml trains the demo base as LLaVA-NeXT (out/llava_next) and, with the
    same settings and steps, as LLaVA-1.5 (out/llava); both are evaluated before and after; metrics.json holds both.
    `overrides` apply to both runs."""
    from qllava.recipe import load_recipe
    from qllava.train.loop import train

    start = time.perf_counter()
    out = Path(out)
    if (out / "final").is_dir() or (out / "stage2").is_dir():
        raise QllavaError(
            f"{out} holds a run of the default demo (its final/ adapter); the resolution demo writes llava/, "
            "llava_next/ and metrics.json: choose another --out (its default is runs/demo-next)"
        )
    metrics = {}
    for arch, base in (("llava_next", "demo:tiny-llava-next"), ("llava", "demo:tiny-llava")):
        shutil.rmtree(out / arch, ignore_errors=True)
        recipe = load_recipe("demo-next", [*(overrides or []), f"model.base={base}", f"output.dir={out / arch}"])
        recipe = resolve_demo_paths(recipe)
        before = held_out_accuracy(recipe, None)
        print(f"qllava demo: {arch}: held-out accuracy before training {before:.3f}", flush=True)
        arch_start = time.perf_counter()
        after = held_out_accuracy(recipe, train(recipe))
        metrics[arch] = {
            "accuracy_before": before,
            "accuracy_after": after,
            "train_and_eval_s": round(time.perf_counter() - arch_start, 1),
        }
        print(f"qllava demo: {arch}: held-out accuracy after {recipe.train.max_steps} steps {after:.3f}", flush=True)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(
        f"  {arch:<11} {m['accuracy_before']:.3f}   {m['accuracy_after']:.3f}"
        for arch, m in metrics.items()
        if arch != "wall_time_s"
    )
    print(
        f"qllava demo: which kind of shape a wide image holds (held-out accuracy)\n  {'':<11} before  after\n{rows}\n"
        f"({metrics['wall_time_s']:.0f}s); written to {out / 'metrics.json'}",
        flush=True,
    )
    return metrics
