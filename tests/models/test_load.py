"""Loading: embedded models, local directories, and every way a checkpoint can be wrong."""

import json
import shutil
import warnings

import pytest
import torch

import ciuic_lab as cl
from ciuic_lab.errors import ModelLoadError
from ciuic_lab.models import family_of


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, t, _ = cl.load("tiny-deepseek-random")
    m.save_pretrained(d)
    t.save_pretrained(d)
    return d, m


def _copy(saved, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(saved[0], d)
    return d


def test_random_model_says_so_and_is_deterministic():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a = cl.load("tiny-deepseek-random")
    b = cl.load("tiny-deepseek-random")
    assert a.random_weights and a.family == "deepseek_v3"
    cfg = a.model.config
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.first_k_dense_replace == 1
    assert cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok == 2 and cfg.n_shared_experts == 1
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_local_directory_roundtrip(saved):
    d, m = saved
    loaded = cl.load(str(d))
    assert loaded.source == "local" and family_of(loaded.model) == "deepseek_v3"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, m(ids).logits)
    assert not loaded.trust_remote_code


def test_dtype_option(saved):
    assert next(cl.load(str(saved[0]), dtype="bf16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype 'fp7'"):
        cl.load(str(saved[0]), dtype="fp7")


def test_missing_and_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        cl.load(str(tmp_path / "nothing"))
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        cl.load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model 'nonsense'"):
        cl.load("nonsense")


def test_config_without_weights(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        cl.load(str(d))


def test_pickle_weights_are_not_loaded(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        cl.load(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(saved, tmp_path, damage):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelLoadError, match="cannot load model") as e:
        cl.load(str(d))
    assert "\n" not in str(e.value)


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 2048
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weights do not match config.json.*embed_tokens"):
        cl.load(str(d))


def test_tokenizer_larger_than_the_embedding(saved, tmp_path):
    d = _copy(saved, tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    for i in range(200):
        vocab[f"zzextra{i}"] = 5000 + i
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelLoadError, match="tokens but the model's embedding has 1024 rows"):
        cl.load(str(d))
