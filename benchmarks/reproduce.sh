#!/usr/bin/env bash
# Every figure in README.md and docs/ comes from one of these commands (2-core CPU machine, after `make install`).
# Run from the repository root; each writes JSON (with its own command line) beside its plots.
set -euxo pipefail
export PYTHONPATH=src OMP_NUM_THREADS=2
PY=.venv/bin/python
VA=.venv/bin/vdit-accel

# 0. the embedded model (resumable; commented out: the weights ship in the repo)
#    shipped v1 = recipe "scratch" (51 min on 2 cores)
# $VA train --out runs/train && cp runs/train/release/* src/vdit_accel/instrument/weights/embedded-wan-v1/
#    tried, not shipped (no adherence gain): recipe "finetune" from v1 (42 min) -> docs/results/instrument/finetune/
# $VA train --recipe finetune --init-from src/vdit_accel/instrument/weights/embedded-wan-v1 \
#     --model-id vdit-accel/embedded-wan-v2 --out runs/train-ft  # (the id it was trained under)
# $PY benchmarks/heldout_adherence.py --weights runs/train-ft/release --out docs/results/instrument/finetune
# $PY benchmarks/conditioning_probe.py --weights runs/train-ft/release --out docs/results/instrument/finetune/conditioning_probe.json

# embedded-wan-v1's instrument figures (docs/results/v1/instrument/; run at commit b341aea, v1 the default):
# $VA score --ground-truth 200 > docs/results/instrument/scorer_ground_truth.json
# $VA score --ground-truth 100 --mp4 > docs/results/instrument/scorer_ground_truth_mp4.json
# $VA score --ground-truth 100 --object-size 0.38 0.46 > docs/results/instrument/scorer_ground_truth_large_objects.json
# $PY benchmarks/heldout_adherence.py --out docs/results/instrument
# $VA inspect --prompts quick --steps 50 --out docs/results/instrument/inspect.json
# $PY benchmarks/conditioning_probe.py --out docs/results/instrument/conditioning_probe.json
# $PY benchmarks/sampler_sweep.py --prompts 10 --settings 5,3 3,3 5,8 3,8 --out docs/results/instrument/sampler_sweep.json
# recipe experiments (15-35 min each, 1 thread; outputs in runs/exp-NAME, copied to docs/results/instrument/recipe_experiments/)
# for n in base wide mixer; do OMP_NUM_THREADS=1 $PY benchmarks/recipe_experiments.py $n; done
# $PY benchmarks/recipe_experiments.py wide-64
# session 3 (2 threads, one at a time): anchored layout, + position channels, + x0 prediction; then at 64 px
# for n in anchored anchored-xyz anchored-xyz-x0 anchored-xyz-x0-64; do $PY benchmarks/recipe_experiments.py $n; done
# for n in anchored anchored-xyz anchored-xyz-x0; do $PY benchmarks/x0_grid.py --weights runs/exp-$n/release \
#     --size 32 --out docs/results/instrument/recipe_experiments/$n-x0_grid; done
# $PY benchmarks/x0_grid.py --weights runs/exp-anchored-xyz-x0-64/release --size 64 --out docs/results/instrument/recipe_experiments/anchored-xyz-x0-64-x0_grid
# $PY benchmarks/x0_grid.py --size 64 --out docs/results/instrument/recipe_experiments/v1-x0_grid
# $PY benchmarks/heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64/release --out docs/results/instrument/recipe_experiments/anchored-xyz-x0-64
# session 4 (2 threads, in this order: each continues the previous one's release)
# R=docs/results/instrument/recipe_experiments
# $PY benchmarks/oracle_gap.py --samples 30 --out $R/oracle_gap.json
# $PY benchmarks/conditioning_probe.py --weights runs/exp-anchored-xyz-x0-64/release --layout anchored \
#     --noise-levels 0.98 0.995 --out $R/anchored-xyz-x0-64-conditioning_probe-high-t.json
# (after the loop below) the same for runs/exp-anchored-xyz-x0-64-hit-large-pooled/release with
#     --object-size 0.38 0.46 --out $R/anchored-xyz-x0-64-hit-large-pooled-conditioning_probe-high-t.json
# for n in anchored-xyz-x0-64-hit anchored-xyz-x0-64-hit-large anchored-xyz-x0-64-hit-large-long \
#     anchored-xyz-x0-64-hit-large-pooled; do
#   $PY benchmarks/recipe_experiments.py $n
#   $PY benchmarks/heldout_adherence.py --weights runs/exp-$n/release --out $R/$n
# done
# $PY benchmarks/heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64-hit/release --flow-shift 8 \
#     --out $R/anchored-xyz-x0-64-hit-shift8
# $PY benchmarks/recipe_experiments.py anchored-xyz-x0-64-hit-large-mix
# $PY benchmarks/heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64-hit-large-mix/release \
#     --out $R/anchored-xyz-x0-64-hit-large-mix
# for n in anchored-xyz-x0-64-hit-large-pooled anchored-xyz-x0-64-hit-large-long; do  # a second noise seed
#   $PY benchmarks/heldout_adherence.py --weights runs/exp-$n/release --seed 1 --out $R/$n-seed1; done
# $PY benchmarks/recipe_experiments.py anchored-xyz-x0-64-hit-large-long --max-steps 600  # mid-run reading
# $PY benchmarks/heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64-hit-large-long-step600/release \
#     --out $R/anchored-xyz-x0-64-hit-large-long-step600
# session 5: two 1,000-step continuations of -hit-large-pooled (each ~20 min), two noise seeds each; the
# background measurements of the renderer's clips of the held-out prompts; guidance on the -scene weights
# (the pooled run below rewrites its session-4 JSON with the same verdicts plus the background measurements)
# $PY benchmarks/heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64-hit-large-pooled/release \
#     --out $R/anchored-xyz-x0-64-hit-large-pooled
# $PY benchmarks/heldout_adherence.py --render anchored --object-size 0.38 0.46 --out $R/heldout-rendered-anchored
# for n in anchored-xyz-x0-64-hit-large-pooled-mix3 anchored-xyz-x0-64-hit-large-pooled-scene; do
#   $PY benchmarks/recipe_experiments.py $n
#   $PY benchmarks/heldout_adherence.py --weights runs/exp-$n/release --out $R/$n
#   $PY benchmarks/heldout_adherence.py --weights runs/exp-$n/release --seed 1 --out $R/$n-seed1; done
# $PY benchmarks/sampler_sweep.py --weights runs/exp-anchored-xyz-x0-64-hit-large-pooled-scene/release \
#     --prompts 10 --settings 5,3 3,3 2,3 --out $R/anchored-xyz-x0-64-hit-large-pooled-scene-sampler_sweep.json
# the same lineage as one resumable command (5 links, ~94 min): vdit-accel train --recipe v2-lineage --out runs/v2l
# session 6: the v2 model in one run (~104 min; = vdit-accel train --recipe v2, whose weights are committed as
# src/vdit_accel/instrument/weights/embedded-wan-v2), read at CFG 5, guidance chosen on 40 fresh
# training-distribution prompts, then read once at the chosen CFG 2 (the first sweep also ran the held-out set)
# $PY benchmarks/recipe_experiments.py v2-direct
# $PY benchmarks/heldout_adherence.py --weights runs/exp-v2-direct/release --out $R/v2-direct
# $PY benchmarks/heldout_adherence.py --weights runs/exp-v2-direct/release --seed 1 --out $R/v2-direct-seed1
# $PY benchmarks/sampler_sweep.py --weights runs/exp-v2-direct/release --prompts 20 --settings 5,3 3,3 \
#     --out $R/v2-direct-sampler_sweep-g5-g3.json  # and --settings 4,3 2,3 --out $R/v2-direct-sampler_sweep-g4-g2.json
# S="$PY benchmarks/sampler_sweep.py --weights runs/exp-v2-direct/release --prompts 40 --sets training --training-seed 456"
# $S --settings 5,3 3,3 --out $R/v2-direct-select-g5-g3.json; $S --settings 4,3 2,3 --out $R/v2-direct-select-g4-g2.json
# $S --settings 1.5,3 --out $R/v2-direct-select-g1.5.json; $S --settings 1,3 --out $R/v2-direct-select-g1.json
# for s in 0 1; do $PY benchmarks/heldout_adherence.py --weights runs/exp-v2-direct/release --guidance 2 \
#     --seed $s --out $R/v2-direct-g2$([ $s = 1 ] && echo -seed1); done

