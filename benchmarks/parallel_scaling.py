"""Context-parallel scaling of dense Wan and of Astraea: (a) measured on CPU ranks, (b) a scaling model for GPUs.

(a) ``measure``: :func:`vdit_accel.bench.parallel.measure` (also ``vdit-accel bench-parallel``): Wan2.1-1.3B-width
    blocks stepped on ``--nproc`` gloo ranks under context parallelism (``--mesh`` Ulysses or Ring), on whole copies
    at once and on one process, interleaved step by step; the communication and the replicated work timed apart;
    the models of :data:`vdit_accel.bench.parallel.MODELS` checked against the CP steps.

(b) ``model``: per-call time on ``P`` GPUs, ``T(P) = (F - F_r) / (R·P) + F_r / R + comm(P)`` with ``F`` the call's
    FLOPs of :mod:`vdit_accel.bench.flops` at the full geometry, ``F_r`` its replicated part (the structure (a)
    checks: embeddings and text K/V, which every rank computes whole), ``R`` the achieved throughput per GPU and
    ``comm`` the Ulysses all-to-all (4 per layer: q, k, v, out; Astraea's q and out carry only the budget's rows)
    and Ring K/V all-gather volumes (and, for runs that shard the weights with FSDP, their all-gather) at a
    per-GPU bandwidth ``B`` plus a per-collective latency; no compute/communication overlap. Astraea's compute per
    step is the dense one times the *measured* relative step cost of its budget (the latency model of
    ``vdit-accel bench-step``, W2 width, one process). Every input is written to the JSON. It is first run on the
    published dense sequence-parallel figures (validation, with held-out checks of the residual's form), then
    predicts Wan2.1-1.3B and Wan2.1-14B at 21x30x52 tokens on 1/2/4/8 GPUs: Astraea's gain over dense on the same
    GPU count, and over one dense GPU (the paper's 13.2x convention). Those figures are **predictions**.

Usage (the timed run: alone on the machine, ~4 min per round on 2 cores):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/parallel_scaling.py measure --nproc 2 --repeats 5 \\
        --rounds 2 --out docs/results/parallel/measured.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/parallel_scaling.py measure --mesh ring --nproc 2 \\
        --repeats 5 --rounds 2 --out docs/results/parallel/measured-ring.json
    PYTHONPATH=src python benchmarks/parallel_scaling.py model --measured docs/results/parallel/measured.json \\
        docs/results/parallel/measured-confirm.json docs/results/parallel/measured-ring.json \\
        docs/results/parallel/measured-ring-confirm.json --step-bench \\
        docs/results/bench-step/cpu-full-geometry/bench-step.json --out docs/results/parallel/scaling-model.json
Smoke (seconds): ``... measure --tiny --out /tmp/m.json`` then ``... model --measured /tmp/m.json --out /tmp/s.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from vdit_accel.bench.parallel import FORMAT, MODELS  # the measurement lives in the library


# ------------------------------------------------------------------------------------------ (a) measurement
def measure(args) -> dict:
    """:func:`vdit_accel.bench.parallel.measure` (``vdit-accel bench-parallel``) with this script's flags."""
    from vdit_accel.bench.parallel import ParallelBenchConfig
    from vdit_accel.bench.parallel import measure as measure_ranks

    cfg = ParallelBenchConfig(nproc=args.nproc, mesh=args.mesh, layers=args.layers, latent=tuple(args.latent),
                              text_len=args.text_len, budgets=tuple(args.budgets), repeats=args.repeats,
                              rounds=args.rounds, tiny=args.tiny, timeout=args.timeout)
    return measure_ranks(cfg)


# ------------------------------------------------------------------------------------------ (b) the model
WAN_1_3B = dict(heads=12, head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256, in_channels=16, out_channels=16,
                patch_size=(1, 2, 2), num_layers=30)
WAN_14B = dict(WAN_1_3B, heads=40, ffn_dim=13824, num_layers=40)
FULL_GRID = (21, 30, 52)  # 480p x 81 frames: 32,760 tokens

# Published dense sequence-parallel results: end-to-end latency of a generation (text encoding, the transformer's
# steps, the VAE decode), on 1 GPU and several. Only the transformer is parallelised: the HunyuanVideo repo's xDiT
# integration wraps the transformer alone (hyvideo/inference.py `parallelize_transformer`; its README says nothing of
# a parallel VAE; xDiT's L20 script asserts `use_parallel_vae is False`), the Wan repository decodes on rank 0, so
# text encoders and the VAE are counted as serial (every rank runs them whole, or one while the others wait).
# "family": one implementation (the held-out checks fit within it). "branches": transformer calls per step
# (HunyuanVideo: cfg_scale 1 with embedded guidance; Wan: CFG, 2 calls). "vae": diffusers' class at its default
# (published) config and the latent decoded, tiled as the pipeline decodes it. "text_encoders": (name, parameters,
# tokens) per prompt; FLOPs 2 x parameters x tokens.
# Session 15 checked issue 17's Wan example ("USP on Wan2.1-1.3B, 8xH100: 6.77x") against the Wan2.1 README: its
# efficiency table has no such row (1.3B only on RTX 4090, Ring 8; 14B on H800/H100, H20, A800/A100), so the point is
# replaced by the table's 14B rows below.
_XDIT_HY = ("github.com/xdit-project/xDiT docs/performance/hunyuanvideo.md, 'HunyuanVideo Performance Report' "
            "(Ulysses latency, 50 steps, official HunyuanVideo repository on H100 / H20; the diffusers implementation "
            "on L20)")
