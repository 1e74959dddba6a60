"""One validation for `data check` and `train` (qllava/data/validate.py): what each reports, and that train
reports data problems before any weights load."""

import json
import shutil

import pytest

from qllava.errors import QllavaError
from tests.conftest import make_recipe, write_image
from tests.test_cli import qllava_here

# A question so long that, at data.max_length=64 on the tiny model, the image block fits and the reply does not.
LONG = {
    "id": "long",
    "image": "0.png",
    "conversations": [
        {"from": "human", "value": "<image>\n" + "What color is the shape? Describe the image. " * 2},
        {"from": "gpt", "value": "red"},
    ],
}


def _check(base, data, *overrides):
    """`qllava data check demo` on the tiny model and data: (exit code, stdout + stderr)."""
    result = qllava_here(
        "data",
        "check",
        "demo",
        f"model.base={base}",
        f"data.train={data / 'train.json'}",
        f"data.image_folder={data / 'images'}",
        "data.eval=null",
        *overrides,
    )
    return result.exit_code, result.output


def _add(data, *records):
    path = data / "train.json"
    path.write_text(json.dumps(json.loads(path.read_text()) + list(records)))


def test_check_fails_on_samples_that_lose_every_trained_token(tiny_base, tiny_data):
    # The issue: `data check` said "1 of them lose every trained token", then "no errors", exit 0.
    _add(tiny_data, LONG)
    code, text = _check(tiny_base, tiny_data, "data.max_length=64")
    assert code == 1, text
    assert "1 error(s)" in text, text
    assert "sample 'long'" in text and "trained tokens lie beyond data.max_length=64" in text, text
    assert "(1 of them lose every trained token, 3 part of their replies)" in text, text
    assert _check(tiny_base, tiny_data, "data.max_length=128")[0] == 0


def test_train_warns_at_start_about_truncation_and_duplicate_ids_and_reads_eval_images_from_their_folder(
    tiny_base, tiny_data, tmp_path, capsys
):
    from qllava.train.loop import train

    duplicate = dict(json.loads((tiny_data / "train.json").read_text())[0])
    _add(tiny_data, LONG, duplicate)
    # Eval images live in their own folder, which data.image_folder does not hold.
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    write_image(held_out / "e.png", (30, 30, 220))
    eval_file = tmp_path / "eval.json"
    convs = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "blue"}]
    eval_file.write_text(json.dumps([{"id": "e", "image": "e.png", "conversations": convs}]))
    recipe = make_recipe(
        tiny_base,
        tiny_data,
        tmp_path / "run",
        data={"max_length": 64, "eval": str(eval_file), "eval_image_folder": str(held_out)},
        train={"max_steps": 1, "grad_accum": 1},
    )
    train(recipe, progress=False)
    out = capsys.readouterr().out
    assert "at data.max_length=64, 1 of 14 samples lose every trained token" in out, out
    assert "and 3 lose part of their replies" in out, out  # the two-turn s1, s5 and s9
    assert "1 sample id(s) occur more than once ('s0' x2)" in out, out
    # The warnings come before the weights load (the model table follows them).
    assert out.index("lose every trained token") < out.index("LoRA adapters"), out
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["eval_loss"] > 0 for e in evals if "eval_loss" in e] == [True], evals


def test_check_caps_errors_and_names_the_folder_searched(tiny_base, tiny_data, tmp_path):
    for i in range(25):
        _add(tiny_data, {**LONG, "id": f"gone{i}", "image": f"gone{i}.png"})
    code, text = _check(tiny_base, tiny_data)
    assert code == 1 and "25 error(s)" in text, text
    assert f"image `gone0.png` not found in data.image_folder `{tiny_data / 'images'}`" in text, text
    assert text.count("  - ") == 20 and "... and 5 more" in text, text

    # A mistyped folder is one error, not one per sample.
    code, text = _check(tiny_base, tiny_data, f"data.image_folder={tmp_path / 'imgs'}")
    assert code == 1 and "1 error(s)" in text, text
    assert f"data.image_folder `{tmp_path / 'imgs'}` is not a folder (samples with an image need it)" in text, text
    # The eval set's images are in the same folder unless data.eval_image_folder says otherwise: still one error.
    eval_set = f"data.eval={tiny_data / 'train.json'}"
    code, text = _check(tiny_base, tiny_data, f"data.image_folder={tmp_path / 'imgs'}", eval_set)
    assert code == 1 and "1 error(s)" in text and "data.eval_image_folder" not in text, text


def test_check_refuses_an_empty_list_as_train_does(tiny_base, tiny_data):
    (tiny_data / "train.json").write_text("[]")
    code, text = _check(tiny_base, tiny_data)
    assert code == 1 and f"data.train `{tiny_data / 'train.json'}` holds no samples" in text, text


def test_check_gives_the_stage_1_message_for_text_only_data(tiny_base, tiny_data):
    captions = [
        {"id": f"c{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>"}]}
        for i in (0, 1, 2)
    ]
    for c, color in zip(captions, ("red", "green", "blue")):
        c["conversations"].append({"from": "gpt", "value": f"a {color} square"})
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]}
    (tiny_data / "train.json").write_text(json.dumps([*captions, text_only]))
    code, text = _check(tiny_base, tiny_data, "lora.enabled=false", "data.template=plain")
    assert code == 1, text
    assert "1 text-only sample(s) (such as 't'), but lora.enabled=false trains only the projector" in text, text
    assert "does the tokenizer know" not in text, text
    assert "4 samples: 3 valid" in text, text


