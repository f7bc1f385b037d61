#!/usr/bin/env bash
# wavedistill demo recipe: one real speaker (Debian's asterisk-core-sounds-en-wav, 8 kHz).
#
#   stage 0  data        check the corpus directory
#   stage 1  prepare     feature cache (waveforms + log-mels, splits, statistics)
#   stage 2  teacher     train the WaveNet teacher (MoL, or one Gaussian for ClariNet; max. likelihood)
#                        (--variant coupling: train the coupling-flow vocoder instead, wavedistill train-flow)
#   stage 3  distill     distill the parallel IAF student (Parallel WaveNet loss, or ClariNet's; skipped for coupling)
#   stage 4  synthesize  copy-synthesis of held-out utterances with the student (or the coupling flow)
#   stage 5  eval        PESQ/STOI/MCD/log-mel/SC/F0/V-UV vs ground truth and Griffin-Lim
#   stage 6  bench       generation speed vs the machine's measured matmul peak
#
# Usage: recipes/demo/run.sh [--stage N] [--stop-stage N] [--wav-dir DIR] [--data DIR] [--exp DIR]
#                            [--teacher-config YAML] [--student-config YAML] [--utterances N]
#                            [--overrides "section.key=value ..."]   (passed to train-teacher and distill)
#                            [--variant parallel_wavenet|clarinet|coupling] [--flow-config YAML] [--unseen-dir DIR]
# --unseen-dir DIR: stage 5 also evaluates on the audio of held-out speakers under DIR (e.g. Debian's
# asterisk-core-sounds-it-wav: /usr/share/asterisk/sounds/it_IT_m_Carlo), never used for training.
# --variant clarinet trains a single-Gaussian teacher and a Gaussian IAF student with the closed-form
# KL (conf/clarinet_*_quick.yaml) into exp/demo-clarinet, and compares with checkpoints/demo/clarinet-*.
# --variant coupling trains a WaveGlow-style coupling flow by maximum likelihood (conf/coupling_quick.yaml)
# into exp/demo-coupling (no teacher, no distillation), and compares with the shipped checkpoints/demo/student.
# Every stage is idempotent: re-running resumes or redoes it without harm.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Defaults may be preset by a wrapper recipe (recipes/ljspeech/run.sh) through the environment.

stage=0
stop_stage=100
wav_dir=${RECIPE_WAV_DIR:-/usr/share/asterisk/sounds/en_US_f_Allison}
data=${RECIPE_DATA:-data/demo}
exp=${RECIPE_EXP:-exp/demo}
teacher_conf=${RECIPE_TEACHER_CONF:-}
student_conf=${RECIPE_STUDENT_CONF:-}
flow_conf=""
exp_set=${RECIPE_EXP:+1}
utterances=4
unseen_dir=${RECIPE_UNSEEN_DIR:-}
overrides=""
variant=parallel_wavenet

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --wav-dir) wav_dir=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --exp) exp=$2; exp_set=1; shift 2 ;;
    --variant) variant=$2; shift 2 ;;
    --teacher-config) teacher_conf=$2; shift 2 ;;
    --student-config) student_conf=$2; shift 2 ;;
    --flow-config) flow_conf=$2; shift 2 ;;
    --utterances) utterances=$2; shift 2 ;;
    --unseen-dir) unseen_dir=$2; shift 2 ;;
    --overrides) overrides=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$variant" in
  parallel_wavenet) prefix=""; suffix="_lp"; shipped_names="teacher student" ;;  # LP + pre-emphasis (docs/ablation.md)
  clarinet) prefix="clarinet_"; suffix=""; shipped_names="clarinet-teacher clarinet-student"; [ -n "$exp_set" ] || exp=exp/demo-clarinet ;;
  coupling) prefix=""; suffix=""; shipped_names="student"; [ -n "$exp_set" ] || exp=exp/demo-coupling ;;
  *) echo "run.sh: unknown --variant $variant; choose parallel_wavenet, clarinet or coupling" >&2; exit 2 ;;
esac
teacher_conf=${teacher_conf:-recipes/demo/conf/${prefix}teacher${suffix}_quick.yaml}
student_conf=${student_conf:-recipes/demo/conf/${prefix}student${suffix}_quick.yaml}
flow_conf=${flow_conf:-recipes/demo/conf/coupling_quick.yaml}
vocoder=student  # what stages 4-6 synthesise with, evaluate and time
[ "$variant" = coupling ] && vocoder=coupling && teacher_conf=$flow_conf  # prepare reads the flow config's features

