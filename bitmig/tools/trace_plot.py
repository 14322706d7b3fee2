"""`bitmig trace plot`: one migration's progress from a source trace, as a PNG.

Plots the bytes the source sent (cumulative, from frame records), the dirty bytes
pending (from the pending_bytes of pass, forced and phase events), a vertical line at
each dirty pass, and shades the frozen completion windows (phase completion -> the end of
its group).
Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

from typing import Any

from bitmig.tools.trace_records import sent_by_source


def series(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The plotted data: times are seconds from the first record."""
    t0 = records[0]["mono"] if records else 0.0
    sent_t: list[float] = [0.0]
    sent_b: list[int] = [0]
    pend_t: list[float] = []
    pend_b: list[int] = []
    passes: list[tuple[float, int]] = []
    frozen: list[list[float]] = []
    phases: list[tuple[float, str]] = []
    total = 0
    for r in records:
        t = r["mono"] - t0
        typ = r.get("type")
        if typ == "frame" and sent_by_source(r):
            total += r["bytes"]
            sent_t.append(t)
            sent_b.append(total)
        if typ in ("pass", "phase", "forced", "progress") and "pending_bytes" in r:
            pend_t.append(t)
            pend_b.append(r["pending_bytes"])
        if typ == "group" and frozen:  # bitmaps complete in groups: one window each
            frozen[-1][1] = t
        if typ == "pass":
            passes.append((t, r["n"]))
        elif typ == "phase":
            phases.append((t, r["phase"]))
            if r["phase"] == "completion":
                frozen.append([t, t])
            elif r["phase"] == "done":
                if frozen and frozen[-1][1] == frozen[-1][0]:
                    frozen[-1][1] = t
                pend_t.append(t)
                pend_b.append(0)
    return {"sent_t": sent_t, "sent_b": sent_b, "pend_t": pend_t, "pend_b": pend_b,
            "passes": passes, "frozen": frozen, "phases": phases}


def plot_trace(records: list[dict[str, Any]], output: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(records)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    mib = float(1 << 20)
    ax.step(s["sent_t"], [b / mib for b in s["sent_b"]], where="post", color="tab:blue",
            label="bytes sent (MiB)")
    if s["pend_t"]:
        ax.plot(s["pend_t"], [b / mib for b in s["pend_b"]], "o-", color="tab:red",
                label="dirty bytes pending (MiB)")
    for i, (t, n) in enumerate(s["passes"]):
        ax.axvline(t, color="gray", linestyle=":", linewidth=1,
                   label="dirty pass" if i == 0 else None)
        ax.annotate(f"p{n}", (t, 0), xytext=(2, 2), textcoords="offset points", fontsize=7,
                    color="gray")
    for i, (a, b) in enumerate(s["frozen"]):
        ax.axvspan(a, max(b, a + 1e-6), color="tab:orange", alpha=0.3,
                   label=f"frozen window ({(b - a) * 1000:.1f} ms)" if i == 0 else None)
    ax.set_xlabel("seconds since the first record")
    ax.set_ylabel("MiB")
    ax.set_title(title or "bitmig migration")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
