"""Candidate directions: difference of means per (layer, position), normalised.

Arditi et al. (2024), eq. 1: r = mean(harmful activations) - mean(harmless activations),
one candidate per layer and post-instruction position, then normalised to unit length.

Projected variant (`projected=True`, "projected abliteration"): the component of r along the
harmless mean's direction is removed first, r <- r - (r.h) h with h = unit(harmless mean),
so ablating r does not also shrink what every prompt shares with the harmless ones.

Pure tensor functions; shapes (layers, positions, hidden). Saved with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EPS = 1e-12


def normalize(v: torch.Tensor) -> torch.Tensor:
    """v / |v| along the last axis (zero vectors stay zero)."""
    v = v.float()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


def project_out(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """v minus its component along u (last axis; u need not be unit)."""
    u = normalize(u)
    return v - (v * u).sum(-1, keepdim=True) * u


def difference_of_means(
    mean_a: torch.Tensor, mean_b: torch.Tensor, projected: bool = False
) -> torch.Tensor:
    """(..., d) unit directions mean_a - mean_b (a = harmful, b = harmless).

    With `projected`, the harmless mean's direction is projected out before normalising.
    """
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"mean shapes differ: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    diff = mean_a.float() - mean_b.float()
    if projected:
        diff = project_out(diff, mean_b.float())
    return normalize(diff)


def interpolate_layers(directions: torch.Tensor, layer: float, position: int = -1) -> torch.Tensor:
    """The unit direction at a fractional `layer`: linear blend of the two neighbours."""
    n = directions.shape[0]
    layer = min(max(layer, 0.0), n - 1.0)
    low = int(layer)
    high = min(low + 1, n - 1)
    frac = layer - low
    blend = (1 - frac) * directions[low, position] + frac * directions[high, position]
    return normalize(blend)


def save_directions(path: str | Path, directions: torch.Tensor, **extra: torch.Tensor) -> None:
    """directions.safetensors: "directions" (layers, positions, hidden) plus named extras."""
    tensors = {"directions": directions.float().contiguous().clone()}
    tensors.update({k: v.float().contiguous().clone() for k, v in extra.items()})
    save_file(tensors, str(path))


def load_directions(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
