#!/usr/bin/env python3
"""Draws the PNG chart of a ztna-bench result file.

usage: chart.py RESULTS.json OUT.png

Panels: throughput per path (median bars, min-max whiskers, ratio to the reference path over
the single-stream TCP bar), ping RTT per path, and the relay-scale runs when present. Needs
matplotlib (Debian: python3-matplotlib).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

THROUGHPUT = [
    ("tcp1_mbps", "TCP, 1 stream"),
    ("tcp4_mbps", "TCP, 4 streams"),
    ("udp_ok_mbps", "UDP, < 1 % loss"),
    ("udp_unlimited_mbps", "UDP at -b 0 (received)"),
]
LATENCY = [("ping_avg_ms", "ping avg"), ("ping_p99_ms", "ping p99")]


def bars(ax, report, metrics, ylabel, ratio_metric=None):
    paths = [p["name"] for p in report["paths"]]
    summary = report["summary"]
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        xs, med, lo, hi = [], [], [], []
        for j, path in enumerate(paths):
            stat = summary.get(path, {}).get(key)
            if stat is None:
                continue
            xs.append(j + (i - (len(metrics) - 1) / 2) * width)
            med.append(stat["median"])
            lo.append(stat["median"] - stat["min"])
            hi.append(stat["max"] - stat["median"])
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=label)
        if key == ratio_metric:
            for x, m, path in zip(xs, med, [p for p in paths if key in summary.get(p, {})]):
                r = report["ratios"].get(path, {}).get(key)
                if r is not None:
                    ax.annotate(f"{r:.2f}×", (x, m), ha="center", va="bottom",
                                fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(paths)))
    ax.set_xticklabels(paths)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def scale(axes, rs):
    runs = [r for r in rs["runs"] if not r.get("error")]
    labels = [str(r["agents"]) for r in runs]
    panels = [
        ("setup_per_s", "setup (connections/s)"),
        ("rss_per_session_kib", "relay memory per session (KiB)"),
        ("forward_mbps", "forwarded Mbit/s (1200-B datagrams)"),
    ]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in runs]
        ax.bar(range(len(runs)), values, 0.6, color="tab:purple")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("simulated agents")
        ax.set_title(f"Relay scale: {title}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        report = json.load(f)
    rs = report.get("relay_scale")
    with_scale = bool(rs and rs.get("runs"))
    rows = 3 if with_scale else 2
    fig = plt.figure(figsize=(11, 4.2 * rows))
    grid = fig.add_gridspec(rows, 3)
    axes = [fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, :])]
    m = report["machine"]
    fig.suptitle(
        f"ztna benchmarks, {report['started_utc']}"
        f"{' (smoke)' if report.get('smoke') else ''}\n"
        f"{m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}; "
        f"median of {report['plan']['iterations']} run(s), whiskers min–max",
        fontsize=10,
    )
    if report["paths"]:
        bars(axes[0], report, THROUGHPUT, "Mbit/s (log scale)", ratio_metric="tcp1_mbps")
        axes[0].set_yscale("log")
        axes[0].set_title(f"Throughput (labels: TCP 1 stream ÷ {report['reference']})")
        bars(axes[1], report, LATENCY, "ms")
        axes[1].set_title("Ping RTT, 100 pings")
    if with_scale:
        scale([fig.add_subplot(grid[2, i]) for i in range(3)], rs)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
