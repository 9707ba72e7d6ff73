"""Convert a model's raw output to epsilon, once, at the edge.

The solver's history stores epsilon evaluated at its own timestep (never v's from different
timesteps mixed later, a defect of the public code: paper.md section 6.3, N3).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def to_epsilon(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """eps from an epsilon, v, x0 or flow-velocity prediction at the state x = alpha x0 + sigma eps.

    - epsilon:          eps = output
    - v_prediction:     v = alpha eps - sigma x0 (VP, alpha^2 + sigma^2 = 1)  ->  eps = sigma x + alpha v
    - sample:           x0 = output                                           ->  eps = (x - alpha x0) / sigma
    - flow_prediction:  v = eps - x0 (alpha = 1 - sigma)                      ->  eps = x + alpha v

    Arithmetic in float32 whatever the model dtype.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    out = model_output.float()
    if torch.isnan(out).any():
        raise ValueError("model_output contains NaN")
    x = x.float()
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=out.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=out.device)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return sigma * x + alpha * out
    if prediction_type == "sample":
        return (x - alpha * out) / sigma
    return x + alpha * out


def start_denoised(model_output: torch.Tensor, x: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0_hat at alpha = 0 (sigma = 1), where eps = x carries no model information: the start of a flow
    schedule (t = 1: x0_hat = x - v) and of a zero-terminal-SNR VP schedule (v = alpha eps - sigma x0 = -x0,
    so x0_hat = -v; an x0 prediction is x0_hat itself). An epsilon prediction holds no x0 there: ValueError.

    ``Denoiser.guided_eps`` returns this there instead of eps; the solver's first step is then the limit of
    eq. 10, y_1 = x0_hat + n_1 eps_0 (derivation in ``solver.schedules.FlowSchedule``). float32.
    """
    out = model_output.float()
    if torch.isnan(out).any():
        raise ValueError("model_output contains NaN")
    if prediction_type == "flow_prediction":
        return x.float() - out
    if prediction_type == "v_prediction":
        return -out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type {prediction_type!r} holds no data prediction at alpha = 0 (zero SNR)")
