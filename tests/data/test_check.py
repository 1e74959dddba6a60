"""`qllava data check` finds each planted problem with the expected message; `data show` marks labels."""

import json

import pytest

from qllava.data.check import check_dataset, show_sample
from tests.conftest import make_recipe, write_image
from tests.test_cli import qllava, qllava_here

PLANTED = [
    (
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
        },
        "sample 'missing' (DATA[12]): image `nope.png` not found",
    ),
    (
        {
            "id": "corrupt",
            "image": "corrupt.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
        },
        "sample 'corrupt' (DATA[13]): image `corrupt.png` cannot be decoded",
    ),
    (
        {"id": "role", "conversations": [{"from": "robot", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        "sample 'role' (DATA[14]): turn 0 has unknown role 'robot'",
    ),
    (
        {"id": "noreply", "conversations": [{"from": "human", "value": "Q?"}]},
        "sample 'noreply' (DATA[15]): no assistant (gpt) turn",
    ),
    (
        {
            "id": "tags",
            "image": "0.png",
            "conversations": [{"from": "human", "value": "<image>\n<image>\nQ?"}, {"from": "gpt", "value": "A."}],
        },
        "sample 'tags' (DATA[16]): 2 `<image>` tag(s) but 1 image(s)",
    ),
    (
        {
            "id": "tagnoimage",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
        },
        "sample 'tagnoimage' (DATA[17]): 1 `<image>` tag(s) but 0 image(s)",
    ),
    (
        {"id": "empty", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "  "}]},
        "sample 'empty' (DATA[18]): turn 1 (gpt) has empty text",
    ),
]


