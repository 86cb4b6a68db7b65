"""The instrument report: does the embedded model resemble a real vDiT where the methods care?

Two measurements at the bench geometry, during a real generation:

1. Q/K adjacency: per layer, the mean absolute difference of post-RoPE Q and K between adjacent tokens
   along t, h and w, per RoPE channel group, relative to the mean |value| of that group (so layers
   and groups compare), and the same for random token pairs as a reference.
2. Time share: the fraction of transformer forward time spent in video self-attention: the whole
   ``attn1`` module (projections, norm, RoPE, attention, output) and the attention core alone.

Measured by a tap processor that computes exactly what the stock processor computes (the model's
output is unchanged) and records what it sees.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from vdit_accel.adapters import ModelAdapter, resolve_adapter
from vdit_accel.instrument.sampler import GenerationConfig, Sampler

AXES = ("t", "h", "w")


class _TapProcessor:
    """Stock-equivalent self-attention (any family, through the adapter) recording adjacency statistics and core
    time; calls the adapter does not split (not video self-attention) go to the stock processor."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, grid_ref: list, record: dict, groups: dict[str, slice], measure: bool,
                 adapter: ModelAdapter, original) -> None:
        self.layer, self.grid_ref, self.record, self.groups, self.measure = layer, grid_ref, record, groups, measure
        self.adapter, self.original = adapter, original

    def __call__(self, attn, *args, **kwargs):
        call = self.adapter.qkv(attn, args, kwargs)
        if call is None:
            return self.original(attn, *args, **kwargs)
        if self.measure:
            end = call.q.shape[1] - call.text_suffix
            self._adjacency(call.q[:, call.text_prefix:end], "q")
            self._adjacency(call.k[:, call.text_prefix:end], "k")
        t0 = time.perf_counter()
        out = self.adapter.attention(attn, call)
        self.record["core_s"] += time.perf_counter() - t0
        return self.adapter.attention_output(attn, out, call)

    def _adjacency(self, x: torch.Tensor, name: str) -> None:
        t, h, w = self.grid_ref[0]
        b, s, nh, d = x.shape
        x5 = x.float().reshape(b, t, h, w, nh, d)
        gen = torch.Generator().manual_seed(self.layer)
        perm = torch.randperm(s, generator=gen)
        flat = x.float()
        for g, sl in self.groups.items():
            scale = flat[..., sl].abs().mean().item()
            for dim, ax in zip((1, 2, 3), AXES):
                diff = (x5.narrow(dim, 1, x5.shape[dim] - 1) - x5.narrow(dim, 0, x5.shape[dim] - 1))[..., sl]
                self.record["adj"][(self.layer, name, g, ax)].append(diff.abs().mean().item() / scale)
            rnd = (flat[:, perm, :, sl] - flat[..., sl]).abs().mean().item() / scale
            self.record["adj"][(self.layer, name, g, "random")].append(rnd)


@torch.no_grad()
def inspect_model(sampler: Sampler, prompts: list[str], cfg: GenerationConfig) -> dict:
    """Run ``prompts`` through a generation with tap processors; return the instrument report."""
    transformer = sampler.model.transformer
    adapter = resolve_adapter(transformer)
    groups = adapter.rope_groups(transformer)
    record = {"core_s": 0.0, "adj": defaultdict(list)}
    grid_ref = [None]
    blocks = adapter.blocks(transformer)
    attns = [adapter.self_attention(b) for b in blocks]
    originals = [a.get_processor() for a in attns]
    attn_time = [0.0]
    starts: dict[int, float] = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        attn_time[0] += time.perf_counter() - starts.pop(id(mod))

    def root_pre(mod, args, kwargs):
        grid_ref[0] = adapter.layout(mod, args, kwargs).grid

    handles = [a.register_forward_pre_hook(pre) for a in attns] + [a.register_forward_hook(post) for a in attns]
    handles.append(transformer.register_forward_pre_hook(root_pre, with_kwargs=True))
    total = [0.0]
    try:
        # pass 1: timing only (no statistics overhead inside the measured attention time)
        for i, (a, orig) in enumerate(zip(attns, originals)):
            adapter.install_processor(a, _TapProcessor(i, grid_ref, record, groups, False, adapter, orig))
        t0 = time.perf_counter()
        for p in prompts:
            sampler(p, cfg, progress=False)
        total[0] = time.perf_counter() - t0
        timing = {"attn1_s": attn_time[0], "core_s": record["core_s"], "total_s": total[0]}
        # pass 2: adjacency statistics
        for i, (a, orig) in enumerate(zip(attns, originals)):
            adapter.install_processor(a, _TapProcessor(i, grid_ref, record, groups, True, adapter, orig))
        for p in prompts:
            sampler(p, cfg, progress=False)
    finally:
        for h in handles:
            h.remove()
        for a, p in zip(attns, originals):
            adapter.restore_processor(a, p)
    adjacency = {}
    for (layer, name, g, ax), vals in sorted(record["adj"].items()):
        adjacency.setdefault(f"layer{layer}", {}).setdefault(name, {}).setdefault(g, {})[ax] = round(
            float(np.mean(vals)), 4)
    return {
        "grid": list(grid_ref[0]),
        "rope_groups": {g: [sl.start, sl.stop] for g, sl in groups.items()},
        "self_attention_share": round(timing["attn1_s"] / timing["total_s"], 4),
        "attention_core_share": round(timing["core_s"] / timing["total_s"], 4),
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "adjacency_rel_mad": adjacency,
        "note": "adjacency_rel_mad[layer][q|k][group][axis] = mean |x_i - x_neighbour| / mean |x| over the "
        "denoising run; 'random' = random token pairs",
    }


def format_report(rep: dict) -> str:
    lines = [
        f"grid (T', H', W') = {tuple(rep['grid'])}; RoPE groups (channels) = {rep['rope_groups']}",
        f"self-attention share of transformer time: {rep['self_attention_share']:.1%} "
        f"(attention core alone: {rep['attention_core_share']:.1%})",
        "relative mean |adjacent difference| of post-RoPE Q/K (lower = more redundant; 'random' = random pairs):",
        f"{'layer':>7} {'':2} {'group':>5} {'t':>7} {'h':>7} {'w':>7} {'random':>7}",
    ]
    for layer, per in rep["adjacency_rel_mad"].items():
        for name, groups in per.items():
            for g, axes in groups.items():
                lines.append(f"{layer:>7} {name:2} {g:>5} " + " ".join(f"{axes[a]:7.3f}" for a in (*AXES, "random")))
    return "\n".join(lines)
