"""Astraea's cache memory at full geometries, analytically (:func:`vdit_accel.methods.astraea.cache_bytes`).

The count is the one the implementation makes (a test checks it against the live caches of a real run): per
block and CFG branch, cached output and input, one ``[N, C]`` tensor per forecast order, K and V with K/V reuse,
LSE and three int64 counters per token, text K/V; x blocks x 2 CFG branches. A whole-step schedule (budgets 0/1
only) keeps the last block's output and differences only (``lean``).

    PYTHONPATH=src .venv/bin/python benchmarks/astraea_memory.py --out docs/results/astraea/memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vdit_accel.methods.astraea import cache_bytes

MODELS = {  # name: (dim, heads, layers, tokens at the geometry)
    "Wan2.1-T2V-1.3B, 480p x 81 frames (21x30x52 tokens)": (1536, 12, 30, 32760),
    "Wan2.1-T2V-14B, 480p x 81 frames (21x30x52 tokens)": (5120, 40, 40, 32760),
    "Wan2.1-T2V-14B, 720p x 81 frames (21x45x80 tokens)": (5120, 40, 40, 75600),
}
TEXT_TOKENS = 512


def lean_bytes(tokens: int, dim: int, order: int, dtype_bytes: int, branches: int = 2) -> int:
    """Whole-step schedules: the last block's output and ``order`` differences, plus two int64 counters."""
    return branches * tokens * ((1 + order) * dim * dtype_bytes + 2 * 8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = []
    for name, (dim, heads, layers, tokens) in MODELS.items():
        for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
            for order in (0, 1, 2):
                for kv in (False, True):
                    b = cache_bytes(tokens, dim, heads, layers, order=order, kv_reuse=kv, text_tokens=TEXT_TOKENS,
                                    dtype_bytes=nbytes)
                    rows.append({"model": name, "cache_dtype": dtype, "order": order, "kv_reuse": kv,
                                 "token_wise_gib": round(b / 2**30, 2),
                                 "whole_step_gib": round(lean_bytes(tokens, dim, order, nbytes) / 2**30, 3)})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format": "vdit-accel/astraea-memory", "command": "benchmarks/astraea_memory.py "
                               + " ".join(sys.argv[1:]), "text_tokens": TEXT_TOKENS, "branches": 2, "rows": rows},
                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
