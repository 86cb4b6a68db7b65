"""Bench outputs: ``results.json``, ``results.md`` (table), ``pareto.png`` and ``compare.gif``/``compare.png``.

``pareto.png`` has one panel per speed front: a front is a ``(name, row key)`` pair, e.g. ``("W1 wall-clock",
"speedup")``; a row without the key is left out of that panel. :data:`KNOWN_FRONTS` lists the fronts the report
draws when rows carry their key (``speedup_w2``: a second, replayed measurement added to each row later).

Example:
    >>> rows = [{"label": "dense", "method": "dense", "speedup": 1.0}, {"label": "fbc-0.1", "method": "fbc"}]
    >>> fronts_present({"methods": rows})
    [('W1 wall-clock', 'speedup')]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.instrument.video import to_frames, write_video
from vdit_accel.validate import atomic_write

DEFAULT_FRONTS = (("W1 wall-clock", "speedup"),)
KNOWN_FRONTS = (("W1 wall-clock", "speedup"), ("W2 replay", "speedup_w2"))
PSNR_PLOT_CAP = 60.0  # dB: identical videos (inf) are drawn at the cap
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
MISSING = "-"
REPORT_FILES = ("results.json", "results.md", "pareto.png", "compare.gif", "compare.png")  # what a bench run writes


def _num(fmt: str):
    return lambda m, key: _fmt(fmt, m[key]) if key in m else MISSING


def _span(lo_key: str, hi_key: str, fmt: str = "{:.2f}"):
    def show(m: dict, _key: str) -> str:
        if lo_key not in m or hi_key not in m:
            return MISSING
        return f"{_fmt(fmt, m[lo_key])}-{_fmt(fmt, m[hi_key])}"

    return show


# (row key, header, formatter(row, key) -> cell); the span columns read two keys
COLUMNS = (
    ("label", "method", _num("{}")),
    ("speedup", "speedup (median paired)", _num("{:.2f}x")),
    ("speedup_iqr", "speedup IQR", _span("speedup_q25", "speedup_q75")),
    ("speedup_range", "speedup min-max", _span("speedup_min", "speedup_max")),
    ("latency_median_s", "latency (s)", _num("{:.2f}")),
    ("psnr_mean", "PSNR mean (dB)", _num("{:.2f}")),
    ("psnr_min", "PSNR min", _num("{:.2f}")),
    ("psnr_worst_patch_mean", "worst-patch PSNR mean", _num("{:.2f}")),
    ("psnr_worst_patch_min", "worst-patch PSNR min", _num("{:.2f}")),
    ("temporal_psnr_mean", "temporal PSNR mean", _num("{:.2f}")),
    ("ssim_mean", "SSIM mean", _num("{:.4f}")),
    ("ssim_min", "SSIM min", _num("{:.4f}")),
    ("adherence", "adherence", _num("{:.3f}")),
    ("peak_rss_mb", "peak memory (MB)", _num("{:.0f}")),
    ("peak_delta_mb", "peak over baseline (MB)", _num("{:.0f}")),
)
OPTIONAL_COLUMNS = (("speedup_w2", "speedup W2 (replay)", _num("{:.2f}x")),)  # shown when a row has the key


def _fmt(fmt: str, value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if value is None:
        return MISSING
    return fmt.format(value)


def fronts_present(results: dict) -> list[tuple[str, str]]:
    """The :data:`KNOWN_FRONTS` that at least one row has the key of (W1 always when any row has a speedup)."""
    return [(name, key) for name, key in KNOWN_FRONTS if any(key in m for m in results["methods"])]


def drift_line(results: dict) -> str | None:
    """The visible marker line for a flagged dense drift, or ``None`` when the run is not flagged."""
    if not results.get("drift_flagged"):
        return None
    drift, tol = results["dense_drift"], results["settings"].get("drift_tolerance", 0.1)
    return (f"**DRIFT FLAGGED: dense latency moved by {abs(drift - 1) * 100:.0f}% between the two halves of the run "
            f"(second/first = {drift}, tolerance {tol * 100:.0f}%); speedups of this run are suspect.**")


def markdown_table(results: dict) -> str:
    """The results table: one row per point, the :data:`COLUMNS` (and present :data:`OPTIONAL_COLUMNS`)."""
    cols = list(COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c[0] in m for m in results["methods"])]
    head = "| " + " | ".join(c[1] for c in cols) + " | method stats |"
    sep = "|" + "---|" * (len(cols) + 1)
    lines = [head, sep]
    for m in results["methods"]:
        stats = ", ".join(f"{k}={v}" for k, v in m.get("stats", {}).items() if not isinstance(v, (list, dict)))
        lines.append("| " + " | ".join(show(m, k) for k, _, show in cols) + f" | {stats} |")
    return "\n".join(lines)


def write_report(results: dict, videos: dict[str, list[torch.Tensor]], out: Path) -> None:
    """Write every bench output: :func:`write_summary` (JSON, Markdown, Pareto) and ``compare.gif``/``.png``.

    Args:
        results (`dict`): what :func:`~vdit_accel.bench.harness.run_bench` returns.
        videos (`dict[str, list[torch.Tensor]]`): per point label, its videos `[3, F, H, W]` in job order.
        out (`Path`): the output folder (created).
    """
    write_summary(results, out)
    first = [to_frames(v[0]) for v in videos.values()]
    strip = np.concatenate(first, axis=2)  # [F, H, W * methods, 3]
    write_video(strip, out / "compare.gif")
    _compare_png(videos, out / "compare.png")


def write_summary(results: dict, out: Path) -> None:
    """Write ``results.json``, ``results.md`` and ``pareto.png`` from the results alone (no videos needed).

    A later pass that adds a key to each row (e.g. ``speedup_w2`` from a replayed measurement) calls this again
    on the updated results: the table gains the optional column and ``pareto.png`` a panel for that front.
    """
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as tmp:  # an interrupted run never leaves a half-written file
        tmp.write_text(json.dumps(results, indent=1))
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
        "Methods are interleaved: for each (prompt, seed) job every point runs in turn, dense among them. "
        "Speedup = median over jobs of dense latency / method latency of the same job; IQR and min-max are of "
        f"those paired ratios. Dense drift (median latency, second half / first half of the run) = "
        f"{results['dense_drift']}. PSNR/SSIM are against the dense video of the same prompt and seed; "
        f"worst-patch PSNR is that of the worst {s.get('worst_patch_side', 16)}-px patch of any frame; temporal "
        "PSNR compares frame-to-frame differences with dense's (flicker). Adherence is the scorer's attribute "
        "accuracy against the prompt. Peak memory is the max over a point's generations.",
        "",
        *([line, ""] if (line := drift_line(results)) else []),
        markdown_table(results),
        "",
        "compare.gif / compare.png (first job), left to right: " + ", ".join(m["label"] for m in results["methods"]),
        "",
    ]
    with atomic_write(out / "results.md") as tmp:
        tmp.write_text("\n".join(md))
    plot_pareto(results, out / "pareto.png", fronts_present(results) or list(DEFAULT_FRONTS))


def plot_pareto(results: dict, path: Path,
                fronts: list[tuple[str, str]] | tuple = DEFAULT_FRONTS) -> dict[str, list[str]]:
    """Speed (x) against mean PSNR vs dense (y), one panel per front, one marker style per method family.

    Args:
        results (`dict`): the bench results (``results["methods"]`` rows).
        path (`Path`): the PNG to write.
        fronts (`list[tuple[str, str]]`, defaults to ``[("W1 wall-clock", "speedup")]``): ``(front name, row key)``
            pairs, one panel each; rows lacking the key are skipped in that panel.

    Returns:
        `dict[str, list[str]]`: per front name, the labels of the rows drawn in its panel.

    Raises:
        ConfigError: if ``fronts`` is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts = list(fronts)
    if not fronts:
        raise ConfigError("fronts=[] selects no panel: give at least one (front name, row key) pair")
    rows = results["methods"]
    families = sorted({m["method"] for m in rows})
    style = {name: (MARKERS[i % len(MARKERS)], plt.get_cmap("tab10")(i % 10)) for i, name in enumerate(families)}
    fig, axes = plt.subplots(1, len(fronts), figsize=(7 * len(fronts), 4.8), squeeze=False)
    drawn: dict[str, list[str]] = {}
    for ax, (front, key) in zip(axes[0], fronts):
        drawn[front] = []
        for name in families:
            pts = [m for m in rows if m["method"] == name and m.get(key) is not None and "psnr_mean" in m]
            if not pts:
                continue
            xs = [m[key] for m in pts]
            ys = [min(m["psnr_mean"], PSNR_PLOT_CAP) for m in pts]
            drawn[front].extend(m["label"] for m in pts)
            marker, color = style[name]
            ax.scatter(xs, ys, marker=marker, color=color, label=name, s=40)
            for m, x, y in zip(pts, xs, ys):
                ax.annotate(m["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"speedup vs dense ({front}, key {key!r})")
        ax.set_ylabel(f"PSNR vs dense (dB, capped at {PSNR_PLOT_CAP:.0f})")
        ax.set_title(f"{results['settings']['model_id']}: {front}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return drawn


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
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
