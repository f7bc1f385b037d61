#!/usr/bin/env bash
# LJSpeech recipe at paper scale: the demo recipe's stages with recipes/ljspeech/conf configs.
#
# Get the data (2.6 GB, 13,100 clips, 24 h, one speaker, 22.05 kHz):
#   wget https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2
#   tar xjf LJSpeech-1.1.tar.bz2 -C /data
# then, on a GPU machine:
#   recipes/ljspeech/run.sh --wav-dir /data/LJSpeech-1.1/wavs
# Multi-GPU: run stages 2 and 3 under `accelerate launch -m wavedistill ...` (see README).
# All options of recipes/demo/run.sh apply (--stage, --stop-stage, --overrides, ...).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export RECIPE_WAV_DIR="${RECIPE_WAV_DIR:-/data/LJSpeech-1.1/wavs}"
export RECIPE_DATA="${RECIPE_DATA:-data/ljspeech}"
export RECIPE_EXP="${RECIPE_EXP:-exp/ljspeech}"
export RECIPE_TEACHER_CONF="${RECIPE_TEACHER_CONF:-recipes/ljspeech/conf/teacher.yaml}"
export RECIPE_STUDENT_CONF="${RECIPE_STUDENT_CONF:-recipes/ljspeech/conf/student.yaml}"
exec "$here/../demo/run.sh" "$@"
