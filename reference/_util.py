import torch


def per_sample(value, x):
    """A float, 0-d or (B,) tensor as a tensor of shape (B, 1, ..., 1) broadcastable against ``x``.

    The per-sample sigma convention of docs/design.md#layouts-and-dtypes.
    """
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.dim() == 0:
        value = value.expand(x.shape[0])
    return value.reshape(x.shape[0], *([1] * (x.dim() - 1)))