def test_check_warns_about_duplicate_ids(tiny_base, tiny_data):
    records = json.loads((tiny_data / "train.json").read_text())
    _add(tiny_data, records[0], records[1], records[1])
    code, text = _check(tiny_base, tiny_data)
    assert code == 0, text
    assert "warning: " in text and "2 sample id(s) occur more than once ('s0' x2, 's1' x3)" in text, text

    # A sample without an id is named by its position: no duplicate of a sample whose id is that number.
    records = json.loads((tiny_data / "train.json").read_text())[:3]
    unnamed = {k: v for k, v in records[0].items() if k != "id"}
    (tiny_data / "train.json").write_text(json.dumps([unnamed, {**records[1], "id": "0"}, records[2]]))
    code, text = _check(tiny_base, tiny_data)
    assert code == 0 and "occur more than once" not in text, text


def _base_without_weights(tiny_base, tmp_path):
    """The tiny base's config and processor files, with a corrupt weights file."""
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    return broken


def _bad_role(data):
    records = json.loads((data / "train.json").read_text())
    records[2]["conversations"][0]["from"] = "robot"
    (data / "train.json").write_text(json.dumps(records))
    return {}, "unknown role 'robot'"


def _empty(data):
    (data / "train.json").write_text("[]")
    return {}, "holds no samples"


def _missing_image(data):
    (data / "images" / "0.png").unlink()
    return {}, "image `0.png` not found in data.image_folder"


def _text_only_on_stage_1(data):
    return {"lora": {"enabled": False}}, "text-only sample(s) (such as 't3'), but lora.enabled=false"


@pytest.mark.parametrize("broken_data", [_bad_role, _empty, _missing_image, _text_only_on_stage_1])
def test_train_reports_data_problems_before_loading_weights(tiny_base, tiny_data, tmp_path, broken_data):
    from qllava.train.loop import train

    sections, message = broken_data(tiny_data)
    recipe = make_recipe(_base_without_weights(tiny_base, tmp_path), tiny_data, tmp_path / "run", **sections)
    with pytest.raises(QllavaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(recipe, progress=False)


def test_the_corrupt_weights_of_that_test_do_fail_to_load(tiny_base, tiny_data, tmp_path):
    from qllava.train.loop import train

    recipe = make_recipe(_base_without_weights(tiny_base, tmp_path), tiny_data, tmp_path / "run")
    with pytest.raises(Exception) as raised:
        train(recipe, progress=False)
    assert "safetensors" in f"{type(raised.value).__module__} {raised.value}".lower(), repr(raised.value)


def test_show_accepts_negative_indexes(tiny_base, tiny_data):
    args = ["data", "show", "demo", f"model.base={tiny_base}", f"data.train={tiny_data / 'train.json'}"]
    args += [f"data.image_folder={tiny_data / 'images'}", "data.eval=null"]  # no demo asset: none is built
    last = qllava_here(*args, "--index", "-1")
    assert last.exit_code == 0 and last.output.startswith("sample 't11' ("), last.output
    assert "train.json[11])" in last.output, last.output
    assert qllava_here(*args, "--index", "-12").output.startswith("sample 's0' (")
    beyond = qllava_here(*args, "--index", "-13")
    assert beyond.exit_code == 1 and "--index -13 is out of range" in beyond.output, beyond.output


def test_merge_verification_reads_eval_images_from_the_eval_folder(tiny_base, tiny_data, tmp_path):
    from transformers import AutoConfig

    from qllava.export import _verification_inputs
    from qllava.model.load import load_processor

    held_out = tmp_path / "held-out"
    held_out.mkdir()
    write_image(held_out / "only-here.png")
    convs = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "eval.json").write_text(json.dumps([{"id": "e", "image": "only-here.png", "conversations": convs}]))
    data = {"eval": str(tmp_path / "eval.json"), "eval_image_folder": str(held_out)}
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", data=data)
    source, described, inputs = _verification_inputs(
        recipe, load_processor(tiny_base), AutoConfig.from_pretrained(tiny_base), 4
    )
    # The one eval sample comes first; train samples fill up the 4 prompts.
    assert source == f"{tmp_path / 'eval.json'} + {tiny_data / 'train.json'}", source
    assert described == f"1 samples of {tmp_path / 'eval.json'} and 3 samples of {tiny_data / 'train.json'}"
    assert inputs[0]["pixel_values"] is not None


def test_demo_paths_resolve_in_eval_image_folder():
    from qllava.demo import resolve_demo_paths
    from qllava.recipe import load_recipe

    recipe = resolve_demo_paths(load_recipe("demo", ["data.eval_image_folder=demo:images"]))
    assert recipe.data.eval_image_folder == recipe.data.image_folder != "demo:images"


def test_template_errors_name_the_sample(tiny_base, tiny_data):
    """The `plain` (stage-1) template takes one question and one reply: a multi-turn sample is named."""
    records = json.loads((tiny_data / "train.json").read_text())
    two_rounds = next(r for r in records if r.get("image") and len(r["conversations"]) >= 4)
    (tiny_data / "train.json").write_text(json.dumps([two_rounds]))
    code, text = _check(tiny_base, tiny_data, "data.template=plain")
    assert code == 1 and f"sample {two_rounds['id']!r} (" in text and "the `plain` template takes" in text, text
