"""Randomized Hadamard rotations of the channel dimension, for any width that has a Hadamard matrix.

A width ``n`` is factored as ``n = m * p`` with ``p`` a power of two (Sylvester construction, applied as a fast
Walsh-Hadamard transform) and ``m`` a small Paley order (12, 20, 36, 60, …; ``m = 1`` for powers of two), so
``1152 = 36 * 32``, ``4608 = 36 * 128``, ``1920 = 60 * 32``, ``3072 = 12 * 256``. The rotation is

    R = diag(signs) · (H_m ⊗ H_p) / sqrt(n),      x_rot = x @ R,

orthogonal, so ``(x R)(W R)^T == x W^T``. Widths with no such factorization (odd ones, say) fall back to a
seeded random orthogonal matrix; either way the tensors that define R are saved with the model.

A *block* rotation (``block = b``, a power of two dividing n) is block-diagonal instead,

    R = diag(signs) · (I_(n/b) ⊗ H_b) / sqrt(b),

each run of b channels rotated on its own. After smoothing it keeps almost all of the full rotation's benefit
(b = 128 at n = 1152 / 4608: within 0.2 dB output SQNR at W8A8, W4A8 and W4A4 on outlier-heavy activations). The
kernel applies it with one (rows, b) @ H_b product per tile; on the H100 that was not faster than the full-width
rotation (benchmarks/NOTES.md, session 3), so it is an option, not the default.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_order_ok(m: int) -> bool:
    q1, q2 = m - 1, m // 2 - 1
    return (_is_prime(q1) and q1 % 4 == 3) or (m % 2 == 0 and _is_prime(q2) and q2 % 4 == 1)


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


@lru_cache(maxsize=None)
def paley_hadamard(m: int) -> torch.Tensor:
    """A Hadamard matrix of order ``m`` (1, 2, or a Paley I/II order), float64 ±1 entries."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S skew with Jacobsthal core
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: symmetric conference matrix ⊗ blocks
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1.0, 1.0
        c[1:, 1:] = _jacobsthal(q)
        zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        pm_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, pm_block) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)
    raise ValueError(f"no Paley Hadamard matrix of order {m}")


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` a Paley order; smallest ``m`` first."""
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m in (1, 2) or _paley_order_ok(m):
            return m, p
        p //= 2
    return None


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two): ``x @ H_p``."""
    shape, p = x.shape, x.shape[-1]
    h = 1
    while h < p:
        x = x.reshape(*shape[:-1], p // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float32)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def rotation_block(n: int, max_block: int | None) -> int:
    """Block size of the rotation of ``n`` channels: the largest power of two that divides ``n``, at most
    ``max_block``; 0 (the full-width rotation) when that is ``n`` itself, when ``max_block`` is None, or when the
    block would be under 16 channels."""
    if max_block is None:
        return 0
    b = min(n & -n, max_block)
    return 0 if b >= n or b < 16 else b


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor, m: int, block: int = 0) -> torch.Tensor:
    """``x @ diag(signs) (H_m ⊗ H_p) / sqrt(n)`` over the last dim of ``x``, computed in float32; with ``block``
    > 0, the block-diagonal ``diag(signs) (I ⊗ H_block) / sqrt(block)`` instead (``m`` is then 1)."""
    n = x.shape[-1]
    if block:
        if n % block or block & (block - 1) or m != 1:
            raise ValueError(f"block rotation of {n} channels needs a power-of-two block dividing it and m = 1, "
                             f"got block={block}, m={m}")
        y = fwht((x.float() * signs.float()).reshape(*x.shape[:-1], n // block, block))
        return y.reshape(x.shape) * (1.0 / math.sqrt(block))
    p = n // m
    y = x.float() * signs.float()
    y = fwht(y.reshape(*x.shape[:-1], m, p))  # (..., m, p) @ H_p
    if m > 1:
        hm = paley_hadamard(m).to(device=y.device, dtype=torch.float32)
        y = torch.einsum("ij,...ip->...jp", hm, y)  # H_m^T on the m axis
    return y.reshape(x.shape) * (1.0 / math.sqrt(n))


def rotation_matrix(signs: torch.Tensor, m: int, block: int = 0) -> torch.Tensor:
    """The dense rotation ``R`` (n, n) that :func:`hadamard_rotate` applies (for tests and folding)."""
    return hadamard_rotate(torch.eye(signs.numel()), signs, m, block)
