"""``ciuic-lab export``: every format from one command, one JSON object out, bad input one line and exit 2."""

import json

import pytest

from ciuic_lab.cli import main
from ciuic_lab.export.ciuic import load_saved


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_ciuic_then_gguf_from_the_saved_model(capsys, tmp_path):
    rc, out, _ = run(capsys, "export", "--model", "tiny-deepseek-random", "--recipe", "mixed", "--format", "ciuic",
                     "--out", str(tmp_path / "saved"), "--json")
    data = json.loads(out)
    assert rc == 0 and data["format"] == "ciuic" and data["quantized_sites"] > 0
    model, _, plan = load_saved(tmp_path / "saved")
    assert plan.recipe.name == "mixed"
    # a saved model exports as it is, with its own plan
    rc, out, _ = run(capsys, "export", "--model", str(tmp_path / "saved"), "--format", "gguf",
                     "--out", str(tmp_path / "m.gguf"), "--json")
    data = json.loads(out)
    assert rc == 0 and data["arch"] == "deepseek2" and data["tensor_types"]["Q8_0"] > 0
    assert data["model"]["family"] == "deepseek_v3"


@pytest.mark.parametrize("fmt,name", [("llama.cpp", "types.txt"), ("torchao", "ta.py"), ("gptqmodel", "g.json")])
def test_export_plan_formats(capsys, tmp_path, fmt, name):
    rc, out, _ = run(capsys, "export", "--model", "tiny-deepseek-random", "--recipe", "int4-g128", "--format", fmt,
                     "--out", str(tmp_path / name))
    assert rc == 0 and f"{fmt}: wrote {tmp_path / name}" in out
    assert (tmp_path / name).read_text()


def test_export_compressed_readable(capsys, tmp_path):
    rc, out, _ = run(capsys, "export", "--model", "tiny-deepseek-random", "--recipe", "int8", "--format",
                     "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert rc == 0 and "group_0:" in out and "int8 channel sym (pack-quantized)" in out
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_export_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--model", "tiny-deepseek-random", "--recipe", "int9", "--format", "ciuic",
                     "--out", str(tmp_path / "x"))
    assert rc == 2 and err.count("\n") == 1 and "unknown recipe 'int9'" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("")
    rc, _, err = run(capsys, "export", "--model", "tiny-deepseek-random", "--format", "ciuic",
                     "--out", str(tmp_path / "full"))
    assert rc == 2 and "is not empty" in err
    with pytest.raises(SystemExit):
        main(["export", "--model", "tiny-deepseek-random", "--format", "onnx", "--out", str(tmp_path / "o")])
