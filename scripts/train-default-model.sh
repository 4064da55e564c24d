#!/usr/bin/env bash
# Rebuilds the bundled default model (models/default/clip4str-small.safetensors) from scratch on CPU.
# Needs the real training crops in ../shared/data (IIIT5K_train_2000, SVT_train_257, IC15_train_4468, IC03_860)
# and the fonts of scripts/install-fonts.sh. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p clip4str-cli
bin=target/release/clip4str
mkdir -p data
# Training fonts only; the held-out font families are kept for the test set.
[ -e data/synth_train/data.mdb ] || $bin synth --out data/synth_train --count 400000 --seed 1 --size 32x128 --font-split train --format jpeg
[ -e data/synth_val/data.mdb ] || $bin synth --out data/synth_val --count 1000 --seed 555 --size 32x128 --font-split train --format jpeg
[ -e data/synth_heldout/data.mdb ] || $bin synth --out data/synth_heldout --count 2000 --seed 777 --size 32x128 --font-split heldout --format jpeg
$bin train --config models/default/train.toml
run=$(sed -n 's/^output_dir = "\(.*\)"/\1/p' models/default/train.toml)
$bin convert --force --dtype f16 "$run/last.safetensors" models/default/clip4str-small.safetensors
# Figures for the model card:
$bin eval --checkpoint models/default/clip4str-small.safetensors --data data/synth_heldout ../shared/data/CUTE80_288 ../shared/data/SVTP_645
