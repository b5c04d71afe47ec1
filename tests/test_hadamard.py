import pytest
import torch

from viditq.quant.hadamard import (
    fwht, hadamard_factors, hadamard_rotate, paley_hadamard, random_signs, rotation_matrix,
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
