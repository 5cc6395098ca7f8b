"""ROME's closed-form update, checked on numbers with known answers."""

from __future__ import annotations

import torch

from peft_edit.tuners.rome.algorithm import rank_one_factors, update_direction


def test_update_maps_the_key_to_the_new_value_exactly():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 12, 5
    k = torch.randn(d_in, generator=g)
    delta = torch.randn(d_out, generator=g)
    X = torch.randn(200, d_in, generator=g)
    C = X.T @ X / 200
    A, B = rank_one_factors(update_direction(k, lambda v: torch.linalg.solve(C.double(), v)), delta)
    assert A.shape == (1, d_in) and B.shape == (d_out, 1)
    torch.testing.assert_close((B @ A @ k), delta, atol=1e-5, rtol=1e-5)


def test_update_is_smallest_under_the_key_covariance():
    # Among updates with ΔW k = δ, ROME's minimises E||ΔW x||² for x ~ C: any other rank-one
    # direction that also satisfies the constraint disturbs other keys more.
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 8, 3
    k = torch.randn(d_in, generator=g)
    delta = torch.randn(d_out, generator=g)
    X = torch.randn(500, d_in, generator=g) * torch.linspace(0.2, 3.0, d_in)
    C = (X.T @ X / 500).double()
    A, B = rank_one_factors(update_direction(k, lambda v: torch.linalg.solve(C, v)), delta)

    def disturbance(a):
        return float((B.double() @ a.double() @ C @ a.double().T @ B.double().T).trace())

    best = disturbance(A)
    for _ in range(20):
        other = torch.randn(1, d_in, generator=g)
        other = other / (other @ k)  # still maps k to δ
        assert disturbance(other) >= best - 1e-9


def test_identity_covariance_gives_the_plain_projection():
    k = torch.tensor([3.0, 4.0])
    A, B = rank_one_factors(update_direction(k, lambda v: v), torch.tensor([1.0]))
    torch.testing.assert_close(A, torch.tensor([[3.0, 4.0]]) / 25)
