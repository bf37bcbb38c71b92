"""Which EPConfig options and call arguments the GPU kernels support yet (issue 13 lands in steps: the host backend
has every one). An unsupported option is refused when the buffer is made, an unsupported argument when the call is
made: an EPInputError naming it, before anything is sent, rather than a wrong answer."""
from __future__ import annotations

from ...errors import EPInputError


def unsupported_options(cfg) -> list[str]:
    """The options of cfg the kernels cannot run yet, as 'name=value' strings."""
    out = []
    if cfg.scale_layout != "row":
        out.append(f"scale_layout={cfg.scale_layout!r}")
    return out


def check_config(cfg) -> None:
    missing = unsupported_options(cfg)
    if missing:
        raise EPInputError("gpu backend: not supported by the kernels yet: " + ", ".join(missing)
                           + " (the host backend runs them; see docs/ARCHITECTURE.md 'Output layouts')")


def check_tokens(x) -> None:
    if isinstance(x, tuple):
        raise EPInputError("gpu backend: caller-quantised tokens (x_fp8, x_scales) are not supported by the kernels "
                           "yet; pass bf16 x (dispatch quantises it)")
