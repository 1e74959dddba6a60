from pathlib import Path

import pytest
import yaml

from qllava.errors import QllavaError
from qllava.recipe import RECIPES_DIR, all_keys, build_recipe, field_docs, load_recipe, parse_overrides

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_starts_with_its_command(path: Path):
    recipe = load_recipe(path)
    assert recipe.model.base and recipe.data.train
    assert path.read_text().splitlines()[0].startswith("# qllava train ")


def test_shipped_recipes_are_found():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "llava-1.5-7b-qlora.yaml", "llava-1.5-7b-qlora-12gb.yaml", "llava-1.5-13b-qlora.yaml"} <= names


def test_every_key_has_a_docstring():
    docs = field_docs()
    missing = [k for k in all_keys() if not docs.get(k)]
    assert not missing


def test_overrides_are_parsed_as_yaml_and_applied():
    recipe = load_recipe(
        "demo", ["train.max_steps=20", "lora.target_modules=[q_proj,v_proj]", "output.dir=/tmp/x", "optim.lr=1e-4"]
    )
    assert recipe.train.max_steps == 20
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.output.dir == "/tmp/x"
    assert recipe.optim.lr == pytest.approx(1e-4)


def test_every_problem_is_reported_at_once_with_closest_key():
    with pytest.raises(QllavaError) as info:
        build_recipe(
            {
                "model": {"base": "m", "bitz": 4},
                "data": {"train": "t", "template": "vicuna"},
                "train": {"max_steps": "ten", "micro_batch_size": 0},
                "optimm": {},
            }
        )
    text = str(info.value)
    assert "5 problem(s)" in text
    assert "unknown key `model.bitz` (did you mean `model.bits`?)" in text
    assert "`train.max_steps`: expected an integer, got 'ten'" in text
    assert "`data.template` is 'vicuna'" in text and "did you mean `vicuna_v1`?" in text
    assert "`train.micro_batch_size` must be > 0" in text
    assert "unknown section `optimm` (did you mean `optim`?)" in text


def test_required_keys_and_bad_override_form():
    with pytest.raises(QllavaError, match="`model.base` is required"):
        build_recipe({"data": {"train": "t"}})
    with pytest.raises(QllavaError, match="section.key=value"):
        parse_overrides(["train.max_steps"])


def test_missing_recipe_file_names_shipped_ones():
    with pytest.raises(QllavaError, match="not found.*demo"):
        load_recipe("no-such-recipe.yaml")


# Keys with an unset state: a string whose empty value means "not set", or a key whose type admits None.
OPTIONAL = {
    "model.projector_from": "",
    "data.eval": "",
    "data.image_folder": "",
    "data.eval_image_folder": "",
    "data.system_prompt": None,
    "data.length_bucket": None,
    "train.resume": "",
}


@pytest.mark.parametrize("null", ["null", "~"])
@pytest.mark.parametrize("key", sorted(OPTIONAL))
def test_optional_keys_are_unset_by_null_in_overrides(key, null, tmp_path):
    # The issue: `data.eval=null` was refused with "expected a string, got None".
    section, name = key.split(".")
    value = "7" if key == "data.length_bucket" else "something"
    raw = {"model": {"base": "m"}, "data": {"train": "t"}}
    raw.setdefault(section, {})[name] = value  # set in the recipe file, unset on the command line
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, [f"{key}={null}"])
    assert getattr(getattr(recipe, section), name) == OPTIONAL[key]


def test_empty_override_still_unsets_a_string_key():
    assert load_recipe("demo", ["data.eval="]).data.eval == ""
    assert load_recipe("demo", ["data.eval=null"]).data.eval == ""


def test_optional_keys_are_unset_by_null_in_a_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  base: m\n  projector_from: ~\n"
        "data:\n  train: t\n  eval:\n  image_folder: null\n  eval_image_folder: ~\n"
        "  system_prompt: ~\n  length_bucket: null\n"
        "train:\n  resume: null\n"
    )
    recipe = load_recipe(path)
    assert {k: getattr(getattr(recipe, k.split(".")[0]), k.split(".")[1]) for k in OPTIONAL} == OPTIONAL


def test_schema_optional_keys_are_exactly_these():
    # A new key with an unset state must be added here on purpose; every other key refuses null.
    from qllava.recipe import optional_keys

    assert set(optional_keys()) == set(OPTIONAL)


@pytest.mark.parametrize("key", sorted(set(all_keys()) - set(OPTIONAL) - {"model.base", "data.train"}))
def test_keys_without_an_unset_state_refuse_null_naming_the_key(key):
    with pytest.raises(QllavaError) as info:
        load_recipe("demo", [f"{key}=null"])
    text = str(info.value)
    assert "1 problem(s)" in text
    assert f"`{key}` cannot be null" in text and "default" in text


@pytest.mark.parametrize("key", ["model.base", "data.train"])
def test_required_keys_refuse_null_as_required(key):
    with pytest.raises(QllavaError) as info:
        load_recipe("demo", [f"{key}=~"])
    text = str(info.value)
    assert "1 problem(s)" in text and f"`{key}` is required" in text


def test_an_unquoted_no_is_the_choice_no(tmp_path):
    """YAML 1.1 reads `no` as false; for a key whose choices include "no" it means that choice."""
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  base: m\ndata:\n  train: t\ntrain:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe("demo", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(QllavaError, match="data.packing"):  # a bool key keeps its bool
        load_recipe("demo", ["data.packing=maybe"])


@pytest.mark.parametrize(
    "override, problem",
    [
        # A key without its section means that key, not the closest section name.
        ("max_steps=20", "unknown section `max_steps` (did you mean `train.max_steps`?)"),
        ("optimm.lr=1", "unknown section `optimm` (did you mean `optim`?)"),
        ("train.max_step=20", "unknown key `train.max_step` (did you mean `train.max_steps`?)"),
        # A key of another section: that key, not the closest name in this one (`train.resume`).
        ("train.lr=1", "unknown key `train.lr` (did you mean `optim.lr`?)"),
        ("train.mixed_precision=fp8", "`train.mixed_precision` is 'fp8'"),
        ("model.base=", "`model.base` is required"),
    ],
)
def test_a_bad_override_is_named_as_the_override_not_blamed_on_the_file(override, problem):
    with pytest.raises(QllavaError) as info:
        load_recipe("demo", ["train.max_steps=3", override])
    text = str(info.value)
    assert "demo.yaml with 2 override(s) has 1 problem(s)" in text
    assert f"{problem}" in text and f"(from the override `{override}`)" in text


def test_a_problem_in_the_file_is_not_blamed_on_an_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: m}\ndata: {train: t}\ntrain: {max_step: 3}\n")
    with pytest.raises(QllavaError) as info:
        load_recipe(recipe, ["train.epochs=2"])
    assert "unknown key `train.max_step`" in str(info.value) and "from the override" not in str(info.value)