_HY = {"dim": 3072, "heads": 24, "ffn": 12288, "layers": 60, "text": 256, "cross": False, "branches": 1,
       "text_encoders": [("llava-llama-3-8b", 8.03e9, 256 + 95), ("clip-vit-large text", 1.23e8, 77)]}
_HY_720 = dict(_HY, tokens=33 * 45 * 80,
               vae={"cls": "AutoencoderKLHunyuanVideo", "latent": (1, 16, 33, 90, 160), "tiling": True})
_HY_960 = dict(_HY, tokens=33 * 60 * 60,
               vae={"cls": "AutoencoderKLHunyuanVideo", "latent": (1, 16, 33, 120, 120), "tiling": True})
# The Wan2.1 repository's own table: T2V-14B at 720p (latent 21x90x160: 75,600 tokens), 50 steps, CFG as two calls
# per step, Ulysses over all GPUs (40 heads), the transformer and T5 sharded by FSDP (`--dit_fsdp --t5_fsdp`: every
# call all-gathers the transformer's bf16 weights, counted as communication), the VAE decode on rank 0 only; on one
# GPU the models are offloaded to the CPU around the steps (`offload_model` defaults to True there: a few model moves
# per generation, not counted).
_WAN_README = ("github.com/Wan-Video/Wan2.1 README, 'Computational Efficiency on Different GPUs' (assets/"
               "comp_effic.png, unchanged since 2025-02-25), {task}-14B 720P, 'Total time (s)'")
_WAN_14B_720 = {"family": "Wan2.1-T2V-14B FSDP + xDiT USP",
                "tokens": 21 * 45 * 80, "dim": 5120, "heads": 40, "ffn": 13824, "layers": 40, "text": 512,
                "cross": True, "text_dim": 4096, "patch_in": 16 * 1 * 2 * 2, "branches": 2, "fsdp_params": 14.0e9,
                "vae": {"cls": "AutoencoderKLWan", "latent": (1, 16, 21, 90, 160), "tiling": False},
                "text_encoders": [("umt5-xxl encoder (prompt + negative prompt)", 5.7e9, 2 * 512)]}
# I2V-14B: the same transformer with 36 input channels and the image's 257 CLIP tokens beside the 512 text tokens in
# every cross-attention, 40 steps; every rank encodes the conditioning video (the image and 80 empty frames) with the
# VAE and the image with CLIP ViT-H/14 (632M parameters, fp16), both serial.
_WAN_I2V_14B_720 = dict(_WAN_14B_720, family="Wan2.1-I2V-14B FSDP + xDiT USP", text=512 + 257, patch_in=36 * 1 * 2 * 2,
                        steps=40, vae=dict(_WAN_14B_720["vae"], encode=(1, 3, 81, 720, 1280)),
                        text_encoders=[*_WAN_14B_720["text_encoders"], ("clip vit-h/14 visual", 6.32e8, 257)])
# Not used: the table's T2V-1.3B row (RTX 4090, PCIe): its 1-GPU run offloads the model and encodes the text on the
# CPU (`--offload_model True --t5_cpu`), its multi-GPU runs do not: the speedups would compare two pipelines.
# Per GPU type: dense bf16 tensor peak relative to H100 SXM's 989 TFLOP/s, and the per-direction link bandwidth
# relative to NVLink4's 450 GB/s (H20: NVLink, 148 TFLOP/s; L20: PCIe Gen4 x16, 32 GB/s, 119.5 TFLOP/s). The Wan
# table names "H800/H100" and "A800/A100": the first named is taken (the export variants, NVLink 400 GB/s in both
# directions: 200 GB/s per direction; A800 312 TFLOP/s).
GPUS = {"H100": {"rate_scale": 1.0, "bandwidth_scale": 1.0, "link": "NVLink"},
        "H800": {"rate_scale": 1.0, "bandwidth_scale": 200 / 450, "link": "NVLink"},
        "A800": {"rate_scale": 312 / 989, "bandwidth_scale": 200 / 450, "link": "NVLink"},
        "H20": {"rate_scale": 148 / 989, "bandwidth_scale": 1.0, "link": "NVLink"},
        "L20": {"rate_scale": 119.5 / 989, "bandwidth_scale": 32 / 450, "link": "PCIe"}}


