import json
from pathlib import Path

import pytest

from qllava.errors import QllavaError
from qllava.score import ScoreReport, normalize_answer, score_answers


def write_jsonl(path: Path, records) -> Path:
    """Records are dicts (dumped as JSON) or raw strings (written verbatim, for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def answer(qid, text):
    """A line as LLaVA's model_vqa writes it."""
    return {
        "question_id": qid,
        "prompt": "What is it?",
        "text": text,
        "answer_id": "x",
        "model_id": "m",
        "metadata": {},
    }


def score(tmp_path: Path, answers, truth) -> ScoreReport:
    return score_answers(write_jsonl(tmp_path / "answers.jsonl", answers), write_jsonl(tmp_path / "truth.jsonl", truth))


def score_error(tmp_path: Path, answers, truth) -> str:
    with pytest.raises(QllavaError) as info:
        score(tmp_path, answers, truth)
    return str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("  RED  ", "red"),
        ("two", "2"),
        ("Ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("eleven", "eleven"),
        ("the dog", "dog"),
        ("A cat and an apple", "cat and apple"),
        ("theater", "theater"),
        ("yes.", "yes"),
        ("yes!", "yes"),
        ('"yes"', "yes"),
        ("u.s.", "us"),
        ("2.5", "2.5"),
        ("3.", "3"),
        (".5", ".5"),
        ("1,000", "1000"),
        ("1, 2", "1 2"),
        ("yes, it is", "yes it is"),
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("snake_case", "snake case"),
        ("don't", "dont"),
        ("it\u2019s", "its"),
        ("'ok'", "ok"),
        ("50%", "50"),
        ("two  dogs\n\ton the\tgrass", "2 dogs on grass"),
        ("Café", "café"),
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_is_case_sensitive_but_normalized_is_not(tmp_path):
    report = score(
        tmp_path,
        [answer(1, " red "), answer(2, "Red"), answer(3, "Two."), answer(4, "blue")],
        [
            {"question_id": 1, "answer": "red"},
            {"question_id": 2, "answer": "red"},
            {"question_id": 3, "answer": "2"},
            {"question_id": 4, "answer": "red"},
        ],
    )
    assert [q["exact"] for q in report.per_question] == [1, 0, 0, 0]
    assert [q["normalized"] for q in report.per_question] == [1.0, 1.0, 1.0, 0.0]
    assert report.exact == pytest.approx(0.25)
    assert report.normalized == pytest.approx(0.75)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0), (10, 1.0)])
def test_vqa_formula_three_of_ten(tmp_path, matches, expected):
    humans = ["Two"] * matches + ["three"] * (10 - matches)
    report = score(tmp_path, [answer(7, "2")], [{"question_id": 7, "answers": humans}])
    assert report.per_question[0]["normalized"] == pytest.approx(expected)
    assert report.normalized == pytest.approx(expected)
    assert report.exact == 0.0  # "2" is not literally "Two"


def test_two_of_ten_rounds_to_0667_in_the_summary(tmp_path):
    humans = ["yes", "yes"] + ["no"] * 8
    report = score(tmp_path, [answer(1, "Yes")], [{"question_id": 1, "answers": humans}])
    assert f"{report.normalized:.3f}" == "0.667"
    assert "normalized   0.667 (0.67/1)" in report.render()


def test_vqav2_annotation_dicts_are_accepted(tmp_path):
    humans = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 4)]
    humans += [{"answer": "no", "answer_confidence": "maybe", "answer_id": i} for i in range(4, 11)]
    report = score(
        tmp_path,
        [answer(1, "yes"), answer(2, "no")],
        [{"question_id": 1, "answers": humans}, {"question_id": 2, "answers": humans}],
    )
    assert report.per_question[0]["truth"] == ["yes"] * 3 + ["no"] * 7
    assert [q["normalized"] for q in report.per_question] == [1.0, 1.0]
    assert [q["exact"] for q in report.per_question] == [1, 1]


def test_exact_matches_any_of_the_answers(tmp_path):
    report = score(tmp_path, [answer(1, "no ")], [{"question_id": 1, "answers": ["yes", "yes", "yes", " no"]}])
    assert report.per_question[0]["exact"] == 1
    assert report.per_question[0]["normalized"] == pytest.approx(1 / 3)


def test_short_answer_lists_are_alternatives(tmp_path):
    # the 3-vote threshold cannot be met by fewer than 3 answers, so any match is right
    report = score(
        tmp_path,
        [answer(1, "kitten"), answer(2, "dog")],
        [{"question_id": 1, "answers": ["cat", "Kitten"]}, {"question_id": 2, "answers": ["cat"]}],
    )
    assert [q["normalized"] for q in report.per_question] == [1.0, 0.0]


