"""Train an embedded DeepSeek-V3-architecture model on the standard-library corpus.

    python -m ciuic_lab.models.zoo.train --corpus .cache/zoo/corpus --out OUT --seed 0

The corpus directory is one built by :mod:`.corpus`; the tokenizer and the token ids are made there
by :mod:`.tokenizer` when missing. The model is transformers' ``DeepseekV3ForCausalLM`` (MLA with
low-rank q and kv projections, one dense layer, then MoE layers with routed experts, top-k, and a
shared expert), trained with AdamW and a warm-up + cosine schedule, in bf16 autocast on a GPU (fp32
on the CPU). Routing is kept balanced the DeepSeek-V3 way: the router's ``e_score_correction_bias``
is nudged after each step towards equal load (no gradient), plus a small batch-wise balance loss.
Residual dropout, when asked for, is applied by forward hooks during training only: the saved model
is a plain transformers checkpoint.

Given the seed, the run is deterministic: the initialisation, the order of the training windows and
the dropout masks come from seeded generators, and deterministic kernels are requested (on a GPU,
a few kernels have no deterministic variant; the run is then reproducible up to rounding).

The output directory gets ``config.json``, bf16 safetensors shards, ``generation_config.json``, the
tokenizer files, ``loss_curve.json`` / ``loss_curve.png``, ``metrics.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import CiuicError
from . import card
from .corpus import SEPARATOR, load_manifest
from .tokenizer import IDS_FILES, TOKENIZER_DIR, prepare

# ----------------------------------------------------------------------------------------- shapes
#: Model shapes. Every Linear's input width is a multiple of 128 in ``tiny-deepseek`` so that
#: group-128 quantization applies cleanly; ``smoke`` is for tests on the CPU.
PRESETS: dict[str, dict] = {
    "tiny-deepseek": dict(
        hidden_size=256,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=768,
        moe_intermediate_size=256,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=512,
    ),
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=64,
    ),
}


def make_config(preset: str, vocab_size: int, eot_id: int = 0):
    """A ``DeepseekV3Config`` for ``preset`` (a key of :data:`PRESETS`)."""
    from transformers import DeepseekV3Config

    if preset not in PRESETS:
        raise CiuicError(f"unknown model preset {preset!r}; accepted: {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    return DeepseekV3Config(
        vocab_size=vocab_size,
        **shape,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=None,
        use_cache=True,
    )


def build_model(config, attn_implementation: str = "sdpa", experts_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation}
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_config(config, **kw)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ run config
@dataclass
class TrainConfig:
    corpus: str
    out: str
    seed: int = 0
    preset: str = "tiny-deepseek"
    vocab_size: int = 8192
    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-4
    eval_every: int = 100
    eval_windows: int = 256
    log_every: int = 20
    device: str = "auto"
    amp: str = "auto"
    attn_implementation: str = "sdpa"
    experts_implementation: str = "auto"
    max_shard_size: str = "15MB"
    deterministic: bool = True
    stop_after: int = 0
    time_limit: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise CiuicError(f"device {name!r} is not supported; accepted: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise CiuicError("device 'cuda' was asked for but torch sees no CUDA device; accepted: auto, cpu")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"bf16": torch.bfloat16, "fp32": None, "none": None}
    if name not in table:
        raise CiuicError(f"amp {name!r} is not supported; accepted: auto, bf16, fp32")
    return table[name]


def set_determinism(seed: int, deterministic: bool) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# ------------------------------------------------------------------------------------------- data
class WindowSampler:
    """Shuffled non-overlapping windows of ``seq_len + 1`` tokens, a fresh random phase each epoch."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int):
        if n_tokens < seq_len + 2:
            raise CiuicError(f"corpus has {n_tokens} tokens, fewer than seq_len+2={seq_len + 2}; use a smaller --seq-len")
        self.n, self.t = n_tokens, seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._queue = torch.empty(0, dtype=torch.long)

    def _refill(self) -> None:
        phase = int(torch.randint(0, self.t, (1,), generator=self.gen))
        n_win = (self.n - 1 - phase) // self.t
        starts = phase + self.t * torch.randperm(n_win, generator=self.gen)
        self._queue = torch.cat([self._queue, starts])
        self.epoch += 1

    def next(self, batch: int) -> torch.Tensor:
        while self._queue.numel() < batch:
            self._refill()
        out, self._queue = self._queue[:batch], self._queue[batch:]
        return out


