"""Plans and helpers shared by the export tests."""

import warnings

import torch

# A plan that touches every case the exporters map differently: symmetric and asymmetric groups, per
# channel and per tensor, fp8, a simulated router, the head, an expert with its own spec and a kept expert.
MIXED = {
    "name": "export-mixed",
    "rules": [
        {"match": "*", "bits": 4, "scheme": "sym", "group": 32},
        {"match": "attn.*", "bits": 8, "scheme": "sym", "group": "channel", "optional": True},
        {"match": "model.layers.*.self_attn.q_b_proj", "bits": 4, "scheme": "asym", "group": 64},
        {"match": "model.layers.0.mlp.*", "bits": 5, "scheme": "asym", "group": 128},
        {"match": "model.layers.*.mlp.shared_experts.*", "bits": 5, "scheme": "sym", "group": 32},
        {"match": "model.layers.1.mlp.experts.down_proj[3]", "bits": 3, "scheme": "sym", "group": 64},
        {"match": "model.layers.2.mlp.experts.gate_up_proj[5]", "bits": 16},
        {"match": "model.layers.2.self_attn.o_proj", "bits": "fp8_e4m3"},
        {"match": "model.layers.1.self_attn.o_proj", "bits": 8, "scheme": "asym", "group": 32},
        {"match": "model.layers.2.self_attn.q_a_proj", "bits": 6, "scheme": "asym", "group": 32},
        {"match": "model.layers.1.mlp.gate", "bits": 8, "scheme": "sym", "group": "channel"},
        {"match": "lm_head", "bits": 6, "scheme": "sym", "group": "tensor"},
    ],
}

# The same without anything a compressed-tensors checkpoint must convert (experts all of one symmetric spec).
UNIFORM_EXPERTS = {
    "name": "export-uniform-experts",
    "rules": [r for r in MIXED["rules"] if "experts." not in r["match"]],
}


def load_tiny():
    from ciuic_lab import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load("tiny-deepseek-random")


def applied_tiny(recipe, fusions=None):
    from ciuic_lab import apply, resolve, sites

    loaded = load_tiny()
    r = dict(recipe, fusions=fusions or {})
    apply(loaded.model, resolve(r, sites(loaded.model)))
    return loaded


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.clone()


def dense_twin(loaded):
    """A fresh copy of the model whose every site holds, densely, the weight ``loaded`` computes with
    (dequantized where quantized, folded where the plan folds a norm, whose scale becomes ones)."""
    from ciuic_lab.export.common import applied
    from ciuic_lab.transforms.apply import fold_sources

    src = applied(loaded)
    twin = load_tiny().model
    with torch.no_grad():
        for name, site in src.sites.items():
            p = getattr(twin.get_submodule(site.module), site.param)
            w = src.site_weight(name)
            if site.role == "expert":
                p[site.expert].copy_(w)
            else:
                p.copy_(w.reshape(p.shape))
        if any(src.folded.values()):
            for norm in set(fold_sources(src.model, src.plan)[0].values()):
                twin.get_submodule(norm).weight.fill_(1.0)
    return twin
