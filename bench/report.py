"""The summary table and the plots (matplotlib is optional: without it the plots are skipped, with a message)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


def table(docs: list[dict[str, Any]]) -> str:
    """One row per measured figure: value, same-run baseline, ratio, the issue's target, verdict."""
    header = ("benchmark", "metric", "value", "baseline", "ratio", "target", "ok")
    rows: list[tuple[str, ...]] = []
    for doc in docs:
        name = doc["benchmark"] + (" (quick)" if doc.get("quick") else "")
        if not doc.get("checks"):
            rows.append((name, "(no result)", "-", "-", "-", "-", "FAIL"))
        for c in doc.get("checks", []):
            base = "-" if c.get("baseline") is None else f"{_fmt(c['baseline'])} {c.get('baseline_name', '')}".strip()
            ok = {True: "yes", False: "MISS", None: ""}[c.get("ok")]
            rows.append(
                (
                    name,
                    c["metric"],
                    f"{_fmt(c['value'])} {c['unit']}",
                    base,
                    _fmt(c.get("ratio")),
                    c.get("target", ""),
                    ok,
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    misses = sum(1 for r in rows if r[-1] in ("MISS", "FAIL"))
    targets = sum(1 for r in rows if r[-1])
    lines.append(f"{targets - misses}/{targets} targets met" if targets else "")
    return "\n".join(lines)


def plot_all(docs: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench: matplotlib is not installed; skipping fanout.png and footprint.png "
            "(pip install matplotlib, or the `bench` extra)"
        )
        return
    by_name = {d["benchmark"]: d for d in docs}
    if "fanout" in by_name and by_name["fanout"].get("data", {}).get("runs"):
        _plot_fanout(plt, by_name["fanout"], out / "fanout.png")
    if "footprint" in by_name and by_name["footprint"].get("data", {}).get("samples"):
        _plot_footprint(plt, by_name["footprint"], out / "footprint.png")


def _plot_fanout(plt: Any, doc: dict[str, Any], path: Path) -> None:
    data = doc["data"]
    runs = data["runs"]
    jobctl_max = doc.get("params", {}).get("jobctl_up_to", 10)

    def series(pick: Any) -> tuple[list[int], list[dict[str, Any]]]:
        rs = sorted((r for r in runs + data.get("peer_runs", []) if pick(r)), key=lambda r: r["clients"])
        return [r["clients"] for r in rs], rs

    def primary(kind: str) -> Any:
        return lambda r: r["kind"] == kind and r["client"] == ("jobctl" if r["clients"] <= jobctl_max else "asyncio")

    lines = [
        ("jobsvc, finished job (jobctl 1-10, asyncio 100-1000)", primary("finished"), "o-", 2.0, None),
        ("jobsvc, live job (jobctl 1-10, asyncio 100-1000)", primary("live"), "s--", 2.0, None),
        (
            "jobsvc, finished job, asyncio client",
            lambda r: r["kind"] == "finished" and r["client"] == "asyncio",
            "^:",
            1.0,
            None,
        ),
        ("bare grpc.aio peer, asyncio client", lambda r: r["client"] == "peer", "d-", 1.0, "grey"),
        ("minimal Python client processes (raw stub)", lambda r: r["client"] == "raw", "v:", 1.0, "tab:olive"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, pick, style, width, color in lines:
        xs, rs = series(pick)
        if not rs:
            continue
        kw = {"lw": width, "label": label, **({"color": color} if color else {})}
        ax1.plot(xs, [r["aggregate_mib_s"] for r in rs], style, **kw)
        ax2.plot(xs, [r["per_client_mib_s_median"] for r in rs], style, **kw)
    xs, rs = series(primary("finished"))
    ax1.plot(xs, [r["baseline_mib_s"] for r in rs], "k:", lw=1, label="baseline: read the output files")
    ax1.axhline(600, color="tab:red", lw=0.8, ls="-.", label="target 600 MB/s (10-100 clients)")
    ax1.axhline(400, color="tab:orange", lw=0.8, ls="-.", label="target 400 MB/s (1 client)")
    for ax, title in ((ax1, "aggregate"), (ax2, "per client (median)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("MiB/s")
        ax.set_title(f"Stream fan-out: {title}")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=6.5, loc="upper left")
    ax2.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"bench: wrote {path}")


def _plot_footprint(plt: Any, doc: dict[str, Any], path: Path) -> None:
    data = doc["data"]
    samples = data["samples"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [s["output_gib"] for s in samples]
    ax.plot(xs, [s["rss_mb"] for s in samples], "o-", label="server RSS")
    ax.plot(xs, [s["hwm_mb"] for s in samples], "x:", label="server peak RSS (VmHWM)")
    n_fin = doc.get("params", {}).get("finished_jobs", 1000)
    for key, label, color in (
        ("idle", "idle", "tab:green"),
        (f"finished_{n_fin}", f"{n_fin:,} finished jobs", "tab:purple"),
        ("running_100", "100 running jobs", "tab:brown"),
    ):
        if key in data.get("phases", {}):
            ax.axhline(data["phases"][key]["rss_mb"], color=color, lw=0.8, ls="--", label=label)
    ax.axhline(150, color="tab:red", lw=1, ls="-.", label="target: < 150 MB")
    ax.set_xlabel("total output captured and streamed (GiB)")
    ax.set_ylabel("MB")
    ax.set_ylim(0, 170)
    ax.set_title("jobsvc server memory against output")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"bench: wrote {path}")
