"""GMFlow policy velocity, written literally from docs/design.md#gmflow-policy.

Shapes: x, x_src (B, C, *S); means (B, K, C, *S); logweights (B, K, 1, *S);
logstds (B, 1, 1, *1) or (B, K, 1, *1); sigmas floats, 0-d or (B,) tensors.
"""

import torch

from ._util import per_sample

EPS = 1e-6


def gm_velocity(x, sigma, means, logweights, logstds, x_src, sigma_src, eps=EPS):
    """The GM posterior-mean velocity u(x, sigma) of the policy built at (x_src, sigma_src).

    Returns u with the shape of x, in the dtype of the inputs (no upcasting here: pass float64).
    Implements [eq:gm-policy], [eq:gm-velocity] and [eq:gm-logits] (docs/design.md#gmflow-policy).
    """
    s = per_sample(sigma, x).clamp(min=eps)  # (B, 1, *1)
    s_src = per_sample(sigma_src, x).clamp(min=eps)
    a, a_src = 1 - s, 1 - s_src

    # the policy in x0 space: mu_k = x_src - s_src * means_k, var_k = exp(2 logstd_k) * s_src^2
    s_src_raw = per_sample(sigma_src, x).unsqueeze(1)  # (B, 1, 1, *1), not clamped
    mu = x_src.unsqueeze(1) - s_src_raw * means  # (B, K, C, *S)
    var = torch.exp(2 * logstds) * s_src_raw**2  # (B, K or 1, 1, *1)

    zeta = (a / s) ** 2 - (a_src / s_src) ** 2  # (B, 1, *1)
    nu = a * x / s**2 - a_src * x_src / s_src**2  # (B, C, *S)
    zeta, nu = zeta.unsqueeze(1), nu.unsqueeze(1)  # broadcast over K

    d = (var * zeta + 1).clamp(min=eps)
    m = (var * nu + mu) / d  # posterior component means (B, K, C, *S)
    logits = logweights + (mu * (nu - zeta * mu / 2)).sum(dim=2, keepdim=True) / d
    w = torch.softmax(logits, dim=1)  # (B, K, 1, *S)
    x0 = (w * m).sum(dim=1)
    return (x - x0) / s


def gm_apply_temperature(logweights, logstds, temperature, eps=EPS):
    """Temperature T < 1: logweights <- log_softmax(logweights / T), var <- var * T (logstd + log(T)/2).

    T >= 1 leaves the policy unchanged, as in the official code.
    Implements [eq:temperature] (docs/design.md#temperature-and-dropout).
    """
    if temperature >= 1.0:
        return logweights, logstds
    temperature = max(temperature, eps)
    logweights = torch.log_softmax(logweights / temperature, dim=1)
    logstds = logstds + 0.5 * torch.log(torch.tensor(temperature, dtype=logstds.dtype))
    return logweights, logstds


def gm_apply_dropout(logweights, keep_mask):
    """Drop components: ``keep_mask`` (B, K) bool, False where a component is dropped (logweight -inf).

    Implements [eq:dropout] (docs/design.md#temperature-and-dropout) for a given mask.
    """
    mask = keep_mask.reshape(*keep_mask.shape, *([1] * (logweights.dim() - 2)))
    return logweights.masked_fill(~mask, float("-inf"))