def _wan_rows(base: dict, task: str, latencies: dict[str, dict[int, float]]) -> list[dict]:
    """One published case per GPU type of the Wan2.1 README's table (``task`` "T2V" or "I2V")."""
    return [dict(base, name=f"{base['family']} 1280x720x81f, {gpu}", gpu=gpu, latency_s=lat,
                 source=_WAN_README.format(task=task) + f": {lat[1]} s on 1 GPU, "
                 + " / ".join(str(lat[p]) for p in (2, 4, 8)) + " s on 2 / 4 / 8")
            for gpu, lat in latencies.items()]


def published_speedups(pub: dict) -> dict[int, float]:
    """A published case's speedups over its 1-GPU latency."""
    lat = pub["latency_s"]
    return {p: round(lat[1] / t, 4) for p, t in lat.items() if p > 1}


PUBLISHED = [
    dict(_HY_720, family="HunyuanVideo xDiT (USP)",
         name="HunyuanVideo xDiT (USP) 1280x720x129f, H100", gpu="H100", source=_XDIT_HY + ": 1904.08 s on "
         "1 GPU, 925.04 / 514.08 / 337.58 s on 2 / 4 / 8 (the HunyuanVideo README quotes 934.09 s for 2 GPUs, the "
         "report's 960x960 figure)",
         latency_s={1: 1904.08, 2: 925.04, 4: 514.08, 8: 337.58}),
    dict(_HY_720, family="HunyuanVideo xDiT (USP)",
         name="HunyuanVideo xDiT (USP) 1280x720x129f, H20", gpu="H20", source=_XDIT_HY + ": 6639.17 s on "
         "1 GPU, 3400.55 / 1762.86 / 940.97 s on 2 / 4 / 8",
         latency_s={1: 6639.17, 2: 3400.55, 4: 1762.86, 8: 940.97}),
    dict(_HY_960, family="HunyuanVideo xDiT (USP)",
         name="HunyuanVideo xDiT (USP) 960x960x129f, H100", gpu="H100", source=_XDIT_HY + ": 1735.01 s on "
         "1 GPU, 934.09 / 645.45 / 367.02 s on 2 / 3 / 6",
         latency_s={1: 1735.01, 2: 934.09, 3: 645.45, 6: 367.02}),
    dict(_HY_960, family="HunyuanVideo xDiT (USP)",
         name="HunyuanVideo xDiT (USP) 960x960x129f, H20", gpu="H20", source=_XDIT_HY + ": 6621.46 s on "
         "1 GPU, 3400.55 / 2310.48 / 1214.67 s on 2 / 3 / 6",
         latency_s={1: 6621.46, 2: 3400.55, 3: 2310.48, 6: 1214.67}),
    dict(_HY_720, family="HunyuanVideo diffusers + xDiT USP",
         name="HunyuanVideo diffusers + xDiT USP 1280x720x129f, L20 (PCIe)", gpu="L20",
         source=_XDIT_HY + ": 6043.88 s on 1 GPU, 3271.44 / 2080.05 s on 2 / 4",
         latency_s={1: 6043.88, 2: 3271.44, 4: 2080.05}),
    dict(_HY_960, family="HunyuanVideo diffusers + xDiT USP",
         name="HunyuanVideo diffusers + xDiT USP 960x960x129f, L20 (PCIe)", gpu="L20",
         source=_XDIT_HY + ": 6039.08 s on 1 GPU, 3260.62 / 2284.74 s on 2 / 3 (the 3-GPU figure as corrected in "
         "xDiT commit 57eb27f, 2024-12-27, from 2070.96 s)",
         latency_s={1: 6039.08, 2: 3260.62, 3: 2284.74}),
    *_wan_rows(_WAN_14B_720, "T2V", {"H800": {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9},
                                     "H20": {1: 6935.5, 2: 3488.4, 4: 1775.8, 8: 980.5},
                                     "A800": {1: 3342.6, 2: 1722.0, 4: 886.1, 8: 469.9}}),
    *_wan_rows(_WAN_I2V_14B_720, "I2V", {"H800": {1: 1491.6, 2: 753.9, 4: 403.9, 8: 238.8},
                                         "H20": {1: 5494.8, 2: 2756.6, 4: 1417.0, 8: 778.2},
                                         "A800": {1: 2715.5, 2: 1371.7, 4: 716.1, 8: 389.7}}),
]
STEPS = 50