# The figures of the shipped model (embedded-wan-v2 since session 7), in priority order (~2 h on 2 cores; run
# nothing else meanwhile: every step measures time). The same commands at commit b341aea, when the default was
# embedded-wan-v1, made docs/results/v1/ (its presets: docs/results/v1/presets/).
# 1. calibrations and searches (presets land in src/vdit_accel/presets/; searches checkpoint in runs/search-*)
$VA calibrate magcache --overwrite
for t in 0.75 0.80 0.85; do $VA calibrate timeripple --target $t --overwrite; done
for t in 0.4 0.7; do $VA search astraea --target $t --generations 8 --overwrite; done  # short searches
$VA search astraea --target 0.5 --overwrite  # the paper's settings: population 50, 30 children, 30 generations

# 2. the side-by-side bench (all methods, one process)
$VA bench --methods dense,pab,fbc,taylorseer,fastercache,magcache,timeripple,astraea --prompts quick --seeds 2 --steps 50 --out docs/results/bench --overwrite

# 3. the instrument (the scorer on the renderer's clips: v1's data, then v2's anchored layout and larger objects)
$VA score --ground-truth 200 > docs/results/instrument/scorer_ground_truth.json
$VA score --ground-truth 100 --mp4 > docs/results/instrument/scorer_ground_truth_mp4.json
$VA score --ground-truth 100 --object-size 0.38 0.46 > docs/results/instrument/scorer_ground_truth_large_objects.json
$VA score --ground-truth 200 --layout anchored --object-size 0.38 0.46 > docs/results/instrument/scorer_ground_truth_v2_data.json
$PY benchmarks/heldout_adherence.py --out docs/results/instrument
$PY benchmarks/heldout_adherence.py --seed 1 --out docs/results/instrument/heldout-seed1
$VA inspect --prompts quick --steps 50 --out docs/results/instrument/inspect.json
# v2's conditioning probe and its guidance choice were measured on the same weights in session 6 (recipe_experiments/
# v2-direct-conditioning_probe.json, v2-direct-select-*.json; commands in the session-6 block above)

