"""Model-merging methods as pure tensor functions: one merged tensor from the inputs' tensors.

Every function takes the same-named tensor of each input model and returns the merged tensor,
computed in fp32 (fp64 inputs stay fp64); the caller casts it to the output dtype. The
definitions follow mergekit 0.1.5 exactly so that a mergekit config gives the same tensors
(tests/test_merge_parity.py checks this to 1e-6). Where mergekit departs from the paper the
docstring says so.

Simplified on purpose: one tensor at a time (mergekit stacks equally shaped tensors into
batches; the result is the same), no int8 sign masks (a memory trick with equal results).
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7  # mergekit's tolerance: below it an L1 norm counts as zero (no rescale)


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- interpolation


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True):
    """Weighted average of whole models ("model soups", Wortsman et al. 2022, arXiv:2203.05482).

    theta = sum_i w_i theta_i / sum_i w_i      (no division when normalize=False)

    Every input counts, the base model too if it is listed.
    """
    dtype = work_dtype(tensors[0])
    coefficients = torch.tensor(weights, dtype=dtype)  # (N,)
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, coefficient in zip(tensors, coefficients):
        out.addcmul_(tensor.to(dtype), coefficient)
    return out / coefficients.sum() if normalize else out


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical linear interpolation from v0 (the base, t=0) to v1 (t=1) (Shoemake 1985).

    Each tensor is one flattened vector. With cos(omega) = <v0/|v0|, v1/|v1|>:
        out = sin((1-t) omega)/sin(omega) * v0 + sin(t omega)/sin(omega) * v1
    and plain lerp (1-t) v0 + t v1 when |cos(omega)| > dot_threshold (nearly collinear or
    antipodal). As in mergekit the coefficients multiply the unnormalised tensors, so norms
    are interpolated too; a norm below eps counts as 1.
    """
    dtype = work_dtype(v0)
    a = v0.reshape(-1).to(dtype)  # (P,)
    b = v1.reshape(-1).to(dtype)  # (P,)
    t_ = torch.tensor(t, dtype=dtype)
    if a.numel() == 0:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    omega = torch.acos(dot)
    coef_a = torch.sin((1 - t_) * omega) / torch.sin(omega)
    coef_b = torch.sin(t_ * omega) / torch.sin(omega)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


# ----------------------------------------------------------------------------- sparsification


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale `kept` (a masked copy of `delta`) so its L1 norm equals delta's (mergekit's rescale)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, floor(density * numel)) largest |delta| entries, zero the rest (TIES "trim")."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    kept = delta * mask.reshape_as(delta)
    return rescale_l1(delta, kept) if rescale else kept


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE's drop (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099).

    m ~ Bernoulli(density) per entry;  delta' = m * delta, rescaled.
    The paper rescales by 1/density (= 1/(1-p)), unbiased in expectation. mergekit, and we,
    instead rescale so that |delta'|_1 = |delta|_1 exactly, which equals 1/density in
    expectation; the two differ per tensor by the sampling noise of the kept fraction.
    The mask is drawn with `torch.bernoulli(full(density))` from `generator`, exactly as
    mergekit draws it from the global RNG, so equal generator states give equal masks.
    """
    if density >= 1:
        return delta
    dtype = work_dtype(delta)
    probability = torch.full_like(delta, density, dtype=dtype)
    mask = torch.bernoulli(probability, generator=generator)
    kept = delta.to(dtype) * mask
    return rescale_l1(delta.to(dtype), kept) if rescale else kept


# ----------------------------------------------------------------------------- task arithmetic


def combine_deltas(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    sign_consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """theta = base + lambda * sum_i w_i m_i delta_i / D  (mergekit's generalised task arithmetic).

    Without consensus m_i = 1 and D = sum_i w_i. With TIES sign consensus ("elect") the sign
    of sum_i w_i delta_i is elected per entry (+ on ties), m_i keeps entries of delta_i with
    that sign (zeros never count), and D = sum_i w_i m_i per entry. D = 1 where it is 0 (or
    |D| < 1e-8 without consensus) and when normalize=False.
    """
    if not deltas:
        return base
    stacked = torch.stack(deltas)  # (N, *shape)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * base.ndim))  # (N, 1..)
    stacked = stacked * w
    if sign_consensus:
        majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
        mask = (stacked.sign() == majority).to(stacked.dtype)  # (N, *shape)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def task_arithmetic(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): base + lambda * sum_i w_i (theta_i - base)."""
    dtype = work_dtype(base)
    base = base.to(dtype)
    deltas = [t.to(dtype) - base for t in tensors]
    return combine_deltas(base, deltas, weights, False, normalize, lam)


def ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    normalize: bool = True,
    lam: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    delta_i = theta_i - base, trimmed to its top-density magnitudes; then `combine_deltas`
    with sign consensus. mergekit (and we) elect the sign of the *weighted* sum and divide by
    the sum of the agreeing weights; the paper's disjoint mean is the equal-weight case.
    """
    dtype = work_dtype(base)
    base = base.to(dtype)
    deltas = [magnitude_prune(t.to(dtype) - base, d, rescale) for t, d in zip(tensors, densities)]
    return combine_deltas(base, deltas, weights, True, normalize, lam)


def dare(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    sign_consensus: bool,
    generator: torch.Generator | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE (arXiv:2311.03099): randomly drop each task vector, rescale, then combine.

    Masks are drawn for the inputs in order from `generator` (see `random_drop`).
    """
    dtype = work_dtype(base)
    base = base.to(dtype)
    deltas = [
        random_drop(t.to(dtype) - base, d, generator, rescale) for t, d in zip(tensors, densities)
    ]
    return combine_deltas(base, deltas, weights, sign_consensus, normalize, lam)


def dare_linear(base, tensors, weights, densities, generator=None, **options) -> torch.Tensor:
    """DARE + task arithmetic: base + lambda * sum_i w_i drop(delta_i) (normalize off by default)."""
    return dare(base, tensors, weights, densities, False, generator, **options)


def dare_ties(base, tensors, weights, densities, generator=None, **options) -> torch.Tensor:
    """DARE drop + TIES sign consensus (normalize off by default, as in mergekit)."""
    return dare(base, tensors, weights, densities, True, generator, **options)
