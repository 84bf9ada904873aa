#!/usr/bin/env bash
# MoE (small-moe) against the dense FFN (small) at the same training compute: scripts/variant_train_h200.sh's default.
#   OUT=<results folder> bash scripts/moe_train_h200.sh      (device tool: carry .whl)
exec env MODELS="small-moe small" NAME=moe bash "$(dirname "$0")/variant_train_h200.sh"
