#!/usr/bin/env bash
# Regenerates the tiny committed graph that .ci/wheel-smoke runs in a torch-free virtualenv:
# NACLIP on the 3-block test tower (random weights, seed 0), 4 classes, one template (2.5 MB).
# Needs the [export] extra. Usage: tests/data/tiny-naclip/regenerate.sh [OUT_DIR]
# (default: this folder). tests/test_packaging.py runs it into a temporary folder and checks that
# the committed graph and label PNG still match what it produces.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
clipfuse export --head naclip --model ViT-T-16-test --pretrained none --templates single \
  --classes "sky,tree,road,car" --seed 0 -o "$out/naclip" -q
clipfuse run "$out/naclip.onnx" "$here/../street.jpg" -o "$out/run" --no-overlay
mv "$out/run/street.labels.png" "$out/street.labels.png"
rm -rf "$out/run"