if [ -x .venv/bin/wavedistill ]; then wd=.venv/bin/wavedistill; py=.venv/bin/python; else wd=wavedistill; py=python3; fi
run() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
resume_flag() { [ -e "$1/checkpoints/latest" ] && echo --resume || true; }
say() { printf '\n== stage %s: %s\n' "$1" "$2"; }

if run 0; then
  say 0 "data ($wav_dir)"
  if ! ls "$wav_dir" >/dev/null 2>&1; then
    echo "run.sh: $wav_dir does not exist; install the demo corpus (make corpus) or pass --wav-dir DIR" >&2
    exit 2
  fi
  echo "$(find "$wav_dir" -type f | wc -l) files in $wav_dir"
fi

if run 1; then
  say 1 "prepare -> $data"
  $wd prepare --wav-dir "$wav_dir" --out "$data" --config "$teacher_conf"
fi

if run 2 && [ "$vocoder" = coupling ]; then
  say 2 "train coupling flow -> $exp/coupling"
  $wd train-flow --config "$flow_conf" --data "$data" --out "$exp/coupling" $(resume_flag "$exp/coupling") $overrides
elif run 2; then
  say 2 "train teacher -> $exp/teacher"
  $wd train-teacher --config "$teacher_conf" --data "$data" --out "$exp/teacher" $(resume_flag "$exp/teacher") $overrides
fi

if run 3 && [ "$vocoder" = coupling ]; then
  say 3 "distill: skipped (the coupling flow is trained by maximum likelihood, no teacher)"
elif run 3; then
  say 3 "distill student -> $exp/student"
  $wd distill --config "$student_conf" --teacher "$exp/teacher/checkpoints/latest" --data "$data" \
    --out "$exp/student" $(resume_flag "$exp/student") $overrides
fi

if run 4; then
  say 4 "synthesize $utterances held-out utterances -> $exp/wav"
  $py - "$data" "$exp/synth_inputs.txt" "$utterances" "$wav_dir" <<'PY'
import json, sys
from pathlib import Path
data, out, n, wav_dir = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
summary = json.loads((data / "summary.json").read_text())
ids = (data / "test.txt").read_text().split()[:n]
out.parent.mkdir(parents=True, exist_ok=True)
# sources are recorded relative to the --wav-dir that prepare read
out.write_text("".join(str((wav_dir / summary["utterances"][u]["source"]).resolve()) + "\n" for u in ids))
PY
  $wd synthesize --checkpoint "$exp/$vocoder/checkpoints/latest" --out-dir "$exp/wav/$vocoder" "$exp/synth_inputs.txt"
fi

if [ "$vocoder" = coupling ]; then
  ckpts=(--checkpoint "$exp/coupling/checkpoints/latest")
else
  ckpts=(--checkpoint "$exp/teacher/checkpoints/latest" --checkpoint "$exp/student/checkpoints/latest")
fi
for name in $shipped_names; do
  shipped=checkpoints/demo/$name
  [ -f "$shipped/model.safetensors" ] && ckpts+=(--checkpoint "$shipped")
done

if run 5; then
  say 5 "eval -> $exp/report"
  $wd eval "${ckpts[@]}" --data "$data" --split test --out "$exp/report" --max-utterances "$utterances"
  if [ -n "$unseen_dir" ]; then  # held-out speakers (never trained on): copy synthesis from their own audio
    say 5 "eval on unseen speakers ($unseen_dir) -> $exp/report-unseen"
    $wd eval "${ckpts[@]}" --wav-dir "$unseen_dir" --out "$exp/report-unseen" --max-utterances "$utterances"
  fi
fi

if run 6; then
  say 6 "bench -> $exp/bench.json"
  $wd bench "${ckpts[@]}" --seconds 1 --json "$exp/bench.json" --plot "$exp/bench.png"
fi

cat <<MSG

Done.
  wavs:       $exp/wav/$vocoder/  (and $exp/report/wav/)
  report:     $exp/report/report.md  (metrics.json, spectrogram PNGs)
  benchmark:  $exp/bench.json  ($exp/bench.png)
  logs:       .venv/bin/tensorboard --logdir $exp   (and $exp/*/train.log)

The models above are this run's small demo models ($exp/teacher, $exp/student).
Better ones ship with the repository: checkpoints/demo/student (Parallel WaveNet IAF with linear prediction,
1.7 CPU-hours; the original demo pair is checkpoints/demo/{teacher,student}-v1) and
checkpoints/demo/clarinet-student, with their teachers and model cards (wavedistill info checkpoints/demo).
Vocode your own recordings (files or a directory) with the shipped student:
  .venv/bin/wavedistill synthesize --checkpoint checkpoints/demo/student --out-dir out/ /path/to/your/wavs
MSG