# 4. the paper experiments
for e in fig7 fig8 fig5; do $PY benchmarks/timeripple_paper.py --model embedded --experiments $e --out docs/results/timeripple; done
$PY benchmarks/timeripple_paper.py --model embedded --experiments ablations --ablation-steps 20 --out docs/results/timeripple
$PY benchmarks/timeripple_paper.py --model embedded --experiments ablations --ablation-steps 50 --out docs/results/timeripple/ablations-50steps
for e in baselines ablations score_options; do $PY benchmarks/astraea_paper.py --model embedded --experiments $e --out docs/results/astraea; done

# ---- Session 8: speed at real-model width (docs/speed.md). Quiet machine, in this order (~95 min on 2 cores).
# 1. the W2 latency model (K/V reuse) and the step table (Wan2.1-1.3B width, 2 layers composed to 30)
$VA bench-step --out docs/results/bench-step/latency-kv --latency-model docs/results/bench-step/latency-kv/latency.json --latency-kv-reuse --quiet --overwrite
$VA bench-step --out docs/results/bench-step/cpu --quiet --overwrite
# 2. joint schedules at 2x..5x (shared segment error table; presets copied to src/vdit_accel/presets/)
for t in 2 3 4 5; do $VA search astraea --target-speedup $t --latency-model docs/results/bench-step/latency-kv/latency.json --allocator all --max-segment 8 --checkpoint runs/search-astraea-joint --out runs/presets/astraea-${t}x.json --quiet --overwrite; done
# 3. TimeRipple 'tokens' presets calibrated for W2 attention-op speed (keys merged)
for s in 1.3 1.5; do $VA calibrate timeripple --target-speedup $s --keys-only --out runs/presets/timeripple-op${s}x.json --overwrite; done
# 4. W1 efficiency of uniform budgets, cache memory (analytic), the bench with W2 replay
$PY benchmarks/astraea_w1.py --out docs/results/astraea/w1
$PY benchmarks/astraea_memory.py --out docs/results/astraea/memory.json
$VA bench --methods dense,timeripple,astraea,pab,fbc,taylorseer,fastercache,magcache --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v3 --overwrite

