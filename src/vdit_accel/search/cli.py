"""CLI glue for ``vdit-accel calibrate`` and ``vdit-accel search`` (kept out of the algorithms)."""

from __future__ import annotations

import json
from pathlib import Path

from vdit_accel.errors import ConfigError
from vdit_accel.search.presets import PRESETS_DIR, save_preset


def _model_and_sampler(weights):
    from vdit_accel.instrument.model import WEIGHTS_DIR, EmbeddedModel
    from vdit_accel.instrument.sampler import Sampler

    model = EmbeddedModel.load(weights or WEIGHTS_DIR)
    return model, Sampler(model)


def calibrate_cli(a) -> int:
    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.sampler import GenerationConfig

    prompts = resolve_prompts(a.prompts)
    gen = GenerationConfig(steps=a.steps)
    if a.method == "magcache":
        from vdit_accel.methods.magcache_ratios import RATIOS_FILE, calibrate_mag_ratios

        _, sampler = _model_and_sampler(a.weights)
        ratios = calibrate_mag_ratios(sampler, prompts[0], gen)
        print(f"wrote {len(ratios)} MagCache ratios to {RATIOS_FILE}")
        return 0
    if a.method != "timeripple":
        raise ConfigError(f"calibrate method {a.method!r} is unknown: choose one of ['timeripple', 'magcache']")
    if a.target is None:
        raise ConfigError("calibrate timeripple needs --target (QK savings in (0, 1), e.g. 0.85)")
    from vdit_accel.search.calibrate import calibrate_timeripple

    model, sampler = _model_and_sampler(a.weights)
    cfg, record = calibrate_timeripple(sampler, prompts, a.target, gen)
    out = Path(a.out) if a.out else PRESETS_DIR / f"timeripple-{round(a.target * 100)}.json"
    save_preset(out, "timeripple", cfg, model_id=model.config.model_id, geometry=list(sampler.geometry(gen)),
                steps=gen.steps, seed=gen.seed, record={"calibration": record})
    print(json.dumps({"preset": str(out), **record}, indent=1))
    return 0
