"""Numerical constants of the policy math, in one place.

The Python ops, the Triton kernels (as ``tl.constexpr`` globals) and the native C source (formatted into
it before the build) all read these. ``reference/`` keeps its own literal copies on purpose: the oracle
imports nothing from the library, so a wrong value here cannot hide from the tests. See docs/design.md,
"Conventions".
"""

from __future__ import annotations

import math

#: Floor of sigma, sigma_src and the posterior denominator d_k in the GM velocity (docs/design.md, [eq:gm-velocity]).
GM_EPS = 1e-6
#: Floor of sigma in the DX velocity u = (x - x0) / max(sigma, DX_EPS), and of the DX segment length.
DX_EPS = 1e-4
#: log2(e): the kernels run softmax as exp2 of logits scaled by it (one MUFU.EX2 per component).
LOG2E = 1.4426950408889634
#: Default substeps per unit raw time of a rollout (the official default).
DEFAULT_TOTAL_SUBSTEPS = 128

__all__ = ["DEFAULT_TOTAL_SUBSTEPS", "DX_EPS", "GM_EPS", "LOG2E"]

assert math.isclose(LOG2E, 1.0 / math.log(2.0), rel_tol=0, abs_tol=1e-15)
