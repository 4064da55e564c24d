#!/usr/bin/env bash
# Rebuilds the bundled default model (models/default/clip4str-small.safetensors) from scratch, the way the shipped
# file was made: the curriculum's phases in the segments the shipped runs went through. Run from the repository root.
# Needs the real training crops in ../shared/data (IIIT5K_train_2000, SVT_train_257, IC15_train_4468, IC03_860) and
# the fonts of scripts/install-fonts.sh. On the 2-core dev machine phase 1 took about 4 hours of training and phase 2
# about 2. Phase 3 ran on one NVIDIA H200 in 12 minutes (DEVICE=cuda, the default: the binary is rebuilt with
# `--features cuda`, which needs nvcc); DEVICE=cpu runs it here instead, for about 10 hours. Dropout draws make a
# rerun close to, not bit-identical with, the shipped file.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p clip4str-cli
bin=target/release/clip4str
mkdir -p data
synth() { [ -e "data/$1/data.mdb" ] || $bin synth --out "data/$1" --size 32x128 --format jpeg "${@:2}"; }
# Training fonts only; the held-out font families are kept for the test sets.
synth synth_short --count 150000 --seed 2 --font-split train --max-length 6
synth synth_short_val --count 500 --seed 556 --font-split train --max-length 6
synth synth_train --count 400000 --seed 1 --font-split train
synth synth_val --count 1000 --seed 555 --font-split train
# The shipped figures' synth_heldout / synth_short_heldout / synth_val / synth_train were rendered when only the first
# 33 packages of install-fonts.sh were installed (45 training families; 3 held out: Caladea, Femkeklaver, Lobster Two),
# and so were phases 1-3's on-the-fly crops. With all of them installed, every set below draws from 189 training and
# 12 held-out families (those of synth_heldout_v2), so a rerun sees more fonts than the shipped run did before phase 5.
synth synth_heldout --count 2000 --seed 777 --font-split heldout
synth synth_short_heldout --count 500 --seed 778 --font-split heldout --max-length 6
synth synth_heldout_v2 --count 2000 --seed 779 --font-split heldout

# Phase 1, in the segments the shipped run went through (each resume re-plans the one-cycle schedule).
$bin train --config models/default/train-phase1.toml --max-steps 2000
$bin train --resume runs/default-p1 --max-steps 5000 --stop-at 3572
$bin train --resume runs/default-p1 --max-steps 12000 --stop-at 6005
# Phase 2 (all lengths and the real crops, from phase 1's last weights): planned for 6,000 steps, re-planned to
# 5,000 at step 2,356, run to the end.
$bin train --config models/default/train-phase2.toml --stop-at 2356
$bin train --resume runs/default-p2 --max-steps 5000
# Phase 3 started from phase 2's f16 file (what was bundled then).
$bin convert --force --dtype f16 runs/default-p2/last.safetensors runs/default-p2/last-f16.safetensors
# Phase 3a and 3b (synthetic crops rendered on the fly, RandAugment, batch 512): 30 steps each, then the length that
# filled the GPU lease at the throughput of those 30 steps.
device=${DEVICE:-cuda}
[ "$device" = cpu ] || cargo build --release -p clip4str-cli --features cuda
$bin train --device "$device" --config models/default/train-phase3a.toml --stop-at 30
$bin train --device "$device" --resume runs/default-p3a --max-steps 1184
$bin train --device "$device" --config models/default/train-phase3b.toml --stop-at 30
$bin train --device "$device" --resume runs/default-p3b --max-steps 510
# Phase 5 (CPU, 4,000 steps at batch 32, all fonts of install-fonts.sh, real crops x40; about 105 minutes here).
$bin train --config models/default/train-phase5.toml
# Phase 6 (CPU, the same recipe from phase 5's weights on fresh crops, 5,000 steps; about 111 minutes here).
$bin train --config models/default/train-phase6.toml
# Phase 8 (CPU, phase 6's f16 weights, real crops x200 so that half the samples are real; 2,500 steps planned,
# re-planned to 2,250 at step 750; about 100 minutes here).
$bin convert --force --dtype f16 runs/default-p6/last.safetensors runs/default-p6/last-f16.safetensors
$bin train --config models/default/train-phase8.toml --stop-at 750
$bin train --resume runs/default-p8 --max-steps 2250
$bin convert --force --dtype f16 runs/default-p8/last.safetensors runs/default-p8/last-f16.safetensors
# Phase 9 (CPU, phase 8's recipe again from its f16 file on fresh crops; 4,000 steps planned, re-planned to 3,500 at
# step 1,000; about 117 minutes here).
$bin train --config models/default/train-phase9.toml --stop-at 1000
$bin train --resume runs/default-p9 --max-steps 3500
$bin convert --force --dtype f16 runs/default-p9/last.safetensors runs/default-p9/last-f16.safetensors
# The half-and-half average of phases 8 and 9, the start of phase 10.
$bin average runs/default-p8/last-f16.safetensors runs/default-p9/last-f16.safetensors \
    --dtype f16 --force --out runs/default-p9avg/avg-f16.safetensors
# Phase 10 (CPU, a quarter of phase 9's learning rate from the average; 3,000 steps planned, re-planned to 2,500 at
# step 1,500; about 102 minutes here).
$bin train --config models/default/train-phase10.toml --stop-at 1500
$bin train --resume runs/default-p10 --max-steps 2500
$bin convert --force --dtype f16 runs/default-p10/last.safetensors runs/default-p10/last-f16.safetensors
cp runs/default-p10/last-f16.safetensors models/default/clip4str-small.safetensors
# Figures for the model card:
$bin eval --checkpoint models/default/clip4str-small.safetensors --batch-size 32 \
    --data data/synth_short_heldout data/synth_heldout data/synth_heldout_v2 ../shared/data/CUTE80_288 ../shared/data/SVTP_645
# Per held-out family: 150 crops of each family alone (seed 779, v2's seed), each its own set.
$bin synth --list-fonts --font-split heldout 2>/dev/null | while IFS=$'\t' read -r family files; do
    read -ra family_files <<< "$files"
    synth "heldout_family/$family" --count 150 --seed 779 --font-split all --fonts "${family_files[@]}"
done
$bin eval --checkpoint models/default/clip4str-small.safetensors --batch-size 32 --data data/heldout_family