def test_answers_wins_over_answer(tmp_path):
    truth = [{"question_id": 1, "answer": "yes", "answers": ["no"] * 10}]
    report = score(tmp_path, [answer(1, "yes")], truth)
    assert report.per_question[0]["truth"] == ["no"] * 10
    assert report.normalized == 0.0


def test_unanswered_and_extra(tmp_path):
    report = score(
        tmp_path,
        [answer(1, "red"), answer(99, "blue"), answer(100, "green")],
        [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "blue"}, {"question_id": 3, "answer": "x"}],
    )
    assert (report.total, report.answered, report.unanswered, report.extra) == (3, 1, 2, 2)
    # unanswered questions count as wrong: 1 right of 3, the extra "blue" for id 99 does not help id 2
    assert report.exact == pytest.approx(1 / 3)
    assert report.normalized == pytest.approx(1 / 3)
    assert report.per_question[1] == {
        "question_id": 2,
        "prediction": None,
        "truth": ["blue"],
        "exact": 0,
        "normalized": 0.0,
    }


def test_int_and_str_ids_match(tmp_path):
    report = score(
        tmp_path,
        [answer("1", "red"), answer(2, "blue")],
        [{"question_id": 1, "answer": "red"}, {"question_id": "2", "answer": "blue"}],
    )
    assert (report.answered, report.extra) == (2, 0)
    assert report.exact == 1.0
    # per_question keeps the id as the truth file spells it
    assert [q["question_id"] for q in report.per_question] == [1, "2"]


def test_per_question_is_in_truth_order(tmp_path):
    report = score(
        tmp_path,
        [answer("a", "one"), answer("c", "The cat"), answer("b", "no")],
        [
            {"question_id": "c", "answer": "cat"},
            {"question_id": "a", "answers": ["1"] * 2 + ["2"] * 8},
            {"question_id": "b", "answer": "yes"},
        ],
    )
    assert report.per_question == [
        {"question_id": "c", "prediction": "The cat", "truth": ["cat"], "exact": 0, "normalized": 1.0},
        {
            "question_id": "a",
            "prediction": "one",
            "truth": ["1"] * 2 + ["2"] * 8,
            "exact": 0,
            "normalized": pytest.approx(2 / 3),
        },
        {"question_id": "b", "prediction": "no", "truth": ["yes"], "exact": 0, "normalized": 0.0},
    ]
    assert report.normalized == pytest.approx((1 + 2 / 3) / 3)


def test_render(tmp_path):
    report = score(
        tmp_path,
        [answer(1, "red"), answer(2, "Blue"), answer(9, "x")],
        [{"question_id": i, "answer": a} for i, a in [(1, "red"), (2, "blue"), (3, "green"), (4, "pink")]],
    )
    text = report.render()
    assert text.splitlines()[:3] == [
        "questions    4 (answered 2, unanswered 2)",
        "exact match  0.250 (1/4)",
        "normalized   0.500 (2/4)",
    ]
    assert "unanswered questions count as wrong (2)" in text
    assert "ignored 1 answer(s)" in text


def test_render_is_short_when_all_answered(tmp_path):
    text = score(tmp_path, [answer(1, "red")], [{"question_id": 1, "answer": "red"}]).render()
    assert text.splitlines() == [
        "questions    1 (answered 1, unanswered 0)",
        "exact match  1.000 (1/1)",
        "normalized   1.000 (1/1)",
    ]


def test_empty_answers_file_leaves_everything_unanswered(tmp_path):
    report = score(tmp_path, [], [{"question_id": 1, "answer": "red"}])
    assert (report.answered, report.unanswered, report.exact, report.normalized) == (0, 1, 0.0, 0.0)


def test_blank_lines_crlf_bom_and_u2028_are_read(tmp_path):
    answers = tmp_path / "answers.jsonl"
    # U+2028 inside a JSON string must not split the line; CRLF endings and a BOM must not break parsing
    answers.write_text(
        "\ufeff"
        + json.dumps(answer(1, "line\u2028sep"), ensure_ascii=False)
        + "\r\n\r\n   \n"
        + json.dumps(answer(2, "b")),
        encoding="utf-8",
    )
    truth = write_jsonl(
        tmp_path / "truth.jsonl",
        ["", {"question_id": 1, "answer": "line\u2028sep"}, "  ", {"question_id": 2, "answer": "b"}],
    )
    report = score_answers(answers, truth)
    assert (report.total, report.answered, report.exact) == (2, 2, 1.0)


