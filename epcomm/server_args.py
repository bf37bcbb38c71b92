"""Checks of the server-facing arguments of EPBuffer's calls (host-only information: shapes, dtypes, kinds):
caller-quantised tokens `dispatch((x_fp8, x_scales), ids)`, `stats_out=`, `combine(..., out=y)`.

Each check raises a one-line EPInputError saying what was expected and what came, before anything is sent.
"""
from __future__ import annotations

from .arrays import describe, is_bf16
from .errors import EPInputError

ID_DTYPES = ("int32", "int64")
STATS_DTYPES = ("int32", "int64")


def _fail(msg: str):
    raise EPInputError(msg)


def split_tokens(cfg, x):
    """(tokens, scales or None) of dispatch's first argument: bf16 x, or a caller-quantised (x_fp8, x_scales)."""
    if not isinstance(x, tuple):
        return x, None
    if len(x) != 2:
        _fail(f"dispatch: caller-quantised tokens are a pair (x_fp8, x_scales), got a tuple of {len(x)}")
    if not cfg.token_format.quantized:
        _fail(f"dispatch: (x, x_scales) is for a quantised token_format; this buffer sends {cfg.token_format}")
    return x


def check_quantised(cfg, xi, si, t: int) -> None:
    """x_fp8 [T, H] e4m3 and x_scales [T, scale_cols] fp32 in cfg's scale format, sent unchanged (x_scales
    row-major and contiguous on the GPU backend)."""
    if si is None:
        _fail("dispatch: x_scales must be a numpy / torch / cupy array")
    fmt = cfg.token_format
    if xi.dtype not in (fmt.dtype.name, "uint8"):
        _fail(f"dispatch: caller-quantised x must be {fmt.dtype.name} (or its uint8 bits), got {xi.dtype}")
    if si.shape != (t, cfg.scale_cols):
        _fail(f"dispatch: x_scales must be [T={t}, scale_cols={cfg.scale_cols}], got shape {list(si.shape)}")
    if si.dtype != "float32":
        _fail(f"dispatch: x_scales must be float32 ({cfg.scale_format} scales), got {si.dtype}")
    if si.kind != xi.kind or si.device != xi.device:
        _fail(f"dispatch: x and x_scales must be the same kind on the same device, got {xi} and {si}")


def check_ids_dtype(ii) -> None:
    if ii.dtype not in ID_DTYPES:
        _fail(f"dispatch: topk_ids must be int32 or int64, got {ii.dtype}")


def check_stats(cfg, stats_out, xi) -> None:
    """stats_out: [n_local_experts] int32 / int64 counters, same kind and device as x; dispatch adds the rows each
    local expert received (tokens_per_expert) to them on the device."""
    if stats_out is None:
        return
    st = describe(stats_out)
    if st is None:
        _fail(f"dispatch: stats_out must be a numpy / torch / cupy array, got {type(stats_out).__name__}")
    if st.shape != (cfg.n_local_experts,):
        _fail(f"dispatch: stats_out must be [n_local_experts={cfg.n_local_experts}], got shape {list(st.shape)}")
    if st.dtype not in STATS_DTYPES:
        _fail(f"dispatch: stats_out must be int32 or int64, got {st.dtype}")
    if st.kind != xi.kind or st.device != xi.device:
        _fail(f"dispatch: stats_out must be the same kind on the same device as x, got {st} and {xi}")


def check_out(cfg, out, t: int, yi) -> None:
    """out: the caller's y, bf16 [T, hidden], same kind and device as expert_y, contiguous rows."""
    if out is None:
        return
    oi = describe(out)
    if oi is None:
        _fail(f"combine: out must be a numpy / torch / cupy array, got {type(out).__name__}")
    if oi.shape != (t, cfg.hidden):
        _fail(f"combine: out must be [T={t} (the dispatch's T), hidden={cfg.hidden}], got shape {list(oi.shape)}")
    if not is_bf16(oi):
        _fail(f"combine: out must be bfloat16, got {oi.dtype} ({oi.kind})")
    if oi.kind != yi.kind or oi.device != yi.device:
        _fail(f"combine: out must be the same kind on the same device as expert_y, got {oi} and {yi}")
    if not _row_contiguous(out):
        _fail("combine: out must be contiguous (row-major, rows of hidden elements back to back)")


def _row_contiguous(a) -> bool:
    if hasattr(a, "is_contiguous"):
        return bool(a.is_contiguous())
    flags = getattr(a, "flags", None)
    return bool(flags is None or flags["C_CONTIGUOUS"])
