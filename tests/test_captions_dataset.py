import numpy as np
import pytest

from vdit_accel.errors import ConfigError, PromptError
from vdit_accel.instrument.captions import (
    BACKGROUND_COLOURS,
    MOTIONS,
    OBJECT_COLOURS,
    SHAPES,
    format_caption,
    parse_caption,
    tokenize,
)
from vdit_accel.instrument.dataset import (
    ANCHORED_BG_POSE,
    batch,
    heldout_combos,
    heldout_prompts,
    is_heldout,
    render,
    sample_spec,
    spec_for_caption,
)


def test_grammar_round_trip_on_random_specs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = sample_spec(rng)
        assert format_caption(parse_caption(spec.text)) == spec.text
        assert parse_caption(spec.text) == spec.caption


def test_vocabulary_sizes_meet_the_brief():
    assert len(SHAPES) >= 4 and len(OBJECT_COLOURS) >= 8 and len(MOTIONS) >= 6 and len(BACKGROUND_COLOURS) >= 3


@pytest.mark.parametrize("bad, word", [
    ("a red hexagon moves left on a blue background", "hexagon"),
    ("a red circle moves sideways on a blue background", "sideways"),
    ("a red circle moves left on a pink background", "pink"),
])
def test_unknown_words_are_named(bad, word):
    with pytest.raises(PromptError, match=word):
        tokenize(bad)


def test_grammar_errors_name_position_and_accepted_words():
    with pytest.raises(PromptError, match="expected one of"):
        parse_caption("a red circle left moves on a blue background")
    with pytest.raises(PromptError, match="different colours"):
        parse_caption("a red circle grows and a red square shrinks on a blue background")


def test_dataset_is_deterministic_from_seed():
    v1, t1 = batch(seed=3, index=5, size=3, frames=8, height=32, width=32)
    v2, t2 = batch(seed=3, index=5, size=3, frames=8, height=32, width=32)
    v3, _ = batch(seed=3, index=6, size=3, frames=8, height=32, width=32)
    assert np.array_equal(v1, v2) and t1 == t2
    assert not np.array_equal(v1, v3)
    assert v1.shape == (3, 3, 8, 32, 32) and v1.min() >= -1 and v1.max() <= 1


def test_heldout_combinations_never_drawn_for_training():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        for obj in sample_spec(rng).caption.objects:
            assert not is_heldout(obj.colour, obj.shape, obj.motion)
    combos = heldout_combos()
    assert 10 <= len(combos) <= 40 and len(heldout_prompts()) == len(combos)
    # every attribute still appears in training
    seen = {(o.colour, o.shape, o.motion) for _ in range(3000) for o in sample_spec(rng).caption.objects}
    for c, s, m in combos:
        assert any(x[0] == c for x in seen) and any(x[1] == s for x in seen) and any(x[2] == m for x in seen)


def test_motion_is_smooth_at_token_scale():
    """Objects move at most ~1 token (4 px) per latent frame (2 frames) at the bench geometry."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        spec = sample_spec(rng, two_object_prob=0.0)
        v = render(spec)
        mask = v.max(axis=0) > 0.2  # bright object pixels
        xs = [np.nonzero(mask[f])[1].mean() for f in range(16)]
        ys = [np.nonzero(mask[f])[0].mean() for f in range(16)]
        step = np.hypot(np.diff(xs), np.diff(ys)).max()
        assert step * 2 <= 4.5


def test_anchored_layout_centres_each_path_in_its_lane():
    """Same captions and sizes as the uniform layout (same random stream); only the start moves."""
    for seed in range(400):  # two-object "grow" clips (where a grown object overflows its lane) included
        uni = sample_spec(np.random.default_rng(seed))
        anc = sample_spec(np.random.default_rng(seed), layout="anchored")
        assert anc.caption == uni.caption and anc.background == uni.background
        lanes = [(0.0, 1.0)] if len(anc.objects) == 1 else [(0.0, 0.5), (0.5, 1.0)]
        for u, a, (y_lo, y_hi) in zip(uni.objects, anc.objects, lanes):
            assert (a.size, a.travel, a.growth) == (u.size, u.travel, u.growth)
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(a.caption.motion, (0, 0))
            mid_x, mid_y = a.x0 + dx * a.travel / 2, a.y0 + dy * a.travel / 2  # centre of the path
            assert mid_x == pytest.approx(0.5, abs=1e-6)
            assert mid_y == pytest.approx((y_lo + y_hi) / 2, abs=1e-6)


def test_anchored_scene_fixes_the_background_pose_and_keeps_the_rest():
    """Objects as in the anchored layout (same random stream); every background has the same direction and phase."""
    for seed in range(200):
        anc = sample_spec(np.random.default_rng(seed), layout="anchored")
        scene = sample_spec(np.random.default_rng(seed), layout="anchored-scene")
        assert scene.objects == anc.objects and scene.background == anc.background
        assert (scene.bg_direction, scene.bg_phase) == ANCHORED_BG_POSE
        rng_a, rng_s = np.random.default_rng(seed), np.random.default_rng(seed)
        caption = anc.caption
        assert spec_for_caption(caption, rng_s, "anchored-scene").objects == spec_for_caption(caption, rng_a,
                                                                                               "anchored").objects
        assert rng_a.random() == rng_s.random()  # both drew the same numbers


def test_size_range_scales_objects_and_keeps_the_stream():
    """Same captions and backgrounds for any size range; sizes come from the range (0.85 of it in a lane)."""
    for seed in range(200):
        base = sample_spec(np.random.default_rng(seed))
        big = sample_spec(np.random.default_rng(seed), size_range=(0.38, 0.46))
        assert big.caption == base.caption and big.background == base.background
        lane = 0.85 if len(big.objects) == 2 else 1.0
        assert all(0.38 * lane <= o.size <= 0.46 * lane for o in big.objects)
        assert np.isfinite(render(big, 4, 16, 16)).all()


@pytest.mark.parametrize("bad", [(0.0, 0.3), (0.4, 0.3), (0.3, 0.6)])
def test_bad_size_range_is_named(bad):
    with pytest.raises(ConfigError, match=r"object size range .* is not accepted: need 0 < lo <= hi <= 0.5"):
        sample_spec(np.random.default_rng(0), size_range=bad)


def test_unknown_layout_is_named():
    with pytest.raises(ConfigError, match="layout='grid'.*anchored"):
        sample_spec(np.random.default_rng(0), layout="grid")
