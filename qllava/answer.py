"""`qllava answer`: batch answers for a LLaVA `model_vqa` question file, resumable.

In: one `{"question_id", "image" (optional, relative to --image-folder), "text"}` per line.
Out: one `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per line, as
LLaVA's model_vqa writes them. Each batch is appended and flushed to disk as it is done, so a killed
run loses at most the batch in flight; a rerun skips the question_ids already in the output.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from qllava.data.dataset import encoder_from_recipe, read_records
from qllava.errors import QllavaError, problem_list
from qllava.generate import Sampling, generate_batch


def read_questions(path: str | Path, image_folder: str | Path | None) -> list[dict]:
    """Every question, validated at start: all problems (bad lines, missing images) reported at once."""
    if Path(path).suffix != ".jsonl":
        raise QllavaError(f"questions file `{path}`: expected a .jsonl file (one question object per line)")
    records = read_records(path)
    problems, seen = [], set()
    folder = Path(image_folder) if image_folder else None
    for i, record in enumerate(records, 1):
        where = f"{path}: question {i}"
        if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
            problems.append(f"{where}: expected an object with `question_id` and a string `text`")
            continue
        qid = str(record["question_id"])
        if qid in seen:
            problems.append(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        image = record.get("image")
        if image and (folder is None or not (folder / image).is_file()):
            problems.append(f"{where} (question_id {qid!r}): image `{image}` not found in --image-folder `{folder}`")
    if problems:
        summary = f"{len(problems)} problem(s) in the questions, nothing was generated"
        raise QllavaError(f"{summary}:\n{problem_list(problems)}")
    return records


def answered_ids(out: Path) -> set[str]:
    """question_ids already answered in `out`; a last line cut short by a killed run is dropped."""
    if not out.is_file():
        return set()
    text = out.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1].strip():  # no newline at the end: the write of that line was cut off
        text = text[: len(text) - len(lines[-1])]
        out.write_text(text, encoding="utf-8")
        lines = lines[:-1]
    ids = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QllavaError(
                f"{out}:{lineno} is not an answer line; pass another --out (the file was left as it is)"
            ) from None
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
    sampling: Sampling,
    batch_size: int = 8,
) -> dict:
    """Answer the questions not yet in `out`, appending one line per answer; return counts."""
    out = Path(out)
    done = answered_ids(out)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    encoder = encoder_from_recipe(recipe, processor, model.config)
    folder = Path(image_folder) if image_folder else None
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"temperature": sampling.temperature, "top_p": sampling.top_p, "template": recipe.data.template}
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="answering", unit="question") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [(folder / q["image"] if q.get("image") else None, [("user", q["text"])]) for q in batch]
            answers = generate_batch(model, processor, encoder, recipe, prompts, sampling)
            lines = [
                json.dumps(
                    {
                        "question_id": q["question_id"],
                        "prompt": q["text"],
                        "text": answer,
                        "answer_id": uuid.uuid4().hex,
                        "model_id": model_id,
                        "metadata": metadata,
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
