from pathlib import Path

import pytest

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
