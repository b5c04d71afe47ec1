import pytest
import torch

from viditq.quant.hadamard import (
    fwht, hadamard_factors, hadamard_rotate, paley_hadamard, random_signs, rotation_block, rotation_matrix,
)


@pytest.mark.parametrize("m", [1, 2, 12, 20, 28, 36, 44, 60, 72])
def test_paley_matrices_are_hadamard(m):
    h = paley_hadamard(m)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    assert set(h.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n,expected", [(1152, (36, 32)), (4608, (36, 128)), (1920, (60, 32)),
                                        (3072, (12, 256)), (4096, (1, 4096)), (13, None)])
def test_factorization_of_dit_widths(n, expected):
    assert hadamard_factors(n) == expected


def test_fwht_matches_dense_sylvester():
    h = torch.tensor([[1.0]])
    for _ in range(5):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fwht(x), x @ h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [64, 96, 192, 240, 1152])
def test_rotation_is_orthogonal_and_preserves_linear(n):
    m, _ = hadamard_factors(n)
    signs = random_signs(n, 3)
    r = rotation_matrix(signs, m)
    torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
    x, w = torch.randn(5, n), torch.randn(7, n)
    y = hadamard_rotate(x, signs, m) @ hadamard_rotate(w, signs, m).T
    torch.testing.assert_close(y, x @ w.T, atol=1e-3, rtol=1e-4)


def test_rotation_spreads_an_outlier_channel():
    n = 1152
    x = torch.randn(16, n)
    x[:, 5] *= 100
    m, _ = hadamard_factors(n)
    xr = hadamard_rotate(x, random_signs(n, 0), m)
    ratio = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean()  # noqa: E731
    assert ratio(xr) < ratio(x) / 4


@pytest.mark.parametrize("n,max_block,block", [(1152, 128, 128), (4608, 128, 128), (4608, 256, 256), (1920, 256, 128),
                                              (128, 128, 0), (96, 128, 32), (1152, None, 0), (24, 128, 0)])
def test_rotation_block_choice(n, max_block, block):
    assert rotation_block(n, max_block) == block


def test_block_rotation_is_block_diagonal_orthogonal_and_preserves_linear():
    n, b = 384, 128
    signs = random_signs(n, 5)
    r = rotation_matrix(signs, 1, b)
    torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
    off_diagonal = r.clone()
    for i in range(0, n, b):
        off_diagonal[i:i + b, i:i + b] = 0
    assert off_diagonal.abs().max() == 0 and r[:b, :b].abs().min() > 0  # dense blocks, nothing across them
    x, w = torch.randn(5, n), torch.randn(7, n)
    torch.testing.assert_close(hadamard_rotate(x, signs, 1, b) @ hadamard_rotate(w, signs, 1, b).T, x @ w.T,
                               atol=1e-3, rtol=1e-4)
    x[:, 7] = 100.0  # an outlier spreads over its run of b channels only
    xr = hadamard_rotate(x, signs, 1, b)
    assert xr[:, :b].abs().amin() > 100 / b ** 0.5 * 0.5 and xr[:, b:].abs().amax() < 10
    with pytest.raises(ValueError, match="block rotation"):
        hadamard_rotate(x, signs, 3, b)
