"""The suite's output: the table printed after a run, the JSON rows (--json) and the speed-up chart (--plot)."""
from __future__ import annotations

import json

from .common import fmt_shape


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}"


def format_table(rows: list[dict]) -> str:
    """One line per row; WRONG / FAILED marked in the error column, never dropped."""
    head = (f"{'workload':<10} {'shape':<15} {'dtype':<8} {'provider':<24} {'median ms':>10} {'spread ms':>19} "
            f"{'vs eager':>8} {'vs compile':>10} {'roofline':>8} {'peak MiB':>9} {'max abs err':>12} {'x floor':>7}")
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        key = (r["workload"], tuple(r["shape"]), r["dtype"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        shape = fmt_shape(r["shape"]) + (" CL" if r.get("channels_last") else "")
        if r.get("error"):
            lines.append(f"{r['workload']:<10} {shape:<15} {r['dtype']:<8} {r['provider']:<24} FAILED: {r['error']}")
            continue
        ve = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        vc = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}" + (" WRONG" if r["wrong"] else "")
        spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
        vf = f"{r['vs_floor']:.2f}x" if r.get("vs_floor") else "-"
        lines.append(
            f"{r['workload']:<10} {shape:<15} {r['dtype']:<8} {r['provider']:<24} {r['median_ms']:>10.2f} "
            f"{spread:>19} {ve:>8} {vc:>10} {r['roofline_fraction']:>8.2f} {_fmt_bytes(r['peak_mem_bytes']):>9} "
            f"{err:>12} {vf:>7}")
    if any(r["provider"] == "floor" for r in rows):
        lines.append("floor: x read once and the output written once (out[:, :C].copy_(x); out[:, C:].zero_() into a "
                     "preallocated output); x floor = median / the floor's median")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str) -> None:
    """A JSON list of rows (JSON_KEYS plus min_ms, max_ms, wrong, error, check details ...)."""
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def check_plot_available() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed: pip install .[plot]  (or: pip install matplotlib)"
    return None


def write_plot(rows: list[dict], path: str) -> None:
    """PNG bar chart: speed-up over the reference eager, one group per (workload, shape, dtype), one bar per
    provider; the eager reference is the line at 1. matplotlib is imported here only (an optional dependency)."""
    import matplotlib  # optional dependency (the [plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after selecting the Agg backend

    rows = [r for r in rows if r["provider"] not in ("reference", "copy") and r.get("speedup_vs_eager")]
    groups = list(dict.fromkeys((r["workload"], fmt_shape(r["shape"]), r["dtype"]) for r in rows))

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.5))
    for i, p in enumerate(providers):
        xs, matched = [], []
        for j, g in enumerate(groups):
            for r in rows:
                if r["provider"] == p and (r["workload"], fmt_shape(r["shape"]), r["dtype"]) == g:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    matched.append(r)
        bars = ax.bar(xs, [r["speedup_vs_eager"] for r in matched], width, label=p)
        for b, r in zip(bars, matched):
            if r.get("wrong"):  # a wrong result's speed is no speed: hatched, not hidden
                b.set_hatch("xx")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w}\n{s}\n{d}" for w, s, d in groups], fontsize=8)
    ax.set_ylabel("speed-up over reference eager (x)")
    info = rows[0] if rows else {}
    ax.set_title(f"pspnet_fast bench: {info.get('machine', '')}, torch {info.get('versions', {}).get('torch', '')}, "
                 f"commit {info.get('commit')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
