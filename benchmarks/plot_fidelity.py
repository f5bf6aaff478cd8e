"""Plot `bench_fidelity.py`'s results: distance to the full voice against adapter size, one line per target set.

Needs matplotlib (not a dependency of rvc-lora: `pip install matplotlib` in any Python with numpy):
    python benchmarks/plot_fidelity.py /tmp/rvc-lora-fidelity/fidelity.jsonl docs/fidelity.png
Reads the JSON lines only (no rvc_lora import), so a separate small environment will do.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("snr_db", "waveform SNR to the full voice (dB, higher is closer)"),
          ("mel_db", "log-mel distance to the full voice (dB, lower is closer)"),
          ("f0_gross", "f0 gross errors vs the full voice (share of frames > 50 cents off)"))


def mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.mean(vals) if vals else math.nan


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "method" in r]
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    lines: dict[tuple[str, bool, str], list[tuple[float, dict[str, float], int]]] = defaultdict(list)
    energy_pts: list[tuple[float, dict[str, float], str]] = []
    base: dict[str, float] = {}
    for rs in by_method.values():
        r0 = rs[0]
        vals = {k: mean(rs, k) for k, _ in PANELS}
        mb = statistics.mean(r["adapter_bytes"] for r in rs) / 1e6
        if r0["targets"] == "none":
            base = vals
        elif r0["energy"] is not None:
            energy_pts.append((mb, vals, f"{r0['targets']}{'' if r0['full_delta'] else ' -full'} e{r0['energy']:g}"))
        else:
            lines[(r0["targets"], r0["full_delta"], r0.get("extraction", "svd"))].append((mb, vals, r0["rank"]))
    voices = sorted({r["voice"] for r in rows})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.6), dpi=80)
    colors = {"dec": "tab:blue", "dec+flow": "tab:orange", "all": "tab:green", "data": "tab:purple",
              "synth": "tab:brown"}
    names = {"data": "data-aware (speech)", "synth": "data-aware (synthetic input)"}
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for (targets, full, how), pts in sorted(lines.items()):
            pts.sort(key=lambda p: p[0])
            label = f"{targets}{'' if full else ', no full deltas'}" + (f", {names.get(how, how)}" if how != "svd"
                                                                         else ", SVD" if targets == "all" else "")
            ax.plot([p[0] for p in pts], [p[1][key] for p in pts], marker="o" if full else "x",
                    linestyle="-" if full else "--", color=colors.get(how if how != "svd" else targets, "k"),
                    label=label)
            if key == "snr_db" and full and targets == "all" and how in ("svd", "synth"):
                for mb, vals, rank in pts:
                    ax.annotate(f"r{rank}", (mb, vals[key]), fontsize=7, xytext=(2, 3), textcoords="offset points")
        for mb, vals, label in energy_pts:
            ax.plot([mb], [vals[key]], marker="*", markersize=9, color="tab:red", linestyle="none")
            if key == "snr_db":
                ax.annotate(label.split()[-1], (mb, vals[key]), fontsize=7, xytext=(2, -9), textcoords="offset points")
        if key in base and not math.isnan(base[key]):
            ax.axhline(base[key], color="gray", linestyle=":", label="base alone (no adapter)")
        ax.set_xscale("log")
        ax.set_xlabel("adapter size (MB, fp16)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Adapters extracted from fine-tuned voices vs the full voice: means over {len(voices)} voices "
                 f"({', '.join(voices)}); stars: energy thresholds on all layers", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, format="png")
    print(f"wrote {dst} ({Path(dst).stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
