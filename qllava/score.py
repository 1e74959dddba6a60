"""Score generated answers against ground truth: exact match and VQA-normalized accuracy.

`score_answers(ANSWERS.jsonl, TRUTH.jsonl)` reads the output of LLaVA's `model_vqa` (one object per line; only
`question_id` and `text` are used) and a truth file (one object per line with `question_id` and either `answer`, a
string, or `answers`, a list of strings or of `{"answer": ...}` objects as in VQAv2 annotations; `answers` wins when
both are present). Ids are matched as `str(question_id)`, so `5` and `"5"` are the same question.

Every truth question is scored; one without a prediction ("unanswered") scores 0. Predictions whose id has no truth
("extra") are counted and otherwise ignored.

Exact match is 1 when the stripped prediction equals a stripped truth string, case included.

Normalized accuracy compares `normalize_answer` of both sides, which follows the official VQA evaluation:

- lower-case; tabs and newlines count as spaces;
- apostrophes (straight and curly) are deleted, so "don't" == "dont" and "it's" == "its"; this stands in for the
  official table of contractions, which maps "dont" to "don't". Possessives merge with plurals ("dog's" == "dogs");
- a comma between digits is a thousands separator and is deleted: "1,000" == "1000";
- a period before a digit is a decimal point and is kept ("2.5", ".5"); any other period is deleted, so
  "u.s." == "us", "yes." == "yes" and "3." == "3";
- every other character that is neither a letter, a digit nor whitespace (punctuation and symbols such as "%"
  or "$") becomes a space: "black/white" == "black white", "t-shirt" == "t shirt";
- the words "none" and "zero" to "ten" become digits ("none" -> "0", as the official map does);
- the articles "a", "an" and "the" are dropped;
- runs of whitespace collapse to one space, with none at either end.

With a single truth answer (`answer`, or an `answers` list of fewer than three, whose entries are then accepted
alternatives), normalized accuracy is 1 when the prediction matches a truth answer, else 0. With three or more
human answers it is the VQA formula min(1, matching answers / 3): 2 of 10 agreeing annotators give 0.667, 3 or more
give 1. (The official script averages this over the 10 leave-one-out subsets of the annotators, which gives slightly
lower numbers, e.g. 0.6 for 2 matches; the simple formula is the one usually quoted.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qllava.data.jsonl import parse_jsonl
from qllava.errors import QllavaError

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHES = re.compile("['\u2018\u2019\u02bc]")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
# \w keeps letters of any script and digits; "_" is in \w but is punctuation to VQA. Periods left at this point are
# decimal points.
_PUNCTUATION = re.compile(r"[^\w\s.]|_")

# The VQA 3-of-N rule: an answer is fully right when at least this many annotators gave it.
_VQA_AGREEMENT = 3


def normalize_answer(text: str) -> str:
    """`text` as the VQA evaluation compares answers (see the module docstring for the rules)."""
    text = text.lower()
    text = _APOSTROPHES.sub("", text)
    text = _THOUSANDS_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = (_NUMBERS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


@dataclass
class ScoreReport:
    """Accuracy over the truth questions; unanswered questions count as wrong."""

    total: int
    """Questions in the truth file."""
    answered: int
    """Truth questions with a prediction."""
    unanswered: int
    """Truth questions without a prediction (scored 0)."""
    extra: int
    """Predictions whose question_id is not in the truth file (ignored)."""
    exact: float
    """Exact-match accuracy, 0..1."""
    normalized: float
    """VQA-normalized accuracy, 0..1."""
    per_question: list[dict] = field(default_factory=list)
    """One dict per truth question, in truth-file order: question_id (as in the truth file), prediction (None when
    unanswered), truth (list of strings), exact (0 or 1), normalized (0..1)."""

    def render(self) -> str:
        """A few lines for a terminal."""
        exact_hits = sum(q["exact"] for q in self.per_question)
        # sums of thirds carry float noise (ten 1/3 add up to 3.3333333333333335): 2 decimals, none when whole
        points = f"{sum(q['normalized'] for q in self.per_question):.2f}".removesuffix(".00")
        lines = [
            f"questions    {self.total} (answered {self.answered}, unanswered {self.unanswered})",
            f"exact match  {self.exact:.3f} ({exact_hits}/{self.total})",
            f"normalized   {self.normalized:.3f} ({points}/{self.total})",
        ]
        if self.unanswered:
            lines.append(f"unanswered questions count as wrong ({self.unanswered})")
        if self.extra:
            lines.append(f"ignored {self.extra} answer(s) whose question_id is not in the truth file")
        return "\n".join(lines)


def _read_jsonl(path: Path, kind: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line."""
    if not path.is_file():
        raise QllavaError(f"{kind} file `{path}` not found")
    try:
        # utf-8-sig: files saved by some Windows editors start with a BOM, which json.loads rejects
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QllavaError(f"{kind} file `{path}` is not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_jsonl(text, path)


def _question_id(record: object, path: Path, lineno: int, expected: str) -> str:
    if not isinstance(record, dict):
        raise QllavaError(f"{path}:{lineno}: expected a JSON object with {expected}, got {type(record).__name__}")
    if "question_id" not in record:
        raise QllavaError(f"{path}:{lineno}: no `question_id`; expected an object with {expected}")
    qid = record["question_id"]
    # bool is an int subclass, and str(True) would silently match an id "True"
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise QllavaError(f"{path}:{lineno}: `question_id` must be an integer or a string, got {json.dumps(qid)}")
    return str(qid)


def _check_unique(qid: str, seen: dict[str, int], path: Path, lineno: int) -> None:
    if qid in seen:
        raise QllavaError(f"{path}:{lineno}: question_id {qid!r} appears again (first on line {seen[qid]})")
    seen[qid] = lineno


def _read_answers(path: Path) -> dict[str, str]:
    predictions: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, record in _read_jsonl(path, "answers"):
        qid = _question_id(record, path, lineno, "`question_id` and `text`")
        if "text" not in record:
            raise QllavaError(f"{path}:{lineno}: no `text` (the model's answer) for question_id {qid!r}")
        text = record["text"]
        if not isinstance(text, str):
            raise QllavaError(f"{path}:{lineno}: `text` must be a string, got {json.dumps(text)}")
        _check_unique(qid, lines, path, lineno)
        predictions[qid] = text
    return predictions


def _truth_strings(record: dict, path: Path, lineno: int, qid: str) -> tuple[list[str], bool]:
    """(truth answers, whether they are human answers for the 3-of-N rule)."""
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list) or not answers:
            raise QllavaError(f"{path}:{lineno}: `answers` of question_id {qid!r} must be a non-empty list")
        strings = []
        for entry in answers:
            value = entry.get("answer") if isinstance(entry, dict) else entry
            if not isinstance(value, str):
                raise QllavaError(
                    f"{path}:{lineno}: each of `answers` of question_id {qid!r} must be a string or an object "
                    f"with a string `answer`, got {json.dumps(entry)}"
                )
            strings.append(value)
        return strings, len(strings) >= _VQA_AGREEMENT
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise QllavaError(
                f"{path}:{lineno}: `answer` of question_id {qid!r} must be a string, got {json.dumps(answer)}"
            )
        return [answer], False
    raise QllavaError(f"{path}:{lineno}: no `answer` or `answers` for question_id {qid!r}")


