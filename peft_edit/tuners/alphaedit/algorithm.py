"""AlphaEdit's update: MEMIT's, confined to the null space of the knowledge to preserve.

With P the projector onto the covariance's eigen-directions of small eigenvalue (directions
the preserved keys K0 barely use, so P K0 ≈ 0), AlphaEdit writes the update as Δ P: whatever Δ
is, (Δ P) K0 ≈ 0, so preserved knowledge is left alone by construction and the least-squares
problem no longer needs MEMIT's λC term. It solves

    min ‖Δ P K − R‖² + ‖Δ P Kp‖² + α‖Δ P‖²

(K the new keys, R their residuals, Kp the keys of edits already in the adapter, which must
keep their values), giving Δ P = R Kᵀ P (P (K Kᵀ + Kp Kpᵀ) + α I)⁻¹, stored as factors
B = R (out x N), A = [(P (K Kᵀ + Kp Kpᵀ) + α I)⁻¹ P K]ᵀ (N x in).
"""

from __future__ import annotations

import torch


def nullspace_projector(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors whose eigenvalue is below ``threshold`` x the mean eigenvalue."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    U = eigenvectors[:, eigenvalues < threshold * eigenvalues.mean()]
    return U @ U.T


def projected_factors(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    earlier_gram: torch.Tensor,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) of AlphaEdit's update; keys (N, in), residuals (N, out), Kp Kpᵀ (in, in)."""
    K = keys.double().T  # (in, N)
    P = projector.double()
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    M = P @ (K @ K.T + earlier_gram.double()) + ridge * eye
    A = torch.linalg.solve(M, P @ K).T  # (N, in)
    return A.float(), residuals.float().T
