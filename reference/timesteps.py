"""Time shift: raw time r in [0, 1] <-> noise level sigma (docs/design.md#flow-and-time)."""

import math


def warp(r, shift):
    """sigma = shift * r / (1 + (shift - 1) * r). Works on floats and tensors.

    Implements [eq:warp] (docs/design.md#flow-and-time).
    """
    return shift * r / (1 + (shift - 1) * r)


def unwarp(sigma, shift):
    """r = sigma / (shift + (1 - shift) * sigma), the inverse of ``warp``.

    Implements [eq:warp] (docs/design.md#flow-and-time).
    """
    return sigma / (shift + (1 - shift) * sigma)


def dynamic_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_logshift=0.5, max_logshift=1.15, shift_type="exp"):
    """Resolution-dependent shift. "exp" (FLUX): log(shift) is linear in the sequence length; "sqrt": shift is
    linear in sqrt(seq_len), from exp(base_logshift) at base_seq_len to exp(max_logshift) at max_seq_len.

    Implements [eq:dynamic-shift] (docs/design.md#flow-and-time).
    """
    if shift_type == "sqrt":
        lo, hi = math.exp(base_logshift), math.exp(max_logshift)
        return lo + (hi - lo) * (math.sqrt(seq_len) - math.sqrt(base_seq_len)) / (
            math.sqrt(max_seq_len) - math.sqrt(base_seq_len)
        )
    slope = (max_logshift - base_logshift) / (max_seq_len - base_seq_len)
    return math.exp(base_logshift + (seq_len - base_seq_len) * slope)