# ---- Session 9: final-video refinement of Astraea schedules, the bench against TaylorSeer's cadences (docs/speed.md)
# 1. refine (local search scored on final videos at full size with CFG, 4 calibration prompts; held-apart check on the
#    4 selection prompts); presets copied to src/vdit_accel/presets/astraea-{3.5,4,4.5,5.5}x.json
# (the shipped runs were stopped and resumed from their checkpoints at these call budgets; the final choice needs the
#  selection prompts' dense videos, generated once per checkpoint folder)
for t in 3.5:20 4:23 4.51:10 5.5:10; do $VA search astraea --target-speedup ${t%%:*} --allocator refine --latency-model docs/results/bench-step/latency-kv/latency.json --max-evals ${t##*:} --checkpoint runs/refine/ck-${t%%:*}x --out runs/refine/astraea-${t%%:*}x.json --overwrite; done
$PY benchmarks/taylorseer_cadence.py --threads 1 --out docs/results/astraea/refine/taylorseer-cadence.json
cp runs/refine/astraea-4x.json src/vdit_accel/presets/astraea-4x.json
# 2. the bench with TaylorSeer's cadences as anchors (alone on the machine, ~12 min)
$VA bench --methods dense,astraea,taylorseer-i4-o1,taylorseer-i5-o1,taylorseer-i6-o1,taylorseer-i8-o1 --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v4 --overwrite
# 3. TimeRipple vs masking / skipping / static windows at equal measured attention-op speed (docs/timeripple.md)
$PY benchmarks/timeripple_masking.py --parts op e2e --e2e-prompts 1 --threads 2 --out docs/results/timeripple/masking
# 4. context parallelism, 2 ranks at W2 width, and the scaling model (docs/parallel.md)
#    (session 9's run, now docs/results/parallel/s9/measured.json, was made by that session's script: separate 1- and
#     2-process runs; since session 14 the measurement interleaves its runs and this line is the session-14 block's)
# OMP_NUM_THREADS=1 $PY benchmarks/parallel_scaling.py measure --nproc 2 --out docs/results/parallel/measured.json
$PY benchmarks/parallel_scaling.py model --measured docs/results/parallel/measured.json --out docs/results/parallel/scaling-model.json
# GPU only (prepared, not run: no GPU was lent): benchmarks/timeripple_gpu.py, benchmarks/compile_gpu.py

# ---- Session 10: forecasting over the timestep; cadence presets; TimeRipple on top of Astraea (docs/speed.md,
#      docs/timeripple.md). Quiet machine, in this order (~45 min on 2 cores).
# 1. the same schedules forecast over the step index and over the timestep (calibration + selection prompts)
$PY benchmarks/forecast_axis.py --cadences 4,5,6 --presets astraea-3x astraea-4x astraea-5x --threads 2 --out docs/results/astraea/forecast-axis
# 2. the refinement at 4x with the timestep axis (its final choice, the seed astraea-4x, is the shipped astraea-4x)
$VA search astraea --target-speedup 4 --allocator refine --latency-model docs/results/bench-step/latency-kv/latency.json --forecast-axis timestep --seed-preset astraea-4x --max-evals 24 --checkpoint runs/refine-ts/ck-4x --out runs/refine-ts/astraea-4x.json --overwrite
# 3. cadence candidates with the timestep axis; presets astraea-3.5x / 4x / 4.5x / 5x / 6x copied to src/vdit_accel/presets/
#    (the shipped 4x and 6x were chosen after the bench of step 4 had run: steps 4b and 4c measure them)
$PY benchmarks/cadence_candidates.py --threads 2 --out docs/results/astraea/cadence-timestep --presets-out runs/presets-cadence
# 4. the bench with TaylorSeer's cadences as anchors (alone on the machine, ~15 min)
$VA bench --methods dense,astraea,taylorseer-i4-o1,taylorseer-i5-o1,taylorseer-i6-o1,taylorseer-i8-o1 --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v5 --overwrite
$VA bench --methods dense,astraea-4x,taylorseer-i5-o1 --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v5/astraea-4x-cadence --overwrite
$VA bench --methods dense,astraea-6x,taylorseer-i8-o1 --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v5/astraea-6x --overwrite
# 5. TimeRipple's keys-merged presets on top of astraea-4x (W1 interleaved, W2 priced from measured parts)
$PY benchmarks/timeripple_on_astraea.py --threads 2 --timeripple timeripple-op1.3x-root timeripple-op1.5x-root --out docs/results/timeripple/on-astraea
# 6. TimeRipple under θ schedules (partial: the first five settings ran)
$PY benchmarks/timeripple_theta_schedules.py docs/results/timeripple/theta-schedules/sweep.json

# ---- Session 11: astraea-3x from the cadence candidates; W2 step table with rotated order and paired ratios;
#      W1 efficiency (eager and compiled); TimeRipple's W1 speed and its zero-overhead bound. Quiet machine, in order.
# 1. cadence candidates with the 2x / 3x targets added (earlier evaluations replay from the committed checkpoint);
#    astraea-3x copied to src/vdit_accel/presets/ (the greedy one it replaces: docs/results/astraea/presets-joint-d4/)
$PY benchmarks/cadence_candidates.py --threads 2 --out docs/results/astraea/cadence-timestep --presets-out runs/presets-cadence11
# 2. the new astraea-3x beside TaylorSeer's interval 3 and 4 (alone on the machine, ~9 min)
$VA bench --methods dense,astraea-3x,taylorseer-i3-o1,taylorseer-i3-o2,taylorseer-i4-o1 --prompts bench --seeds 2 --steps 50 --step-costs docs/results/bench-step/latency-kv/bench-step.json --latency-model docs/results/bench-step/latency-kv/latency.json --out docs/results/bench-v5/astraea-3x-cadence --overwrite
# 3. the W2 step table, 7 repeats in rotated order, paired ratios (~13 min)
$VA bench-step --out docs/results/bench-step/cpu-paired --layers 2 --target-layers 30 --latent 4 48 80 --text-len 512 --dtype float32 --device auto --repeats 7 --warmup 1 --budgets 0.2 0.4 0.6 --kv-reuse both --orders 0 1 2 --seed 0 --quiet --overwrite
#    and with three timed steps per sample
$VA bench-step --out docs/results/bench-step/cpu-paired-3steps --layers 2 --target-layers 30 --latent 4 48 80 --text-len 512 --dtype float32 --device auto --repeats 5 --warmup 1 --timed-steps 3 --budgets 0.2 0.4 0.6 --kv-reuse both --orders 0 --seed 0 --quiet --overwrite
# 4. TimeRipple's presets on W1 (run twice; the committed JSON is the second run)
$VA bench --methods dense,timeripple-op1.3x-root,timeripple-op1.5x-root --prompts bench --seeds 2 --steps 50 --out docs/results/timeripple/bench-w1 --overwrite   # then named timeripple-op1.3x / op1.5x
$PY benchmarks/timeripple_w1_bound.py --out docs/results/timeripple/w1-bound
# 5. Astraea's W1 efficiency, eager (budgets 0.4) and under regional compile (budgets on row buckets)
$PY benchmarks/astraea_w1.py --out docs/results/astraea/w1-s11 --budgets 0.4
$PY benchmarks/astraea_w1.py --out docs/results/astraea/w1-compiled --budgets 0.25 0.375 0.625 --compile
# 6. the scaling model with xDiT's HunyuanVideo report (H100, H20, L20) and the fixed-overhead cross-check
$PY benchmarks/parallel_scaling.py model --measured docs/results/parallel/measured.json --out docs/results/parallel/scaling-model.json

# ---- Session 12: TimeRipple's merged keys take their group's mean key; decisions kept between steps. Quiet machine.
# 1. the mean-key presets (each copied to src/vdit_accel/presets/ as timeripple-op${s}x.json; ~2.5 min each; logs in
#    docs/results/timeripple/calibrate-mean/)
for s in 1.5 2 2.5 3; do $VA calibrate timeripple --target-speedup $s --keys-only --key-merge mean --out runs/presets/timeripple-op${s}x.json --overwrite; done
for s in 2 2.5; do $VA calibrate timeripple --target-speedup $s --keys-only --key-merge mean --decision-interval 4 --out runs/presets/timeripple-op${s}x-d4.json --overwrite; done
# 2. end to end on W1 (~15 min, then ~10 min)
$VA bench --methods dense,timeripple-op1.5x-root,timeripple-op1.5x,timeripple-op2x,timeripple-op2.5x,timeripple-op3x --prompts bench --seeds 2 --steps 50 --out docs/results/timeripple/bench-mean --overwrite
$VA bench --methods dense,timeripple-op2x,timeripple-op2x-d4,timeripple-op2.5x-d4 --prompts bench --seeds 2 --steps 50 --out docs/results/timeripple/bench-d4 --overwrite
# 3. on top of astraea-4x (~8 min)
$PY benchmarks/timeripple_on_astraea.py --threads 2 --timeripple timeripple-op1.5x timeripple-op2x timeripple-op2.5x --out docs/results/timeripple/on-astraea-mean

# ---- Session 13: Astraea's row path without its own overheads (row moves, selection, merge, RoPE). Quiet machine.
# 1. W1 efficiency, eager (all budgets; rotated order, paired ratios) and under regional compile (row buckets)
$PY benchmarks/astraea_w1.py --out docs/results/astraea/w1-s13 --repeats 3
$PY benchmarks/astraea_w1.py --compile --budgets 0.375 0.625 --repeats 3 --out docs/results/astraea/w1-compiled-s13
#    (run twice; the second run is in docs/results/astraea/w1-compiled-s13/confirm/)
# 2. the W2 step table again with the new row path (3 timed steps x 5 repeats, rotated, paired; ~12 min)
$VA bench-step --out docs/results/bench-step/cpu-paired-s13 --layers 2 --target-layers 30 --latent 4 48 80 --text-len 512 --dtype float32 --device auto --repeats 5 --warmup 1 --timed-steps 3 --budgets 0.2 0.4 0.6 --kv-reuse both --orders 0 --seed 0 --quiet --overwrite
# 3. W1 eager on one thread (the protocol: one thread, interleaved, one process)
OMP_NUM_THREADS=1 $PY benchmarks/astraea_w1.py --out docs/results/astraea/w1-s13-1thread --budgets 0.4 0.6 --repeats 3
#    (a second one-thread run at budget 0.4, to /tmp, copied to docs/results/astraea/w1-s13-1thread/confirm/)
OMP_NUM_THREADS=1 $PY benchmarks/astraea_w1.py --out docs/results/astraea/w1-s13-1thread/confirm --budgets 0.4 --repeats 3

# ---- Session 14: the 2-rank CPU check interleaved (CP ranks, whole copies, one process: step by step in one set of
#      processes) with the replicated work timed; the GPU model with the replicated FLOPs and the serial-seconds
#      cross-check. Quiet machine (~9 min per measurement).
OMP_NUM_THREADS=1 $PY benchmarks/parallel_scaling.py measure --nproc 2 --repeats 5 --rounds 2 --out docs/results/parallel/measured.json
#    (run twice; the second run is docs/results/parallel/measured-confirm.json)
OMP_NUM_THREADS=1 $PY benchmarks/parallel_scaling.py measure --nproc 2 --repeats 5 --rounds 2 --out docs/results/parallel/measured-confirm.json
#    Ring over both ranks (~10 min)
OMP_NUM_THREADS=1 $PY benchmarks/parallel_scaling.py measure --mesh ring --nproc 2 --repeats 5 --rounds 2 --out docs/results/parallel/measured-ring.json
#    (run twice; the second run is docs/results/parallel/measured-ring-confirm.json)
OMP_NUM_THREADS=1 $PY benchmarks/parallel_scaling.py measure --mesh ring --nproc 2 --repeats 5 --rounds 2 --out docs/results/parallel/measured-ring-confirm.json
$PY benchmarks/parallel_scaling.py model --measured docs/results/parallel/measured.json docs/results/parallel/measured-confirm.json docs/results/parallel/measured-ring.json docs/results/parallel/measured-ring-confirm.json --out docs/results/parallel/scaling-model.json
#    per-rank vs global top-k at the presets' 50 steps on the 8 bench prompts (~6 min)
$PY benchmarks/parallel_scaling.py fidelity --steps 50 --prompts 8 --groups 2 4 8 --out docs/results/parallel/fidelity-50steps.json
#    the measured differences of the tolerance tests (Ring, hybrid, TimeRipple's pooled modes), written by the tests
VDIT_RECORD_DIFFS=docs/results/parallel/differences.json $PY -m pytest -q tests/test_parallel.py -k "pooled or ring_two or hybrid"

# ---- Session 15: the scaling model's published validation widened to 34 points (the Wan2.1 README's T2V-/I2V-14B
#      table on H800 / H20 / A800 with FSDP's weight all-gather; xDiT's 960x960 L20 row) and its held-out checks per
#      implementation; a second pessimistic reading from the Wan table's own worst H800 residual; Astraea's step costs
#      measured at the full geometry (32,760 tokens, W2 width, CPU: ~30 min, quiet machine), then the model (~2 min)
$VA bench-step --out docs/results/bench-step/cpu-full-geometry --layers 2 --latent 21 60 104 --text-len 512 --target-layers 30 --dtype float32 --device cpu --repeats 3 --warmup 0 --budgets 0.5 --kv-reuse on --orders 1 --seed 0
$PY benchmarks/parallel_scaling.py model --measured docs/results/parallel/measured.json docs/results/parallel/measured-confirm.json docs/results/parallel/measured-ring.json docs/results/parallel/measured-ring-confirm.json --step-bench docs/results/bench-step/cpu-full-geometry/bench-step.json --out docs/results/parallel/scaling-model.json
