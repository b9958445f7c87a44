"""The start every probe script shares (not a test): the library built for these sources and opened,
and the GPU with a generator seeded from ``$CIUIC_SEED``."""

from __future__ import annotations

import os

import torch

from ciuic_lab.kernels.cuda import LIBRARY, build


def start(default_seed: int) -> tuple[torch.device, torch.Generator]:
    """Build the library if this source tree has none yet, open it, and return the GPU and a generator
    on it seeded from ``$CIUIC_SEED`` (``default_seed`` when unset)."""
    build()
    LIBRARY.get()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(os.environ.get("CIUIC_SEED", str(default_seed))))
    return dev, gen
