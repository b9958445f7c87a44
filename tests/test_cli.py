import json
import subprocess
import sys

import pytest

from ciuic_lab.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_layers_json(capsys):
    rc, out, _ = run(capsys, "layers", "--model", "tiny-deepseek-random", "--json")
    data = json.loads(out)
    assert rc == 0 and data["model"]["random_weights"] is True
    assert any(s["name"] == "model.layers.1.mlp.experts.down_proj[5]" for s in data["sites"])


def test_apply_json_keys(capsys):
    rc, out, _ = run(capsys, "apply", "--model", "tiny-deepseek-random", "--recipe", "int4-g128", "--json",
                     "--evalset", "tiny")
    data = json.loads(out)
    assert rc == 0
    for key in ("bits_per_weight", "weight_bytes", "kl", "top1_agreement", "perplexity", "latency_ms", "text"):
        assert key in data
    assert set(data["weight_bytes"]) >= {"before", "after"}
    assert set(data["perplexity"]) >= {"before", "after"}
    assert set(data["text"]) >= {"before", "after"}
    assert data["quantized_sites"]["ratio_vs_bf16"] <= 0.30
    assert data["quantized_sites"]["bits_per_weight_loaded"] == 32.0  # the embedded models load in fp32


@pytest.mark.parametrize("dtype,bits", [("fp32", "32"), ("bf16", "16")])
def test_apply_readable_states_the_loaded_bits(capsys, dtype, bits):
    rc, out, _ = run(capsys, "apply", "--model", "tiny-deepseek-random", "--recipe", "int8", "--evalset", "tiny",
                     "--no-timing", "--dtype", dtype)
    row = next(line for line in out.splitlines() if line.startswith("bits per weight"))
    assert rc == 0 and row.split()[-2] == bits and 8 < float(row.split()[-1]) < 8.5, row


def test_apply_readable(capsys):
    rc, out, _ = run(capsys, "apply", "--model", "tiny-deepseek-random", "--recipe", "int8", "--evalset", "tiny",
                     "--no-timing")
    assert rc == 0 and "perplexity" in out and "before |" in out and "after  |" in out


@pytest.mark.parametrize("argv,message", [
    (["apply", "--model", "no-such-model", "--recipe", "int4"], "unknown model 'no-such-model'"),
    (["apply", "--model", "/no/such/dir", "--recipe", "int4"], "no model at '/no/such/dir'"),
    (["apply", "--model", "tiny-deepseek-random", "--recipe", "int5-g7"], "unknown recipe 'int5-g7'"),
    (["apply", "--model", "tiny-deepseek-random", "--recipe", "/no/file.json"], "does not exist"),
    (["apply", "--model", "tiny-deepseek-random", "--recipe", "int4", "--device", "tpu"], "device 'tpu'"),
    (["apply", "--model", "tiny-deepseek-random", "--recipe", '{"rules":[{"match":"*","bits":9}]}'], "bits=9"),
    (["apply", "--model", "tiny-deepseek-random", "--recipe", '{"rules":[{"match":"zz*","bits":4}]}'],
     "matches no site"),
])
def test_errors_are_one_clear_line(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs_in_a_fresh_process(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = subprocess.run([sys.executable, "-m", "ciuic_lab.cli", "apply", "--model", "tiny-deepseek-random",
                        "--recipe", str(bad)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "is not valid JSON" in p.stderr and "Traceback" not in p.stderr
