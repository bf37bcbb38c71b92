"""Smoke report: JSON (schema in docs/SMOKE.md), human table, PNG heatmap of the pair bandwidth matrix."""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from ..jsonable import jsonable

SCHEMA = "epcomm.smoke/1"
STAGE_STATUS = ("ok", "fail", "timeout", "error", "skipped")
TOP_KEYS = {"schema": str, "ok": bool, "exit_code": int, "verdict": str, "topology": dict, "options": dict,
            "ranks": list, "stages": dict, "failures": list, "duration_s": (int, float), "started": str}
FAILURE_KEYS = ("stage", "what", "message", "rank", "node", "host", "device", "src", "dst", "severity")


def validate(report: dict[str, Any]) -> list[str]:
    """Schema problems of a report (empty = valid). Kept in step with docs/SMOKE.md."""
    errs = []
    for k, t in TOP_KEYS.items():
        if k not in report:
            errs.append(f"missing key {k!r}")
        elif not isinstance(report[k], t):
            errs.append(f"{k!r} has type {type(report[k]).__name__}")
    if errs:
        return errs
    if report["schema"] != SCHEMA:
        errs.append(f"schema {report['schema']!r} != {SCHEMA!r}")
    if report["ok"] != (report["exit_code"] == 0):
        errs.append("ok must equal (exit_code == 0)")
    if report["ok"] != report["verdict"].startswith("OK"):
        errs.append("verdict must start with OK exactly when ok")
    if "\n" in report["verdict"]:
        errs.append("verdict must be one line")
    for name, st in report["stages"].items():
        if name not in ("inventory", "links", "ep", "speed"):
            errs.append(f"unknown stage {name!r}")
        if not isinstance(st, dict) or st.get("status") not in STAGE_STATUS:
            errs.append(f"stage {name!r}: status must be one of {STAGE_STATUS}")
    for f in report["failures"]:
        missing = [k for k in FAILURE_KEYS if k not in f]
        if missing:
            errs.append(f"failure without {missing}: {f}")
    for r in report["ranks"]:
        if not {"rank", "node", "host"} <= set(r):
            errs.append(f"rank entry without rank/node/host: {r}")
    links = report["stages"].get("links")
    if isinstance(links, dict) and links.get("status") in ("ok", "fail"):
        n = len(report["ranks"])
        for key in ("bandwidth_gbps", "latency_us"):
            m = links.get(key)
            if not (isinstance(m, list) and len(m) == n and all(isinstance(row, list) and len(row) == n for row in m)):
                errs.append(f"links.{key} must be a {n}x{n} matrix")
    return errs


def build_report(*, verdict: str, exit_code: int, topology: dict, options: dict, stages: dict, failures: list,
                 ranks: list | None = None, started: str = "", duration_s: float = 0.0, code: dict | None = None,
                 written_by: int | None = None) -> dict[str, Any]:
    """The report document (schema above), from the coordinator's finish or from the rank that lost the
    coordinator (written_by; it knows less: no ranks, no code identity)."""
    report: dict[str, Any] = {"schema": SCHEMA, "ok": exit_code == 0, "exit_code": exit_code, "verdict": verdict,
                              "started": started, "duration_s": duration_s}
    if written_by is not None:
        report["written_by"] = written_by
    if code is not None:
        report["code"] = code
    report.update(topology=topology, options=options, ranks=list(ranks or []), stages=stages,
                  failures=[f if isinstance(f, dict) else f.to_dict() for f in failures])
    return report


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(jsonable(report), indent=1, default=str, allow_nan=False)


