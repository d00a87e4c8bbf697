#!/usr/bin/env bash
# The paper's training-dynamics comparison (its Figures 3 and 7) on the toy task: REDI with alpha 1 (the
# symmetric objective) and alpha 0.8 at the same high learning rate, and alpha 0.8 at the demo's rate, all
# from the demo's SFT model. Every 10th step is checkpointed and evaluated; plot.py draws the panels.
#   python demo.py && bash docs/toy_dynamics.sh        (about 6 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
demo=runs/demo
out=runs/toy-dynamics
rm -rf "$out"
eval_args=(--benchmarks "$demo/toy/test.jsonl" --samples 2 --limit 100 --max-new-tokens 160 --prompt "{problem}"
           --think-prompt train)
python evaluate.py --model "$demo/sft/final" --out "$out/start-eval" "${eval_args[@]}" > /dev/null
for run in "1 3e-4" "0.8 3e-4" "0.8 3e-5"; do
  set -- $run
  dir="$out/alpha$1-lr$2"
  python train.py --stage redi --alpha "$1" --lr "$2" --model "$demo/sft/final" --data "$demo/data" --out "$dir" \
      --batch-size 32 --max-len 256 --micro-tokens 4096 --epochs 1 --save-every 10 --log-every 1000 > /dev/null
  cp -r "$out/start-eval" "$dir/start-eval"
  for ckpt in "$dir"/step-*; do
    python evaluate.py --model "$ckpt/model" --out "$ckpt/eval" "${eval_args[@]}" > /dev/null
  done
  echo "alpha $1, lr $2: done"
done
rm -f docs/toy_dynamics.png  # this script's own figure: plot.py overwrites only figures that it marked
python plot.py "$out/alpha1-lr3e-4" "$out/alpha0.8-lr3e-4" "$out/alpha0.8-lr3e-5" \
    --labels "alpha 1, lr 3e-4" "alpha 0.8, lr 3e-4" "alpha 0.8, lr 3e-5" --out docs/toy_dynamics.png \
    --title "REDI on the toy task from the demo's SFT model (accuracy: 100 test problems x 2 samples)"
