"""What the GPU kernels do not run yet (issue 13; the host backend runs all of it): an unsupported call argument is
refused when the call is made, an EPInputError naming it, before anything is sent, rather than a wrong answer."""
from __future__ import annotations

from ...errors import EPInputError


def check_tokens(x) -> None:
    if isinstance(x, tuple):
        raise EPInputError("gpu backend: caller-quantised tokens (x_fp8, x_scales) are not supported by the kernels "
                           "yet; pass bf16 x (dispatch quantises it)")
