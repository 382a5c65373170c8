#!/usr/bin/env python3
"""Plots scripts/fleet-sim's timeline: auth requests to Klavi over time,
the fleet (one Redis) against the same number of standalone sidecars in
the same run, with the rolling restart and the Redis restart marked.

    scripts/fleet-plot.py TIMELINE.csv OUT.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(timeline: str, out: str) -> None:
    t, fleet, solo, events = [], [], [], []
    with open(timeline, newline="") as f:
        for row in csv.DictReader(f):
            t.append(float(row["t"]))
            fleet.append(int(row["fleet_auth"]))
            solo.append(int(row["standalone_auth"]))
            if row["event"] and row["event"] != "end":
                events.append((float(row["t"]), row["event"]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.step(t, solo, where="post", label=f"20 standalone sidecars ({solo[-1]} requests)", color="#c0392b")
    ax.step(t, fleet, where="post", label=f"20 sidecars in fleet mode ({fleet[-1]} requests)", color="#2471a3")
    for at, name in events:
        if name == "rolling restart done":
            continue
        ax.axvline(at, color="#7f8c8d", linestyle="--", linewidth=1)
        ax.annotate(
            name,
            (at, max(solo) * 0.55),
            rotation=90,
            ha="center",
            va="center",
            fontsize=8,
            color="#444",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none"},
        )
    ax.set_xlabel("seconds (tokens live 12 s)")
    ax.set_ylabel("auth requests to Klavi, cumulative")
    ax.set_title("Fleet simulation: auth requests over time")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