def vae_decode_flops(cls_name: str, latent: tuple[int, ...], tiling: bool, *, encode: bool = False) -> float:
    """FLOPs of one VAE decode of ``latent`` (or, with ``encode``, one encode of the video ``latent`` names),
    counted by ``torch.utils.flop_counter`` on diffusers' ``cls_name`` at its default (published) config, built on the
    meta device: shapes only, no weights, no compute (seconds to minutes of Python). Counted at the full size, not
    scaled from a small one: the decode is not linear in the latent volume (causal first frame, the mid-block's
    attention over all latent tokens, tile overlaps)."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = getattr(diffusers, cls_name)()
    if tiling:
        vae.enable_tiling()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        (vae.encode if encode else vae.decode)(torch.empty(latent, device="meta"))
    return float(counter.get_total_flops())


def serial_flops(pub: dict) -> dict:
    """The not-parallelised FLOPs of one generation of a published case: VAE decode (and the encode of a
    conditioning video, where there is one) and the text / image encoders."""
    vae = pub["vae"]
    parts = {"vae_decode": vae_decode_flops(vae["cls"], vae["latent"], vae["tiling"])}
    if "encode" in vae:
        parts["vae_encode"] = vae_decode_flops(vae["cls"], vae["encode"], vae["tiling"], encode=True)
    text = {name: 2.0 * params * tokens for name, params, tokens in pub["text_encoders"]}
    return {**parts, "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in vae.items()},
            "text_encoders": text, "total": sum(parts.values()) + sum(text.values())}


def _generic_step_flops(tokens: int, dim: int, ffn: int, layers: int, text: int, cross: bool,
                        rows: int | None = None) -> float:
    """Dense (``rows=None``) or row-subset FLOPs of one call of a DiT: Wan-style (self + cross + FFN) or joint
    attention over ``tokens + text`` (HunyuanVideo-style, ``cross=False``)."""
    q = tokens if rows is None else rows
    if cross:
        per = 2 * 4 * q * dim * dim + 2 * 2 * tokens * dim * dim + 4 * q * tokens * dim + 4 * q * text * dim \
            + 2 * 2 * q * dim * ffn
    else:
        s = tokens + text
        per = 2 * 4 * s * dim * dim + 4 * s * s * dim + 2 * 2 * s * dim * ffn
    return float(per * layers)


def _generic_replicated_flops(pub: dict) -> float:
    """FLOPs of one call that every rank runs whole under a sequence split. Wan-style (``cross``): the text K/V
    projections of every cross-attention (the text is not split), the text embedder (``text_dim -> dim -> dim``)
    and the patch embedding (run on the whole latent before the split, as diffusers' plan and the Wan repository's
    USP do). HunyuanVideo-style: 0 (how xDiT places its 256 text tokens among the ranks was not read; at most 0.2%
    of the sequence)."""
    if not pub["cross"]:
        return 0.0
    d, text = pub["dim"], pub["text"]
    return float(pub["layers"] * 2 * 2 * text * d * d + 2 * text * (pub["text_dim"] * d + d * d)
                 + 2 * pub["tokens"] * d * pub["patch_in"])


def replicated_flops(geo, setting) -> float:
    """The replicated FLOPs of one Wan call at ``setting`` (:mod:`vdit_accel.bench.flops` terms): the patch, time
    and text embeddings, and the cross-attention text K/V of every layer where the setting computes them (dense
    steps; Astraea computes them once per generation)."""
    from vdit_accel.bench.flops import block_flops, overhead_flops

    over = overhead_flops(geo)
    return float(over["total"] - over["head"] + geo.num_layers * block_flops(geo, setting)["cross_kv"])


def comm_seconds(tokens: int, dim: int, layers: int, ulysses: int, ring: int, *, budget: float = 1.0,
                 bytes_per: int = 2, bandwidth: float, latency: float) -> float:
    """Communication of one call on ``ulysses x ring`` GPUs: 4 all-to-alls per layer inside each Ulysses group
    (q and out carry ``budget`` of the rows), and the K/V all-gather of Ring (no overlap with compute)."""
    p = ulysses * ring
    if p == 1:
        return 0.0
    local = tokens / p * dim * bytes_per  # bytes of one [S/P, C] tensor
    t = 0.0
    if ulysses > 1:
        vol = (2 * budget + 2) * local * (ulysses - 1) / ulysses
        t += vol / bandwidth + 4 * latency
    if ring > 1:
        kv = 2 * (tokens / ring) * (dim / ulysses) * bytes_per * (ring - 1) / ring
        t += kv / bandwidth + latency
    return t * layers


def fsdp_seconds(params: float, p: int, *, bytes_per: int = 2, bandwidth: float) -> float:
    """The weight all-gather of one call of a transformer sharded by FSDP over ``p`` GPUs: each rank receives the
    ``(p-1)/p`` of the ``params`` it does not hold (no overlap with compute)."""
    return params * bytes_per * (p - 1) / p / bandwidth if p > 1 else 0.0


def within_15pct(errors) -> str:
    """``"k of n"``: how many relative errors are within the validation bar of ±15%."""
    errors = list(errors)
    return f"{sum(abs(e) <= 0.15 for e in errors)} of {len(errors)}"


def held_out_folds(rows: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
    """Folds for checking a one-parameter form of the model's residual out of sample, per implementation
    (``family``): where a family was published on several GPU types, each type is judged with the parameter fitted
    on the family's other types (a GPU of another speed: the strong test); where on one type only, each published
    row (resolution) is judged with it fitted on the family's other rows. Returns ``(judged_on, fit_rows,
    judged_rows)`` per fold."""
    folds = []
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        key = "gpu" if len({r["gpu"] for r in fam}) > 1 else "case"
        for unit in dict.fromkeys(r[key] for r in fam):
            fit = [r for r in fam if r[key] != unit]
            if fit:
                folds.append((unit, fit, [r for r in fam if r[key] == unit]))
    return folds


def _fold_summary(folds: list[dict]) -> dict:
    return {"folds": folds, "within_15pct": within_15pct(j["error"] for f in folds for j in f["judged"])}


def fixed_overhead_cross_check(validation: list[dict]) -> dict:
    """Is the model's residual a fixed cost in seconds per call that does not shrink with the GPU's speed? Per
    :func:`held_out_folds`: the median residual of the fitted rows' multi-GPU points is added to every call of the
    model on the judged rows, and compared with the published speedups there. A check of the residual's form, not a
    tuned fit."""
    folds = []
    for unit, fit, judged_rows in held_out_folds(validation):
        c = statistics.median(v["residual_s_per_call"] for v in fit)
        judged = []
        for v in judged_rows:
            pred = v["model_1gpu_s"] / (v["calls"] * (v["model_call_s"] + c) + v["serial_s"])
            judged.append({"case": v["case"], "gpus": v["gpus"], "published": v["published"],
                           "predicted": round(pred, 3), "error": round(pred / v["published"] - 1, 4)})
        folds.append({"family": fit[0]["family"], "judged_on": unit, "fitted_on": sorted({v["case"] for v in fit}),
                      "fixed_s_per_call": round(c, 4), "judged": judged})
    return _fold_summary(folds)


def implied_serial_s(t1: float, tp: float, p: int, comm: float) -> float:
    """The serial seconds ``S`` per generation that make ``T_P = (T_1 - S)/P + S + comm`` meet a published pair
    ``(T_1, T_P)`` (``comm``: the model's communication seconds of the whole generation on ``P`` GPUs)."""
    return t1 - (t1 - tp + comm) * p / (p - 1)


def serial_seconds_cross_check(validation: list[dict]) -> dict:
    """Is the model's residual a **serial phase** of fixed seconds per generation (outside the parallel transformer,
    not faster on a faster GPU), rather than a cost per parallel call? Per published point (absolute latencies),
    :func:`implied_serial_s`; per :func:`held_out_folds`, ``S`` is the median over the fitted rows and the judged
    points are predicted from their own 1-GPU latency: ``T_P = (T_1 - S)/P + S + comm``. Also, ``across
    implementations``: the L20 runs (diffusers' pipeline) judged with ``S`` fitted on every point of the official
    HunyuanVideo repository's runs (does a serial phase carry over to another pipeline?). Fitted on some points,
    judged on others: a check of the residual's form, not a tuned fit."""
    comm = {(v["case"], v["gpus"]): v["comm_s_per_call"] * v["calls"] for v in validation}
    points = []
    for pub in PUBLISHED:
        lat = pub["latency_s"]
        for p, tp in lat.items():
            if p > 1:
                c = comm[(pub["name"], p)]
                points.append({"case": pub["name"], "family": pub["family"], "gpu": pub["gpu"], "gpus": p,
                               "t1": lat[1], "tp": tp, "comm_s": c,
                               "implied_serial_s": implied_serial_s(lat[1], tp, p, c)})

    def judge(pt: dict, serial: float) -> dict:
        pred = pt["t1"] / ((pt["t1"] - serial) / pt["gpus"] + serial + pt["comm_s"])
        published = pt["t1"] / pt["tp"]
        return {"case": pt["case"], "gpus": pt["gpus"], "published": round(published, 4),
                "predicted": round(pred, 3), "error": round(pred / published - 1, 4)}

    folds = []
    for unit, fit, judged_rows in held_out_folds(points):
        serial = statistics.median(pt["implied_serial_s"] for pt in fit)
        folds.append({"family": fit[0]["family"], "judged_on": unit, "fitted_on": sorted({pt["case"] for pt in fit}),
                      "serial_s": round(serial, 2), "judged": [judge(pt, serial) for pt in judged_rows]})
    result = {"implied_serial_s": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in pt.items()}
                                   for pt in points], **_fold_summary(folds)}
    source, target = "HunyuanVideo xDiT (USP)", "HunyuanVideo diffusers + xDiT USP"
    serial = statistics.median(pt["implied_serial_s"] for pt in points if pt["family"] == source)
    judged = [judge(pt, serial) for pt in points if pt["family"] == target]
    result["across_implementations"] = {"fitted_on": source, "judged_on": target, "serial_s": round(serial, 2),
                                        "judged": judged, "within_15pct": within_15pct(j["error"] for j in judged)}
    return result