def test_accepts_str_paths(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [answer(1, "x")])
    write_jsonl(tmp_path / "t.jsonl", [{"question_id": 1, "answer": "x"}])
    assert score_answers(str(tmp_path / "a.jsonl"), str(tmp_path / "t.jsonl")).exact == 1.0


# --- errors: each names the file and, for a bad line, the line number


def test_missing_answers_file(tmp_path):
    truth = write_jsonl(tmp_path / "truth.jsonl", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(QllavaError, match=r"answers file `.*nope\.jsonl` not found"):
        score_answers(tmp_path / "nope.jsonl", truth)


def test_missing_truth_file(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer(1, "x")])
    with pytest.raises(QllavaError, match=r"truth file `.*gone\.jsonl` not found"):
        score_answers(answers, tmp_path / "gone.jsonl")


def test_empty_truth_file(tmp_path):
    message = score_error(tmp_path, [answer(1, "x")], ["", "  "])
    assert "truth.jsonl" in message and "no questions" in message


def test_not_utf8(tmp_path):
    (tmp_path / "answers.jsonl").write_bytes(b'{"question_id": 1, "text": "\xff"}\n')
    truth = write_jsonl(tmp_path / "truth.jsonl", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(QllavaError, match=r"answers\.jsonl` is not UTF-8"):
        score_answers(tmp_path / "answers.jsonl", truth)


@pytest.mark.parametrize(
    "answers, truth, where, words",
    [
        ([answer(1, "x"), "{not json"], [{"question_id": 1, "answer": "x"}], "answers.jsonl:2:", "not valid JSON"),
        ([answer(1, "x")], ["", '{"question_id": 1, "answer": "x"', ""], "truth.jsonl:2:", "not valid JSON"),
        (["[1, 2]"], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "got list"),
        ([answer(1, "x")], [{"question_id": 1, "answer": "x"}, '"text"'], "truth.jsonl:2:", "got str"),
        ([{"text": "x"}], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "no `question_id`"),
        ([answer(1, "x")], [{"answer": "x"}], "truth.jsonl:1:", "no `question_id`"),
        ([{"question_id": 1}], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "no `text`"),
        ([answer(1, None)], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "`text` must be a string"),
        ([answer(None, "x")], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "integer or a string"),
        ([answer(True, "x")], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "integer or a string"),
        ([answer(1.5, "x")], [{"question_id": 1, "answer": "x"}], "answers.jsonl:1:", "integer or a string"),
        ([answer(1, "x")], [{"question_id": 1}], "truth.jsonl:1:", "no `answer` or `answers`"),
        ([answer(1, "x")], [{"question_id": 1, "answer": 3}], "truth.jsonl:1:", "`answer` of question_id '1' must be"),
        ([answer(1, "x")], [{"question_id": 1, "answers": []}], "truth.jsonl:1:", "non-empty list"),
        ([answer(1, "x")], [{"question_id": 1, "answers": "yes"}], "truth.jsonl:1:", "non-empty list"),
        ([answer(1, "x")], [{"question_id": 1, "answers": ["a", 2]}], "truth.jsonl:1:", "got 2"),
        ([answer(1, "x")], [{"question_id": 1, "answers": [{"text": "a"}]}], "truth.jsonl:1:", "string `answer`"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, answers, truth, where, words):
    message = score_error(tmp_path, answers, truth)
    assert where in message
    assert words in message


def test_duplicate_answer_id(tmp_path):
    # 3 and "3" are the same question
    message = score_error(
        tmp_path, [answer(3, "a"), answer(4, "b"), answer("3", "c")], [{"question_id": 3, "answer": "a"}]
    )
    assert "answers.jsonl:3:" in message
    assert "'3' appears again (first on line 1)" in message


def test_duplicate_truth_id(tmp_path):
    truth = [{"question_id": "q", "answer": "a"}, "", {"question_id": "q", "answers": ["a"] * 10}]
    message = score_error(tmp_path, [answer("q", "a")], truth)
    assert "truth.jsonl:3:" in message
    assert "'q' appears again (first on line 1)" in message


def test_render_counts_points_on_large_sets():
    per_question = [{"exact": 0, "normalized": 2 / 3}] * 300_000 + [{"exact": 1, "normalized": 1 / 3}] * 1000
    report = ScoreReport(301_000, 301_000, 0, 0, 1000 / 301_000, 200_333.33 / 301_000, per_question)
    assert "exact match  0.003 (1000/301000)" in report.render()
    assert "normalized   0.666 (200333.33/301000)" in report.render()
    whole = ScoreReport(3, 3, 0, 0, 0.0, 1 / 3, [{"exact": 0, "normalized": 1 / 3}] * 3)
    assert "normalized   0.333 (1/3)" in whole.render()
