"""
The vision-language connector: maps each CLIP patch feature (mm_hidden_size) to one LLM input embedding (hidden).

LLaVA (paper §4.1) used one linear layer; LLaVA-1.5 (§3.1 of "Improved Baselines") found a two-layer MLP
with GELU better: `mlp2x_gelu`. Built as the official nn.Sequential (llava/model/multimodal_projector/
builder.py), so the checkpoint keys are `0.weight`, `2.weight` (index 1 is the parameter-free GELU) and
`model.mm_projector.*` / `mm_projector.bin` files load with no renaming. Applied per token: no pooling.
"""
import re

import torch.nn as nn


def build_projector(kind: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if kind == "linear":                 # LLaVA v0/v1, and the default when a config names no projector type
        return nn.Linear(mm_hidden_size, hidden_size)
    if kind == "identity":
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m:
        raise ValueError(f"unknown projector type {kind!r}: expected linear, identity or mlpNx_gelu")
    layers = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(int(m.group(1)) - 1):
        # exact (erf) GELU, nn.GELU()'s default: the tanh approximation differs by up to 5e-4 (hf-parity.md §4)
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)
