import json

import pytest

from ciuic_lab.errors import RecipeError
from ciuic_lab.recipe import PRESETS, load, parse


def test_presets_parse_and_roundtrip():
    for name in PRESETS:
        r = load(name)
        assert r.name == name
        assert parse(json.loads(r.to_json())).to_dict() == r.to_dict()


def test_file_and_text(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"name": "x", "rules": [{"match": "attn.*", "bits": 8}]}))
    assert load(str(p)).rules[0].fields == {"bits": 8}
    assert load('[{"match": "*", "bits": 4}]').rules[0].match == ("*",)
    assert load({"rules": [{"match": "*", "bits": "fp8_e4m3"}]}).rules[0].fields == {"bits": 8, "format": "fp8_e4m3"}


BAD = [
    ({"rules": [{"match": "*", "bits": 4, "colour": "red"}]}, "unknown key"),
    ({"rules": [{"match": "*", "bits": 1}]}, "bits=1"),
    ({"rules": [{"match": "*", "bits": 9}]}, "bits=9"),
    ({"rules": [{"match": "*", "bits": 3.5}]}, "integer"),
    ({"rules": [{"match": "*", "bits": "four"}]}, "integer"),
    ({"rules": [{"match": "*", "bits": True}]}, "integer"),
    ({"rules": [{"match": "*", "bits": 4, "group": 0}]}, "positive"),
    ({"rules": [{"match": "*", "bits": 4, "group": -128}]}, "positive"),
    ({"rules": [{"match": "*", "bits": 4, "scheme": "nf4"}]}, "scheme"),
    ({"rules": [{"bits": 4}]}, "'match' is required"),
    ({"rules": [{"match": "", "bits": 4}]}, "glob"),
    ({"rules": [{"match": "*", "bits": 4, "blocks": "all"}]}, "blocks"),
    ({"rules": [{"match": "*", "bits": 4, "blocks": ["3-1"]}]}, "range"),
    ({"rules": {"match": "*"}}, "must be a list"),
    ({"rulez": []}, "unknown key"),
    ({"rules": [], "fusions": {"warp": True}}, "unknown fusion"),
    ({"rules": [], "kv_cache": "fp4"}, "kv_cache"),
    ("not-a-preset", "unknown recipe"),
    ("{\"rules\": [", "not valid JSON"),
    ("/no/such/recipe.json", "does not exist"),
    (42, "preset name"),
]


@pytest.mark.parametrize("recipe,message", BAD)
def test_bad_recipes_name_the_problem(recipe, message):
    with pytest.raises(RecipeError, match=message) as e:
        load(recipe)
    assert "\n" not in str(e.value)


def test_recipe_is_never_evaluated(tmp_path):
    # a recipe is data: Python in it is a string that matches nothing, never code that runs
    p = tmp_path / "evil.json"
    p.write_text(json.dumps({"rules": [{"match": "__import__('os').system('touch PWNED')", "bits": 4}]}))
    r = load(str(p))
    assert r.rules[0].match[0].startswith("__import__")
    assert not (tmp_path / "PWNED").exists()