def step_cost_model(args, *, kv_reuse: bool):
    """Astraea's relative step costs for the predictions: from ``--step-bench`` (a ``vdit-accel bench-step`` result,
    e.g. measured at the full geometry: its settings' composed step times over dense, those of ``kv_reuse``) or else
    the ``--latency-model`` JSON (the search's latency model, W2 width, 3,840 tokens)."""
    from vdit_accel.bench.step import latency_model_from
    from vdit_accel.search.latency import LatencyModel

    if args.step_bench:
        return latency_model_from(json.loads(Path(args.step_bench).read_text()), kv_reuse)
    return LatencyModel.load(args.latency_model)


def model(args) -> dict:
    from vdit_accel.bench.flops import Setting, WanGeometry, step_flops
    from vdit_accel.parallel import degrees_for
    from vdit_accel.search.latency import StepChoice
    from vdit_accel.search.presets import load_preset

    rate, bw, lat = args.rate, args.bandwidth, args.latency
    cfg = load_preset(args.preset, steps=50)
    lm = step_cost_model(args, kv_reuse=bool(getattr(cfg, "kv_reuse", False)))
    inputs = {"rate_flops_per_gpu": rate, "bandwidth_bytes_per_s": bw, "latency_s": lat, "bytes_per_element": 2,
              "overlap": "none", "preset": args.preset,
              "step_costs": {"source": args.step_bench or args.latency_model, "geometry": lm.geometry,
                             "dense_step_s": lm.dense_step_s,
                             "relative_costs": [{"budget": b, "order": o, "relative_cost": c}
                                                for (b, o), c in sorted(lm.costs.items())]},
              "notes": "rate: achieved bf16 throughput per H100 (assumed ~40% of the 989 TFLOP/s dense peak); "
                       "bandwidth: achieved NCCL all-to-all/all-gather bandwidth per GPU on NVLink4 (assumed 75% "
                       "of the 450 GB/s per direction of H100 SXM); latency per collective assumed 20 us."}
    # validation on published dense figures
    validation, serial_parts, serial_cache = [], {}, {}
    for pub in PUBLISHED:
        f_rep = _generic_replicated_flops(pub)  # in every rank's call whole, besides its share of f1
        f1 = _generic_step_flops(pub["tokens"], pub["dim"], pub["ffn"], pub["layers"], pub["text"], pub["cross"])
        calls = pub.get("steps", STEPS) * pub["branches"]
        gpu = GPUS[pub["gpu"]]
        rate_c, bw_c = rate * gpu["rate_scale"], bw * gpu["bandwidth_scale"]  # the same efficiencies on every GPU
        key = repr((sorted(pub["vae"].items()), pub["text_encoders"]))  # the GPU types of one case share it
        if key not in serial_cache:
            serial_cache[key] = serial_flops(pub)
        serial_parts[pub["name"]] = parts = dict(serial_cache[key])
        t_serial = parts["total"] / rate_c  # at the same R, on one GPU whatever P
        t1 = calls * (f1 + f_rep) / rate_c + t_serial
        parts["share_of_1gpu_time"] = round(t_serial / t1, 5)
        for p, measured in published_speedups(pub).items():
            u, r = degrees_for(p, pub["heads"])
            comm = comm_seconds(pub["tokens"], pub["dim"], pub["layers"], u, r, bandwidth=bw_c, latency=lat)
            comm += fsdp_seconds(pub.get("fsdp_params", 0.0), p, bandwidth=bw_c)
            step_p = f1 / (rate_c * p) + f_rep / rate_c + comm
            pred, pred_transformer = t1 / (calls * step_p + t_serial), ((f1 + f_rep) / rate_c) / step_p
            t_pub = t1 / measured  # the published time in the model's 1-GPU units
            validation.append({"case": pub["name"], "family": pub["family"], "gpu": pub["gpu"], "gpus": p,
                               "ulysses": u, "ring": r,
                               "published": measured,
                               "comm_s_per_call": round(comm, 4), "compute_s_per_call": round(f1 / (rate_c * p), 4),
                               "replicated_s_per_call": round(f_rep / rate_c, 5),
                               "residual_s_per_call": round((t_pub - t1 / pred) / calls, 4),
                               "model_call_s": step_p, "model_1gpu_s": t1, "serial_s": t_serial, "calls": calls,
                               "predicted": round(pred, 3), "error": round(pred / measured - 1, 4),
                               "predicted_transformer_only": round(pred_transformer, 3),
                               "error_transformer_only": round(pred_transformer / measured - 1, 4),
                               "source": pub["source"]})
    out = {"format": FORMAT, "kind": "model", "inputs": inputs, "validation": validation,
           "serial_parts": serial_parts,
           "validated_within_15pct": all(abs(v["error"]) <= 0.15 for v in validation),
           "within_15pct": within_15pct(v["error"] for v in validation),
           "within_15pct_by_link": {
               link: within_15pct(v["error"] for v in validation if GPUS[v["gpu"]]["link"] == link)
               for link in dict.fromkeys(g["link"] for g in GPUS.values())}}
    out["fixed_overhead_cross_check"] = fixed_overhead_cross_check(validation)
    out["serial_seconds_cross_check"] = serial_seconds_cross_check(validation)
    # the pessimistic variants: the largest residual (after the serial parts above) on the predictions' GPU class
    # read as a fixed per-step overhead that no method removes: over every H100 point (HunyuanVideo), and over the
    # Wan2.1 table's H800 points (the family predicted, an H100-class GPU with half the NVLink)
    variants = {"pessimistic": ("serial_fraction", lambda v: v["gpu"] == "H100"),
                "pessimistic_wan": ("serial_fraction_wan", lambda v: v["gpu"] == "H800" and "Wan2.1" in v["case"])}
    fractions = {}
    for variant, (key, pick) in variants.items():
        worst = max((v for v in validation if pick(v)), key=lambda v: v["error"])
        p_w = worst["gpus"]
        fractions[variant] = max(0.0, (1.0 / worst["published"] - 1.0 / worst["predicted"]) / (1.0 - 1.0 / p_w))
        out[key] = {"value": round(fractions[variant], 4), "fitted_on": f"{worst['case']}, {p_w} GPUs",
                    "meaning": "a fixed per-step cost, as a fraction of one dense 1-GPU step, that makes the model "
                               "(serial VAE and text encoders included) meet that published point; added to dense "
                               f"and Astraea alike on P > 1 GPUs in the '{variant}' predictions"}
    out["cpu_check"], out["cpu_check_within_15pct"] = {}, {}
    for path in args.measured:  # one entry per measurement, named by its mesh and file: "ring2: measured-ring.json"
        m = json.loads(Path(path).read_text())
        mesh = m.get("mesh", {"ulysses": m["nproc"], "ring": 1})
        key = "x".join(f"{k}{v}" for k, v in mesh.items() if v > 1) + f": {Path(path).name}"
        out["cpu_check"][key] = {"file": path, "settings": {
            k: {"measured_parallel_s": v["parallel_s"],
                **{f"{name}_{what}": v[f"{name}_model_{what}"] for name in MODELS for what in ("parallel_s", "error")}}
            for k, v in m["settings"].items()}}
        out["cpu_check_within_15pct"][key] = {name: all(abs(v[f"{name}_model_error"]) <= 0.15
                                                        for v in m["settings"].values()) for name in MODELS}
    # predictions
    schedule = [StepChoice(b, o) for b, o in zip(cfg.schedule, cfg.orders, strict=True)]
    preds = {}
    for name, spec in (("Wan2.1-T2V-1.3B", WAN_1_3B), ("Wan2.1-T2V-14B", WAN_14B)):
        geo = WanGeometry(text_len=512, grid=FULL_GRID, **spec)
        dim = geo.dim
        dense_f = step_flops(geo, Setting())
        rep_d = replicated_flops(geo, Setting())  # per call, whole on every rank
        rep_a = replicated_flops(geo, Setting(budget=0.5))  # Astraea's calls: text K/V once per generation
        rows = {}
        t_dense_1 = None
        for p in (1, 2, 4, 8):
            u, r = degrees_for(p, geo.heads)
            comm_d = comm_seconds(geo.tokens, dim, geo.num_layers, u, r, bandwidth=bw, latency=lat)
            t_dense = 50 * (dense_f / (rate * p) + rep_d * (1 - 1 / p) / rate + comm_d)
            t_ast = sum(dense_f * lm.cost(c) / (rate * p) + rep_a * (1 - 1 / p) / rate
                        + (comm_seconds(geo.tokens, dim, geo.num_layers, u, r, budget=c.budget, bandwidth=bw,
                                        latency=lat) if c.budget > 0 else 0.0) for c in schedule)
            if p == 1:
                t_dense_1 = t_dense
            rows[p] = {"ulysses": u, "ring": r, "dense_s_per_branch": round(t_dense, 3),
                       "astraea_s_per_branch": round(t_ast, 3),
                       "dense_speedup_vs_1gpu": round(t_dense_1 / t_dense, 3),
                       "astraea_gain_over_dense_same_gpus": round(t_dense / t_ast, 3),
                       "astraea_gain_over_1_dense_gpu": round(t_dense_1 / t_ast, 3)}
            for variant, fraction in fractions.items():
                fixed = 0.0 if p == 1 else 50 * fraction * dense_f / rate  # per step, not parallelised
                rows[p][variant] = {
                    "dense_speedup_vs_1gpu": round(t_dense_1 / (t_dense + fixed), 3),
                    "astraea_gain_over_dense_same_gpus": round((t_dense + fixed) / (t_ast + fixed), 3),
                    "astraea_gain_over_1_dense_gpu": round(t_dense_1 / (t_ast + fixed), 3)}
        one = rows[1]["astraea_gain_over_dense_same_gpus"]
        preds[name] = {"geometry": geo.to_dict(), "gpus": rows,
                       "replicated_share_of_dense_call": round(rep_d / dense_f, 6),
                       "kept_of_one_gpu_gain_at_8": round(rows[8]["astraea_gain_over_dense_same_gpus"] / one, 3),
                       **{f"kept_of_one_gpu_gain_at_8_{variant}": round(
                           rows[8][variant]["astraea_gain_over_dense_same_gpus"] / one, 3) for variant in fractions}}
    out["predictions"] = preds
    out["label"] = ("PREDICTIONS of a scaling model (inputs above; validation residuals listed), not measurements; "
                    "50 steps per CFG branch, transformer only")
    return out