def _score(prediction: str, truth: list[str], human_votes: bool) -> tuple[int, float]:
    exact = int(prediction.strip() in {t.strip() for t in truth})
    normalized = normalize_answer(prediction)
    matches = sum(normalize_answer(t) == normalized for t in truth)
    if human_votes:
        return exact, min(1.0, matches / _VQA_AGREEMENT)
    return exact, float(matches > 0)


def score_answers(answers_path: str | Path, truth_path: str | Path) -> ScoreReport:
    """Score a `model_vqa` answers file against a truth file (formats and rules in the module docstring)."""
    answers_path, truth_path = Path(answers_path), Path(truth_path)
    predictions = _read_answers(answers_path)
    rows = _read_jsonl(truth_path, "truth")
    if not rows:
        raise QllavaError(f"truth file `{truth_path}` has no questions (it is empty)")
    per_question = []
    lines: dict[str, int] = {}
    for lineno, record in rows:
        qid = _question_id(record, truth_path, lineno, "`question_id` and `answer` or `answers`")
        truth, human_votes = _truth_strings(record, truth_path, lineno, qid)
        _check_unique(qid, lines, truth_path, lineno)
        prediction = predictions.get(qid)
        exact, normalized = (0, 0.0) if prediction is None else _score(prediction, truth, human_votes)
        per_question.append(
            {
                "question_id": record["question_id"],
                "prediction": prediction,
                "truth": truth,
                "exact": exact,
                "normalized": normalized,
            }
        )
    total = len(per_question)
    answered = sum(q["prediction"] is not None for q in per_question)
    return ScoreReport(
        total=total,
        answered=answered,
        unanswered=total - answered,
        extra=sum(qid not in lines for qid in predictions),
        exact=sum(q["exact"] for q in per_question) / total,
        normalized=sum(q["normalized"] for q in per_question) / total,
        per_question=per_question,
    )
