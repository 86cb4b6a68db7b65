"""Bench outputs: ``results.json``, ``results.md`` (table), ``pareto.png`` and ``compare.gif``/``compare.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vdit_accel.instrument.video import to_frames, write_video

COLUMNS = (
    ("label", "method", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("latency_median_s", "latency (s)", "{:.2f}"),
    ("psnr_mean", "PSNR mean (dB)", "{:.2f}"),
    ("psnr_min", "PSNR min", "{:.2f}"),
    ("ssim_mean", "SSIM mean", "{:.4f}"),
    ("ssim_min", "SSIM min", "{:.4f}"),
    ("adherence", "adherence", "{:.3f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("peak_delta_mb", "peak over baseline (MB)", "{:.0f}"),
)


def _fmt(fmt: str, value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def markdown_table(results: dict) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " | method stats |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for m in results["methods"]:
        stats = ", ".join(f"{k}={v}" for k, v in m["stats"].items() if not isinstance(v, (list, dict)))
        lines.append("| " + " | ".join(_fmt(f, m[k]) for k, _, f in COLUMNS) + f" | {stats} |")
    return "\n".join(lines)


def write_report(results: dict, videos: dict[str, list[torch.Tensor]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    s = results["settings"]
    md = [
        "# vdit-accel bench",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model `{s['model_id']}`, geometry {s['geometry']} (frames, height, width), {s['steps']} steps, "
        f"guidance {s['guidance']}, {len(s['prompt_list'])} prompts x {s['seeds']} seeds, "
        f"{s['threads']} threads; machine: {results['machine']['cpu']}; torch {results['versions']['torch']}, "
        f"diffusers {results['versions']['diffusers']}; commit {results['git_commit']}.",
        "",
        "Speedup = dense median latency / method median latency, measured in this run (dense runs first and "
        f"last; drift last/first = {results['dense_drift']}). PSNR/SSIM are against the dense video of the "
        "same prompt and seed. Adherence is the scorer's attribute accuracy against the prompt.",
        "",
        markdown_table(results),
        "",
        "compare.gif / compare.png, left to right: " + ", ".join(videos),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    _pareto(results, out / "pareto.png")
    first = [to_frames(v[0]) for v in videos.values()]
    strip = np.concatenate(first, axis=2)  # [F, H, W * methods, 3]
    write_video(strip, out / "compare.gif")
    _compare_png(videos, out / "compare.png")


def _pareto(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({m["method"] for m in results["methods"] if m["method"] != "dense"})
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(methods):
        pts = [m for m in results["methods"] if m["method"] == name]
        xs = [m["speedup"] for m in pts]
        ys = [min(m["psnr_mean"], 60.0) for m in pts]
        ax.scatter(xs, ys, color=cmap(i % 10), label=name, s=40)
        for m, x, y in zip(pts, xs, ys):
            ax.annotate(m["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup vs dense (measured, same run)")
    ax.set_ylabel("PSNR vs dense (dB, capped at 60)")
    ax.set_title(f"{results['settings']['model_id']}: speed vs fidelity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compare_png(videos: dict[str, list[torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(videos)
    frames = [to_frames(videos[n][0]) for n in names]
    picks = [0, frames[0].shape[0] // 2, frames[0].shape[0] - 1]
    fig, axes = plt.subplots(len(picks), len(names), figsize=(1.3 * len(names), 1.4 * len(picks)), squeeze=False)
    for j, (name, fr) in enumerate(zip(names, frames)):
        for i, f in enumerate(picks):
            axes[i][j].imshow(fr[f])
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            if i == 0:
                axes[i][j].set_title(name, fontsize=6)
        axes[0][0].set_ylabel("first", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