def test_check_finds_every_planted_problem(tiny_base, tiny_data, tmp_path):
    records = json.loads((tiny_data / "train.json").read_text())
    records += [r for r, _ in PLANTED]
    data_file = tiny_data / "train.json"
    data_file.write_text(json.dumps(records))
    (tiny_data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    report = check_dataset(make_recipe(tiny_base, tiny_data, tmp_path / "run"))
    text = report.render().replace(str(data_file), "DATA")
    for _, message in PLANTED:
        assert message in text
    assert len(report.errors) == len(PLANTED)
    assert "19 samples: 12 valid (9 with an image, 3 text-only), 7 broken" in text

    result = qllava(
        "data",
        "check",
        "demo",
        f"model.base={tiny_base}",
        f"data.train={data_file}",
        f"data.image_folder={tiny_data / 'images'}",
        "data.eval=",
    )
    assert result.returncode == 1 and "7 error(s)" in result.stdout


def test_check_reports_lengths_and_trained_fraction(tiny_base, tiny_data, tmp_path):
    write_image(tiny_data / "images" / "x.png")
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", data={"max_length": 64})
    report = check_dataset(recipe)
    text = report.render()
    assert not report.errors, text
    assert "image tokens included, 16 per image" in text
    assert "over data.max_length=64:" in text and "trained tokens:" in text
    over = int(text.split("over data.max_length=64: ")[1].split()[0])
    assert 0 < over < 12, text


def test_show_marks_exactly_the_reply_tokens(tiny_base, tiny_data, tmp_path):
    text = show_sample(make_recipe(tiny_base, tiny_data, tmp_path / "run"), 1)
    assert "<image x16>" in text
    assert "[[ green</s>]]" in text and "[[ a green circle</s>]]" in text
    assert "What color is the shape? ASSISTANT:[[" in text


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    from qllava.data.dataset import read_records

    record = {"id": "u", "conversations": [{"from": "human", "value": "a\u2028b"}, {"from": "gpt", "value": "c"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert read_records(path) == [record, record]


def test_check_reports_samples_whose_image_block_the_limit_would_cut(tiny_base, tiny_data, tmp_path):
    # Training stops with this error at the sample; the check must name it beforehand.
    report = check_dataset(make_recipe(tiny_base, tiny_data, tmp_path / "run", data={"max_length": 20}))
    assert any("data.max_length=20 cuts the image tokens of sample 's0'" in e for e in report.errors)
    # A sample that parses but cannot be encoded is broken, not counted among those with an image, and so is one
    # that the limit leaves without a trained token (the 3 text-only samples here).
    assert "12 samples: 0 valid (0 with an image, 0 text-only), 12 broken" in report.render()
    assert sum("so it trains nothing" in e for e in report.errors) == 3


def test_percentile_lies_within_the_data_and_matches_inclusive_quantiles():
    import random
    import statistics

    from qllava.data.check import percentile

    assert percentile([10, 20, 30, 40, 50], 95) == 48
    assert percentile([10, 20, 30, 40, 50], 50) == 30
    assert (percentile([10, 20, 30, 40, 50], 0), percentile([10, 20, 30, 40, 50], 100)) == (10, 50)
    # The reported case: the "exclusive" quantiles extrapolated p95 past the largest of 5 lengths.
    assert percentile([100, 100, 100, 110, 115], 95) == 114
    assert [percentile([7], p) for p in (0, 50, 95, 100)] == [7, 7, 7, 7]
    rng = random.Random(0)
    for n in range(1, 30):
        values = [rng.randint(1, 500) for _ in range(n)]
        assert min(values) <= percentile(values, 95) <= max(values)
        if n > 1:
            assert percentile(values, 95) == pytest.approx(statistics.quantiles(values, n=20, method="inclusive")[18])


def _stat(text: str, name: str) -> int:
    return int(text.split(f" {name} ")[1].split(",")[0].split()[0])


def test_check_header_counts_valid_and_broken_samples_and_p95_is_within_min_max(tiny_base, tiny_data, tmp_path):
    # The case: 5 valid samples (4 with an image, 1 text-only) and 5 broken ones.
    valid = json.loads((tiny_data / "train.json").read_text())[:5]
    broken = [r for r, _ in PLANTED[:5]]
    data_file = tiny_data / "train.json"
    data_file.write_text(json.dumps(valid + broken))
    (tiny_data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = qllava_here(
        "data",
        "check",
        "demo",
        f"model.base={tiny_base}",
        f"data.train={data_file}",
        f"data.image_folder={tiny_data / 'images'}",
        "data.eval=null",
    )
    text = result.stdout
    assert "10 samples: 5 valid (4 with an image, 1 text-only), 5 broken" in text, text
    assert "5 error(s)" in text and result.exit_code == 1, text
    lengths = text.split("tokens per sample")[1]
    assert _stat(lengths, "min") <= _stat(lengths, "p95") <= _stat(lengths, "max"), lengths


def test_check_header_on_a_single_sample(tiny_base, tiny_data, tmp_path):
    data_file = tiny_data / "train.json"
    data_file.write_text(json.dumps(json.loads(data_file.read_text())[:1]))
    text = check_dataset(make_recipe(tiny_base, tiny_data, tmp_path / "run")).render()
    assert "1 sample: 1 valid (1 with an image, 0 text-only), 0 broken" in text, text
    lengths = text.split("tokens per sample")[1]
    assert _stat(lengths, "min") == _stat(lengths, "p95") == _stat(lengths, "max"), lengths


def test_check_reports_the_anyres_image_token_distribution(tiny_next, tmp_path):
    """min / median / max image tokens per image equal the counts the HF processor's own `__call__` gives those
    images, and the longest sample is named with its length."""
    import statistics

    from PIL import Image
    from transformers import AutoProcessor

    from tests.conftest import write_color_data

    sizes = ((40, 28), (64, 64), (5, 300), (300, 64), (33, 65))  # (width, height): wide, square, tall, tiny
    (tmp_path / "data").mkdir()
    data = write_color_data(tmp_path / "data", 12, sizes=sizes)
    recipe = make_recipe(tiny_next, data, tmp_path / "run", data={"max_length": 256})
    text = check_dataset(recipe).render()

    processor = AutoProcessor.from_pretrained(tiny_next)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    records = json.loads((data / "train.json").read_text())
    counts = {}
    for record in records:
        if "image" in record:
            image = Image.open(data / "images" / record["image"]).convert("RGB")
            ids = processor(images=image, text="<image>", return_tensors="pt")["input_ids"][0]
            counts[record["id"]] = int((ids == image_id).sum())
    values = list(counts.values())
    assert len(set(values)) >= 3, values  # the sizes make different tile grids
    expected = (
        f"image tokens per image (by its size): min {min(values)}, median {statistics.median(values):.0f}, "
        f"max {max(values)} over {len(values)} images"
    )
    assert expected in text, text
    longest = text.split("longest sample: ")[1].splitlines()[0]
    most = int(text.split("tokens per sample")[1].split("max ")[1].split()[0])
    assert longest.endswith(f", {most} tokens"), text
    sid = longest.split("'")[1]
    # The longest is a two-turn sample (odd index) whose image gets the most tokens among two-turn samples.
    two_turn = {r["id"]: counts[r["id"]] for r in records if "image" in r and int(r["id"][1:]) % 2}
    assert sid in two_turn and two_turn[sid] == max(two_turn.values()), (sid, two_turn)
