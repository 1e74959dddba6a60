"""`qllava answer`: batch answers for a LLaVA `model_vqa` question file, resumable.

In: one `{"question_id", "image" (optional, relative to --image-folder; a list for several, each placed at its
`<image>` tag in the text or, without tags, before the question), "text"}` per line.
Out: one `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per line, as
LLaVA's model_vqa writes them. Each batch is appended and flushed to disk as it is done, so a killed
run loses at most the batch in flight; a rerun skips the question_ids already in the output, but only
when the same model with the same settings wrote them (`model_id` and `metadata`'s settings
fingerprint), so that one file never mixes the answers of two models or of two generation settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from qllava.data.dataset import IMAGE_TAG, encoder_from_recipe
from qllava.data.images import image_problem
from qllava.data.jsonl import parse_jsonl
from qllava.errors import QllavaError, problem_list
from qllava.generate import Sampling, generate_batch, image_list
from qllava.model.fingerprint import weights_digest

FINGERPRINT = "settings_fingerprint"
"""The `metadata` key holding a hash of the settings that decide the answers."""


def read_questions(path: str | Path, image_folder: str | Path | None) -> list[dict]:
    """Every question, validated at start: all problems (bad lines, missing or broken images) reported at once."""
    if Path(path).suffix != ".jsonl":
        raise QllavaError(f"questions file `{path}`: expected a .jsonl file (one question object per line)")
    if not Path(path).is_file():
        raise QllavaError(f"questions file `{path}` not found")
    problems, seen = [], set()
    rows = parse_jsonl(Path(path).read_text(encoding="utf-8"), path, problems)  # bad lines join the other problems
    folder = Path(image_folder) if image_folder else None
    problem_of = functools.cache(image_problem)  # benchmarks ask many questions about each image (GQA: ~30)
    records = []
    for lineno, record in tqdm(rows, desc="checking questions", unit="question"):
        records.append(record)
        where = f"{path}:{lineno}"
        if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
            problems.append(f"{where}: expected an object with `question_id` and a string `text`")
            continue
        qid = str(record["question_id"])
        if qid in seen:
            problems.append(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        label = f"{where} (question_id {qid!r})"
        image = record.get("image")
        if not image:
            if IMAGE_TAG in record["text"]:
                problems.append(f"{label}: `<image>` in the text but no `image`")
            continue
        if not (isinstance(image, str) or isinstance(image, list) and all(isinstance(p, str) and p for p in image)):
            problems.append(f"{label}: `image` must be a path string or a list of them, not {image!r}")
            continue
        images, tags = image_list(image), record["text"].count(IMAGE_TAG)
        if tags and tags != len(images):
            problems.append(
                f"{label}: {tags} `<image>` tag(s) but {len(images)} image(s); put one `<image>` where each image "
                "belongs, or none to have them placed before the question"
            )
        for name in images:
            if folder is None:
                problems.append(f"{label}: image `{name}` needs --image-folder")
                break
            if problem := problem_of(folder / name):
                problems.append(f"{label}: image `{name}` {problem} (--image-folder `{folder}`)")
    if problems:
        summary = f"{len(problems)} problem(s) in the questions, nothing was generated"
        raise QllavaError(f"{summary}:\n{problem_list(problems)}")
    return records


def answer_settings(model_path: str | Path, adapter: str | Path | None, model, recipe, sampling: Sampling) -> dict:
    """What decides the answers (the batch size does not: batches answer as batch size 1 does), for each line's
    `metadata`, with a hash of them under FINGERPRINT. Models are identified by their resolved paths and by a
    sample of their weights: an adapter retrained, or an export merged again, at the same path is another model."""
    quantization = getattr(model.config, "quantization_config", None)
    settings = {
        "model": str(Path(model_path).resolve()),
        "model_weights": weights_digest(model_path),
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "adapter_weights": weights_digest(adapter) if adapter is not None else None,
        "bits": 4 if getattr(quantization, "load_in_4bit", False) else 8 if quantization is not None else 16,
        "dtype": str(model.dtype).removeprefix("torch."),
        "template": recipe.data.template,
        "system_prompt": recipe.data.system_prompt,
        **sampling.generate_kwargs(),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {**settings, FINGERPRINT: digest}


def _check_same_writer(out: Path, lineno: int, line: dict, model_id: str, settings: dict) -> None:
    """Refuse to resume answers that another model, or the same with other settings, wrote."""
    theirs = line.get("metadata") if isinstance(line.get("metadata"), dict) else {}
    if line.get("model_id") == model_id and theirs.get(FINGERPRINT) == settings[FINGERPRINT]:
        return
    fix = f"pass another --out, or delete {out} to answer every question with this model and these settings"
    if FINGERPRINT not in theirs:
        raise QllavaError(
            f"{out}:{lineno} has no settings fingerprint (an older qllava or another tool wrote it), so whether "
            f"this model with these settings wrote it is unknown, and its answers are not resumed; {fix}"
        )
    mine = {"model_id": model_id, **settings}
    theirs = {"model_id": line.get("model_id"), **theirs}
    differences = [
        f"{key} {theirs.get(key)!r} there, {value!r} here"
        for key, value in mine.items()
        if key != FINGERPRINT and theirs.get(key) != value
    ] or [f"{FINGERPRINT} {theirs[FINGERPRINT]!r} there, {settings[FINGERPRINT]!r} here"]
    raise QllavaError(
        f"{out} holds answers of another model or other settings ({out}:{lineno}: {'; '.join(differences)}), "
        f"which must not mix with this run's in one file; {fix}"
    )


def answered_ids(out: Path, model_id: str, settings: dict) -> set[str]:
    """question_ids already answered in `out` by this model with these settings; a last line cut short by a
    killed run is dropped. Answers from another model or other settings are an error."""
    if not out.is_file():
        return set()
    text = out.read_text(encoding="utf-8")
    complete, _, cut_off = text.rpartition("\n")  # text after the last newline: a write a kill cut short
    ids = set()
    for lineno, text_line in enumerate(complete.split("\n"), 1):
        if not text_line.strip():
            continue
        try:
            line = json.loads(text_line)
            qid = str(line["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QllavaError(
                f"{out}:{lineno} is not an answer line; pass another --out (the file was left as it is)"
            ) from None
        _check_same_writer(out, lineno, line, model_id, settings)
        ids.add(qid)
    if cut_off.strip():  # dropped only once the file is known to be this run's to continue
        out.write_text(complete + "\n" if complete else "", encoding="utf-8")
    return ids


def answer_questions(
    model,
    processor,
    recipe,
    questions: list[dict],
    out: str | Path,
    *,
    image_folder: str | Path | None,
    model_id: str,
    settings: dict,
    sampling: Sampling,
    batch_size: int = 8,
) -> dict:
    """Answer the questions not yet in `out`, appending one line per answer; return counts.

    `settings`: `answer_settings(...)`, written as each line's metadata and compared with the lines in `out`.
    """
    out = Path(out)
    done = answered_ids(out, model_id, settings)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    encoder = encoder_from_recipe(recipe, processor, model.config)
    folder = Path(image_folder) if image_folder else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="answering", unit="question") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [([folder / p for p in image_list(q.get("image"))], [("user", q["text"])]) for q in batch]
            answers = generate_batch(model, processor, encoder, recipe, prompts, sampling)
            lines = [
                json.dumps(
                    {
                        "question_id": q["question_id"],
                        "prompt": q["text"],
                        "text": answer,
                        "answer_id": uuid.uuid4().hex,
                        "model_id": model_id,
                        "metadata": settings,
                    }
                )
                + "\n"
                for q, answer in zip(batch, answers)
            ]
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    return {"questions": len(questions), "already_answered": len(questions) - len(todo), "answered": len(todo)}