def write(report: dict[str, Any], path: str) -> str | None:
    """Write the JSON report; None when written, else why not."""
    try:
        with open(path, "w") as f:
            f.write(dumps(report))
    except OSError as e:
        return str(e)
    return None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict[str, Any]) -> str:
    """The human summary: ranks, stage statuses, link matrix, failures, verdict last."""
    lines = []
    topo = report["topology"]
    lines.append(f"epcomm smoke: {topo.get('name')} - {len(report['ranks'])} ranks, {topo.get('num_nodes')} node(s), "
                 f"backend {topo.get('backend')}")
    inv = report["stages"].get("inventory", {})
    per_rank = {p.get("rank"): p for p in inv.get("per_rank", []) if p}
    lines.append(f"{'rank':>4} {'node':>4} {'host':<18} {'gpu':>4}  {'pid':>7}  detail")
    for r in report["ranks"]:
        p = per_rank.get(r["rank"], {})
        g = p.get("gpu") or {}
        detail = (f"{g.get('name', '?')} {str(g.get('uuid', ''))[:13]} drv {g.get('driver', '?')} "
                  f"cuda {g.get('cuda', '?')} nvshmem {g.get('nvshmem') or '-'}") if p.get("gpu") else \
            (f"{p.get('cores', '?')} cores, python {p.get('versions', {}).get('python', '?')}, "
             f"numpy {p.get('versions', {}).get('numpy', '?')}" if p else "no report")
        dev = "-" if r.get("device") is None else str(r["device"])
        lines.append(f"{r['rank']:>4} {r['node']:>4} {str(p.get('hostname', r['host']))[:18]:<18} {dev:>4}  "
                     f"{str(p.get('pid', '-')):>7}  {detail}")
    for line in report["stages"].get("inventory", {}).get("shared_gpus") or []:
        lines.append(f"shared: {line} (share_gpus): checks only, timings here are not link figures")
    for name, st in report["stages"].items():
        if st.get("note"):
            lines.append(f"{name}: {st['note']}")
    lines.append("stages: " + "  ".join(f"{k}={v.get('status')} ({v.get('duration_s', 0):.1f}s)"
                                        for k, v in report["stages"].items()))
    links = report["stages"].get("links", {})
    bw = links.get("bandwidth_gbps")
    if bw:
        n = len(bw)
        lines.append("link bandwidth GB/s (row = src, col = dst)" +
                     "".join(f"; {c}: median {_fmt(m.get('bw_gbps'), '.3g')} GB/s, {_fmt(m.get('lat_us'), '.1f')} us"
                             for c, m in (links.get("medians") or {}).items()))
        lines.append("      " + "".join(f"{d:>8}" for d in range(n)))
        flagged = {(p["src"], p["dst"]) for p in links.get("pairs", []) if p.get("flags") or p.get("data_ok") is False
                   or p.get("error")}
        for s in range(n):
            cells = []
            for d in range(n):
                v = bw[s][d]
                mark = "!" if (s, d) in flagged else " "
                cells.append(f"{'.' if s == d else _fmt(v, '7.3g')}{mark}".rjust(8))
            lines.append(f"{s:>5} " + "".join(cells))
    speed = report["stages"].get("speed", {})
    if speed.get("per_rank_us"):
        lines.append("EP dispatch+combine us per rank: " + " ".join(_fmt(t, ".0f") for t in speed["per_rank_us"]) +
                     f" (median {_fmt(speed.get('median_us'), '.0f')})")
    ep = report["stages"].get("ep", {})
    if ep.get("cases"):
        lines.append("EP cases: " + ", ".join(f"{c['name']}={c['status']}" for c in ep["cases"]))
    for f in report["failures"]:
        lines.append(f"  {f['severity'].upper()} {f['stage']}/{f['what']}: {f['message']}")
    lines.append(report["verdict"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ heatmap

_ANCHORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis-like


def _color(t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(_ANCHORS) - 1)
    i = min(int(t), len(_ANCHORS) - 2)
    f = t - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return tuple(int(round(a[c] + f * (b[c] - a[c]))) for c in range(3))


def _png_bytes(rgb) -> bytes:
    """Encode an HxWx3 uint8 array as PNG (no dependency beyond numpy and zlib)."""
    import numpy as np
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y]).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def heatmap(bw: list[list], path: str, title: str = "", flagged=()) -> str:
    """Write the bandwidth matrix as a PNG. matplotlib (Agg) when installed, labelled; else a plain cell image.
    Returns which renderer was used."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except Exception:
        return _heatmap_plain(bw, path, flagged)
    n = len(bw)
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in bw], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, label="GB/s")
    ax.set_xlabel("dst rank")
    ax.set_ylabel("src rank")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    if n <= 16:
        for s in range(n):
            for d in range(n):
                if not np.isnan(m[s, d]):
                    ax.text(d, s, f"{m[s, d]:.3g}", ha="center", va="center", fontsize=7,
                            color="red" if (s, d) in flagged else "white")
    ax.set_title(title or "pair bandwidth")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _heatmap_plain(bw: list[list], path: str, flagged=()) -> str:
    import numpy as np
    n = len(bw)
    cell = 24
    vals = [v for row in bw for v in row if v is not None]
    top = max(vals) if vals else 1.0
    img = np.full((n * cell, n * cell, 3), 128, dtype=np.uint8)
    for s in range(n):
        for d in range(n):
            v = bw[s][d]
            col = (40, 40, 40) if v is None else _color(v / top if top else 0.0)
            img[s * cell:(s + 1) * cell, d * cell:(d + 1) * cell] = col
            if (s, d) in flagged:   # red frame on flagged pairs
                img[s * cell:(s + 1) * cell, d * cell:d * cell + 2] = (255, 0, 0)
                img[s * cell:(s + 1) * cell, (d + 1) * cell - 2:(d + 1) * cell] = (255, 0, 0)
                img[s * cell:s * cell + 2, d * cell:(d + 1) * cell] = (255, 0, 0)
                img[(s + 1) * cell - 2:(s + 1) * cell, d * cell:(d + 1) * cell] = (255, 0, 0)
    with open(path, "wb") as f:
        f.write(_png_bytes(img))
    return "plain"