def gather_windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    idx = starts.to(ids.device)[:, None] + torch.arange(length, device=ids.device)[None, :]
    return ids[idx]


def eval_starts(n_tokens: int, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    starts = torch.arange(0, n_tokens - seq_len - 1 + 1, seq_len)
    return starts if max_windows is None else starts[:max_windows]


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int, batch: int, amp: torch.dtype | None, max_windows=None) -> float:
    """Mean next-token NLL over non-overlapping windows of the held-out ids."""
    was_training = model.training
    model.eval()
    starts = eval_starts(ids.numel(), seq_len, max_windows)
    total, count = torch.zeros((), device=ids.device, dtype=torch.float64), 0
    for i in range(0, starts.numel(), batch):
        w = gather_windows(ids, starts[i : i + batch], seq_len + 1)
        with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=w[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += nll.double()
        count += w[:, 1:].numel()
    model.train(was_training)
    return float(total) / max(count, 1)


# ------------------------------------------------------------------------------------ routing
def routers(model) -> list[torch.nn.Module]:
    """The MoE routers (modules with a top-k and an ``e_score_correction_bias``), in layer order."""
    return [m for m in model.modules() if hasattr(m, "e_score_correction_bias") and hasattr(m, "top_k")]


class RouterMonitor:
    """Forward hooks on the routers: per-expert token counts and the batch-wise balance loss."""

    def __init__(self, model, aux_loss_coef: float = 0.0):
        self.routers = routers(model)
        self.aux_loss_coef = aux_loss_coef
        self.counts = [None] * len(self.routers)
        self.aux_terms: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        def hook(module, args, output):
            router_logits, _, topk_idx = output
            e = module.e_score_correction_bias.numel()
            c = torch.bincount(topk_idx.reshape(-1), minlength=e).float()
            self.counts[i] = c if self.counts[i] is None else self.counts[i] + c
            if module.training and self.aux_loss_coef > 0:
                t, k = topk_idx.shape
                scores = router_logits.float().sigmoid()
                p = (scores / scores.sum(-1, keepdim=True)).mean(0)
                f = c * (e / (k * t))
                self.aux_terms.append((f.detach() * p).sum())

        return hook

    def take_aux_loss(self) -> torch.Tensor | None:
        if not self.aux_terms:
            return None
        loss = self.aux_loss_coef * torch.stack(self.aux_terms).sum()
        self.aux_terms = []
        return loss

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: lower the bias of overloaded experts."""
        for r, c in zip(self.routers, self.counts):
            if c is not None and rate > 0:
                r.e_score_correction_bias.sub_(rate * torch.sign(c - c.mean()).to(r.e_score_correction_bias.dtype))

    def take_counts(self) -> list[torch.Tensor | None]:
        out, self.counts = self.counts, [None] * len(self.routers)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def load_fractions(counts: list[torch.Tensor | None], top_k: int) -> list[list[float]]:
    """Per layer, the fraction of tokens routed to each expert (a token picks top_k experts)."""
    out = []
    for c in counts:
        if c is None:
            continue
        n_tokens = float(c.sum()) / top_k
        out.append([float(x) / max(n_tokens, 1.0) for x in c.cpu()])
    return out


# ------------------------------------------------------------------------------------ dropout
class ResidualDropout:
    """Dropout on the embedding output and on each attention / MLP output, during training only."""

    def __init__(self, model, p: float):
        self.p = p
        self.handles = []
        if p <= 0:
            return
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        targets = [base.embed_tokens] + [m for layer in base.layers for m in (layer.self_attn, layer.mlp)]
        for m in targets:
            self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):
            return (F.dropout(output[0], self.p, True),) + tuple(output[1:])
        return F.dropout(output, self.p, True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -------------------------------------------------------------------------------------- train
def _versions() -> dict:
    import tokenizers
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "tokenizers": tokenizers.__version__}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def train(cfg: TrainConfig) -> dict:
    """Run one training; write the model directory to ``cfg.out``; return the training metrics."""
    from transformers import AutoTokenizer, GenerationConfig

    t_start = time.perf_counter()
    corpus = Path(cfg.corpus)
    manifest = load_manifest(corpus)
    tok_summary = prepare(corpus, cfg.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(corpus / TOKENIZER_DIR)
    eot = tokenizer.convert_tokens_to_ids(SEPARATOR)

    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    set_determinism(cfg.seed, cfg.deterministic)

    ids = {k: torch.from_numpy(np.load(corpus / f).astype(np.int64)).to(device) for k, f in IDS_FILES.items()}
    config = make_config(cfg.preset, len(tokenizer), eot)
    config.max_position_embeddings = max(config.max_position_embeddings, cfg.seq_len)
    experts_impl = None if cfg.experts_implementation == "auto" else cfg.experts_implementation
    model = build_model(config, cfg.attn_implementation, experts_impl).to(device)
    n_params = count_params(model)
    model.train()

    monitor = RouterMonitor(model, cfg.aux_loss_coef)
    dropout = ResidualDropout(model, cfg.dropout)
    sampler = WindowSampler(ids["train"].numel(), cfg.seq_len, cfg.seed)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=1e-8, fused=fused)
    top_k = config.num_experts_per_tok

    curve = {"step": [], "train_loss": [], "lr": [], "tokens": [], "epoch": [], "eval_step": [], "heldout_loss": [],
             "expert_load_max": [], "expert_load_min": [], "seconds": []}
    tokens_per_step = cfg.batch_size * cfg.seq_len
    acc_loss = torch.zeros((), device=device)
    acc_n = 0
    t_loop = time.perf_counter()
    t_log = t_loop
    print(f"model {cfg.preset}: {n_params / 1e6:.2f} M parameters; train tokens {ids['train'].numel()}, "
          f"held-out tokens {ids['heldout'].numel()}; device {device}, amp {amp}; "
          f"experts {model.config._experts_implementation}", flush=True)

    stopped = None
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        w = gather_windows(ids["train"], sampler.next(cfg.batch_size), cfg.seq_len + 1)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=w[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        aux = monitor.take_aux_loss()
        total = loss if aux is None else loss + aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        monitor.update_bias(cfg.bias_update_rate)
        counts = monitor.take_counts()
        acc_loss += loss.detach()
        acc_n += 1

        over_time = cfg.time_limit > 0 and time.perf_counter() - t_loop > cfg.time_limit
        stop_now = cfg.stop_after > 0 and step + 1 >= cfg.stop_after
        last = step == cfg.steps - 1 or over_time or stop_now
        if (step + 1) % cfg.log_every == 0 or last:
            mean_loss = float(acc_loss) / acc_n
            acc_loss.zero_()
            acc_n = 0
            loads = load_fractions(counts, top_k)
            now = time.perf_counter()
            tps = tokens_per_step * cfg.log_every / max(now - t_log, 1e-9)
            t_log = now
            curve["step"].append(step + 1)
            curve["train_loss"].append(round(mean_loss, 5))
            curve["lr"].append(lr)
            curve["tokens"].append((step + 1) * tokens_per_step)
            curve["epoch"].append(round((step + 1) * tokens_per_step / ids["train"].numel(), 3))
            curve["expert_load_max"].append(round(max(max(x) for x in loads), 4) if loads else None)
            curve["expert_load_min"].append(round(min(min(x) for x in loads), 4) if loads else None)
            msg = (f"step {step + 1}/{cfg.steps} loss {mean_loss:.4f} lr {lr:.2e} {tps / 1e3:.0f}k tok/s "
                   f"epoch {curve['epoch'][-1]:.2f}")
            if loads:
                msg += f" load max {curve['expert_load_max'][-1]:.3f} min {curve['expert_load_min'][-1]:.3f}"
            if (step + 1) % cfg.eval_every == 0 or last:
                hl = heldout_loss(model, ids["heldout"], cfg.seq_len, cfg.batch_size, amp, cfg.eval_windows)
                monitor.take_counts()
                curve["eval_step"].append(step + 1)
                curve["heldout_loss"].append(round(hl, 5))
                msg += f" | held-out loss {hl:.4f} ppl {math.exp(hl):.2f}"
            curve["seconds"].append(round(now - t_loop, 2))
            print(msg, flush=True)
        if over_time or stop_now:
            why = f"time limit {cfg.time_limit:.0f} s reached" if over_time else f"--stop-after {cfg.stop_after}"
            print(f"{why}: stopping after step {step + 1} of {cfg.steps}", flush=True)
            stopped = f"{why}: stopped after step {step + 1} of {cfg.steps}"
            break

    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_loop
    steps_done = step + 1
    monitor.remove()
    dropout.remove()

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, cfg.max_shard_size)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False,
                     max_new_tokens=128).save_pretrained(out)
    (out / "loss_curve.json").write_text(json.dumps(curve) + "\n", encoding="utf-8")
    png = plot_curve(curve, out / "loss_curve.png")

    final_hl = curve["heldout_loss"][-1]
    metrics = {
        "training": {
            "command": "python -m ciuic_lab.models.zoo.train " + " ".join(cli_args(cfg)),
            "config": asdict(cfg),
            "parameters": n_params,
            "corpus_sha256": manifest["corpus_sha256"],
            "corpus_files": manifest["n_files"],
            "corpus_bytes": manifest["bytes"],
            "tokens": tok_summary["tokens"],
            "bytes_per_token": tok_summary["bytes_per_token"],
            "steps_done": steps_done,
            "stopped_early": stopped,
            "tokens_seen": steps_done * tokens_per_step,
            "epochs": round(steps_done * tokens_per_step / ids["train"].numel(), 2),
            "final_train_loss": curve["train_loss"][-1],
            "final_heldout_loss": final_hl,
            "final_heldout_ppl": round(math.exp(final_hl), 3),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "amp": str(amp).replace("torch.", "") if amp is not None else "fp32",
            "experts_implementation": model.config._experts_implementation,
            "loss_curve_png": png,
            "versions": _versions(),
        }
    }
    card.update_metrics(out, metrics)
    card.render(out)
    return metrics["training"]


def save_model(model, out: Path, max_shard_size: str) -> None:
    """Save as bf16 safetensors shards; the router bias stays fp32 (as transformers keeps it)."""
    model = model.to(torch.bfloat16)
    for r in routers(model):
        r.e_score_correction_bias.data = r.e_score_correction_bias.data.float()
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    model.save_pretrained(out, max_shard_size=max_shard_size)


def plot_curve(curve: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(curve["step"], curve["train_loss"], label="train", lw=1.2)
    ax.plot(curve["eval_step"], curve["heldout_loss"], "o-", label="held-out", lw=1.2, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("tiny-deepseek training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- cli
_FLAGS = list(TrainConfig.__dataclass_fields__)


def cli_args(cfg: TrainConfig) -> list[str]:
    """The command-line flags that reproduce ``cfg`` (paths included)."""
    out = []
    for name in _FLAGS:
        v = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + name.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.models.zoo.train", description=__doc__.split("\n")[0])
    defaults = TrainConfig(corpus="", out="")
    for name in _FLAGS:
        flag = "--" + name.replace("_", "-")
        d = getattr(defaults, name)
        if name in ("corpus", "out"):
            ap.add_argument(flag, required=True)
        elif isinstance(d, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=d)
        else:
            ap.add_argument(flag, type=type(d), default=d)
    ns = ap.parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 2 or cfg.warmup < 1:
        raise CiuicError("steps, batch-size and warmup must be >= 1 and seq-len >= 2")
    if not 0 <= cfg.dropout < 1:
        raise CiuicError(f"dropout={cfg.dropout} is out of range; accepted: 0 <= dropout < 1")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    m = train(cfg)
    print(json.dumps({k: m[k] for k in ("parameters", "final_train_loss", "final_heldout_loss", "final_heldout_ppl",
                                        "train_seconds", "epochs")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
