"""Re-encoding a weight matrix as rank-r factors (MergeNet eq. 4-5).

Convention, used everywhere in this package: ``W ≈ A @ B`` with ``A: (m, r)`` and
``B: (r, n)``; from the SVD ``W = U S Vᵀ``, ``A = U_r S_r^½`` and ``B = S_r^½ V_rᵀ``.
"""

from __future__ import annotations

import torch

#: Above this many entries (m·n) the randomized SVD is used.
RANDOMIZED_SVD_MIN_SIZE = 512 * 512
#: Up to this many entries (m·n) :func:`product_norm` forms the product (faster than QR there).
PRODUCT_NORM_MAX_FORMED = 256 * 256


def factorize(
    matrix: torch.Tensor,
    rank: int,
    *,
    randomized_min_size: int = RANDOMIZED_SVD_MIN_SIZE,
    oversample: int = 8,
    niter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD factors of ``matrix`` with a deterministic sign convention.

    Parameters
    ----------
    matrix:
        ``(m, n)`` floating tensor.
    rank:
        Number of singular pairs kept; capped at ``min(m, n)``.
    randomized_min_size:
        Matrices with at least this many entries use ``torch.svd_lowrank`` (``O(m·n·r)``),
        seeded by ``seed`` so that the same matrix always gives the same factors.

    Returns
    -------
    ``A: (m, r)``, ``B: (r, n)`` in float32 with ``A @ B`` the best rank-r approximation
    (exactly so for the full SVD). Each column of ``A`` has its largest-magnitude entry positive.
    """
    if matrix.ndim != 2:
        raise ValueError(f"factorize expects a matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    w = matrix.detach().to(torch.float32)
    m, n = w.shape
    r = min(rank, m, n)
    if m * n >= randomized_min_size and r + oversample < min(m, n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=r + oversample, niter=niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    return _split(u, s, vh)


def factorize_product(
    a: torch.Tensor, b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`factorize` of ``A @ B`` (``A: (m, k)``, ``B: (k, n)``) without forming it.

    With ``Q_A R_A = A`` and ``Q_B R_B = Bᵀ``, the SVD of ``A @ B`` is ``Q_A`` and ``Q_B``
    around the SVD of the ``(k, k)`` core ``R_A R_Bᵀ``: ``O((m + n) k²)`` instead of an SVD of
    the ``(m, n)`` product, and exact (no randomized SVD for large layers). When ``k`` is not
    below ``min(m, n)`` the product is small enough to factorize directly. Rank
    ``min(rank, m, n)``, as :func:`factorize` gives.
    """
    m, k = a.shape
    n = b.shape[1]
    if k >= min(m, n):
        return factorize(a @ b, rank)
    qa, ra = torch.linalg.qr(a.detach().to(torch.float32))
    qb, rb = torch.linalg.qr(b.detach().to(torch.float32).T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    r = min(rank, k)
    fa, fb = _split(qa @ u[:, :r], s[:r], vh[:r] @ qb.T)
    return pad_rank(fa, fb, min(rank, m, n))  # singular values past k are zero


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U S^½``, ``B = S^½ Vᵀ`` from a truncated SVD ``(m, r), (r,), (r, n)``, signed so
    that each column of ``A`` has its largest-magnitude entry positive."""
    # SVD fixes each singular pair only up to sign: pin it so tokens do not flip between rounds.
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    root = s.clamp_min(0).sqrt()
    a = u * (signs * root)
    b = (signs * root)[:, None] * vh
    return a.contiguous(), b.contiguous()


def align_signs(
    a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs so that each column of ``A`` points the way ``reference``'s does.

    ``A: (m, r)``, ``B: (r, n)``, ``reference: (m, r')``; column ``j < min(r, r')`` of ``A``
    (and row ``j`` of ``B``) is negated when its dot product with the reference column is
    negative. ``A @ B`` is unchanged. A fixed sign rule (as in :func:`factorize`) flips a pair
    whenever two entries of a column trade places in magnitude; aligning each new factorisation
    with the previous one of the same layer keeps its tokens from changing sign between rounds.
    """
    k = min(a.shape[1], reference.shape[1])
    signs = torch.ones(a.shape[1], dtype=a.dtype)
    dots = (a[:, :k] * reference[:, :k].to(a.dtype)).sum(dim=0)
    signs[:k] = torch.where(dots < 0, -1.0, 1.0)
    return a * signs, b * signs[:, None]


def product_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖A B‖_F`` of ``A: (..., m, k)``, ``B: (..., k, n)``: ``(...)``.

    A product of up to :data:`PRODUCT_NORM_MAX_FORMED` entries is formed. A larger one is
    normed from its QR factors: with ``Q_A R_A = A`` and ``Q_B R_B = Bᵀ`` (orthonormal columns
    in ``Q``), ``‖A B‖ = ‖R_A R_Bᵀ‖``, a ``(k, k)`` core, in ``O((m + n) k²)`` instead of
    ``O(m n k)`` time and memory. Either way a product whose every term pairs a zero column of
    ``A`` or a zero row of ``B`` has norm exactly 0 (Householder QR keeps zero columns zero).
    """
    if a.shape[-2] * b.shape[-1] <= PRODUCT_NORM_MAX_FORMED:
        return torch.linalg.matrix_norm(a @ b)
    ra = torch.linalg.qr(a, mode="r").R
    rb = torch.linalg.qr(b.transpose(-1, -2), mode="r").R
    return torch.linalg.matrix_norm(ra @ rb.transpose(-1, -2))


def reconstruct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A @ B``: ``(..., m, r) @ (..., r, n) -> (..., m, n)``."""
    return a @ b


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to ``rank`` (``A: (m, r) -> (m, rank)``, ``B: (r, n) -> (rank, n)``).

    ``A @ B`` is unchanged, which lets factors of different ranks share one token width.
    """
    r = a.shape[-1]
    if r == rank:
        return a, b
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a_pad = torch.nn.functional.pad(a, (0, rank - r))
    b_pad = torch.nn.functional.pad(b, (0, 0, 0, rank - r))
    return a_pad, b_pad


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values ``(k,)`` whose squares hold at least ``energy``
    (in (0, 1]) of the total: FedKD's rank rule. At least 1."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double().square()
    total = power.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # the first index where the kept share reaches ``energy`` (a little slack for rounding)
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def factorize_energy(matrix: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``A: (m, k)``, ``B: (k, n)`` of the rank-k truncated SVD of ``matrix (m, n)``,
    with ``k = energy_rank(σ, energy)`` (FedKD's compression of a parameter matrix)."""
    if matrix.ndim != 2:
        raise ValueError(f"factorize_energy expects a matrix, got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.detach().to(torch.float32))
    rank = energy_rank(sigma, energy)
    return factorize(matrix, rank, randomized_min_size=matrix.numel() + 1)