# ------------------------------------------------------------------------------- (c) per-rank vs global top-k
def fidelity(args) -> dict:
    """PSNR against dense of Astraea with the global top-k (one process) and with the per-rank top-k of ``G``
    context-parallel ranks (each shard's budget from its own shard, simulated on one process: the selection the
    CP tests show the ranks make, bit for bit), on the embedded model."""
    from vdit_accel.bench.harness import BENCH_PROMPTS
    from vdit_accel.bench.metrics import psnr
    from vdit_accel.cli import _load_model
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.methods.astraea import apply_astraea
    from vdit_accel.parallel.cp import simulate_rank_selection
    from vdit_accel.search.presets import load_preset

    model = _load_model(None)
    cfg = load_preset(args.preset, steps=args.steps)
    gen = GenerationConfig(steps=args.steps, seed=0)
    rows = []
    for prompt in BENCH_PROMPTS[: args.prompts]:
        dense = Sampler(model)(prompt, gen, progress=False)
        row = {"prompt": prompt}
        for groups in (1, *args.groups):
            handle = apply_astraea(model.transformer, cfg)
            simulate_rank_selection(handle, groups)
            try:
                video = Sampler(model)(prompt, gen, progress=False)
            finally:
                handle.remove()
            row["global" if groups == 1 else f"ranks{groups}"] = psnr(video, dense)
        rows.append(row)
    keys = [k for k in rows[0] if k != "prompt"]
    return {"format": FORMAT, "kind": "fidelity", "command": "python " + " ".join(sys.argv), "preset": args.preset,
            "steps": args.steps, "model": model.config.model_id, "tokens": 2048, "rows": rows,
            "mean_psnr": {k: statistics.mean(r[k] for r in rows) for k in keys}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--nproc", type=int, default=2)
    m.add_argument("--mesh", choices=("ulysses", "ring"), default="ulysses",
                   help="ulysses: as far as the heads divide (degrees_for), ring: Ring over all ranks")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--latent", type=int, nargs=3, default=(2, 60, 104), help="latent T H W (grid 2x30x52 = 3120)")
    m.add_argument("--text-len", type=int, default=512)
    m.add_argument("--budgets", type=float, nargs="*", default=(0.5, 0.25))
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--rounds", type=int, default=1, help="spawns of the interleaved measurement, pooled")
    m.add_argument("--timeout", type=float, default=3600)
    m.add_argument("--tiny", action="store_true", help="smoke: a tiny width (2 heads x 16)")
    m.add_argument("--out", required=True)
    s = sub.add_parser("model")
    s.add_argument("--measured", nargs="*", default=(), help="measure JSONs (one per mesh; adds the CPU check)")
    s.add_argument("--rate", type=float, default=400e12)
    s.add_argument("--bandwidth", type=float, default=340e9)
    s.add_argument("--latency", type=float, default=20e-6)
    s.add_argument("--latency-model", default="docs/results/bench-step/latency-kv/latency.json")
    s.add_argument("--step-bench", default=None, help="a bench-step.json: Astraea's relative step costs from its "
                   "settings instead of --latency-model (e.g. measured at the full geometry)")
    s.add_argument("--preset", default="astraea-3x")
    s.add_argument("--out", required=True)
    f = sub.add_parser("fidelity")
    # a token-wise schedule (per-rank vs global top-k is moot on whole-step presets such as today's astraea-3x): the
    # greedy astraea-3x shipped until session 11, with which the committed fidelity figures were made
    f.add_argument("--preset", default="docs/results/astraea/presets-joint-d4/astraea-3x.json")
    f.add_argument("--steps", type=int, default=50)
    f.add_argument("--prompts", type=int, default=2)
    f.add_argument("--groups", type=int, nargs="*", default=(2, 4, 8))
    f.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "fidelity":
        result = fidelity(a)
    elif a.cmd == "measure":
        a.latent = tuple(a.latent)
        result = measure(a)
    else:
        result = model(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("settings", "validation", "predictions", "cpu_check", "mean_psnr")
                      if k in result},
                     indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
