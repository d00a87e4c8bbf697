"""Training dynamics of one or more runs, as the paper diagnoses them (its Figures 3, 6 and 7), in one PNG.

    python plot.py runs/redi-a08 runs/redi-a1 --labels "alpha 0.8" "alpha 1" --out docs/dynamics.png

Panels against the optimizer step: accuracy of the run's checkpoints (from `evaluate.py --out
<run>/step-NNNNNN/eval`, when present), chosen and rejected LogPS (mean per-token log-prob, from the run's
metrics.jsonl) and the update norm ||theta_t - theta_(t-1)||. Collapse shows as both LogPS falling together
while the update norm spikes and accuracy drops. Needs matplotlib (`pip install matplotlib`), an optional
dependency. --out is written only if it is new or a figure plot.py wrote (its PNG carries MARK).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# A PNG text chunk (key, value) that marks a figure as plot.py's: the only existing file it overwrites.
MARK = ("Software", "redi plot.py")


def read_run(run: Path) -> dict[str, list]:
    """Per-step metrics and per-checkpoint accuracy (pass@1 averaged over the evaluated benchmarks)."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = []
    for results in sorted(run.glob("step-*/eval/results.json")):
        step = int(results.parent.parent.name.split("-")[1])
        acc.append((step, 100 * json.loads(results.read_text())["average"]["pass@1"]))
    start = run / "start-eval" / "results.json"  # the starting model, at step 0
    if start.is_file():
        acc.insert(0, (0, 100 * json.loads(start.read_text())["average"]["pass@1"]))
    return {"step": [m["step"] for m in metrics],
            "chosen": [m.get("logps_chosen") for m in metrics], "rejected": [m.get("logps_rejected") for m in metrics],
            "update": [m["update_norm"] for m in metrics], "acc_step": [a[0] for a in acc],
            "acc": [a[1] for a in acc]}


def check_writable(path: Path) -> None:
    """The tools' rule for what they write, for a single file: new, or one plot.py wrote before."""
    tag = f"{MARK[0]}\0{MARK[1]}".encode()  # as a PNG tEXt chunk stores it
    if path.exists() and not (path.is_file() and tag in path.read_bytes()):
        sys.exit(f"error: {path}: exists and is not a figure plot.py wrote; refusing to overwrite it: "
                 f"choose another --out")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by train.py")
    p.add_argument("--labels", nargs="+", help="legend labels (default: the directory names)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    check_writable(Path(args.out))
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"error: {len(args.runs)} runs but {len(labels)} labels")
    try:
        runs = [read_run(Path(r)) for r in args.runs]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        sys.exit(f"error: not a train.py run directory with metrics.jsonl: {e}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib, an optional dependency: pip install matplotlib")

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("acc", "accuracy of checkpoints (%)"), ("chosen", "chosen LogPS"), ("rejected", "rejected LogPS"),
              ("update", "update norm ||θ_t − θ_t−1||")]
    for ax, (key, title) in zip(axes, panels):
        for i, (run, label) in enumerate(zip(runs, labels)):
            xs = run["acc_step"] if key == "acc" else run["step"]
            ys = run[key]
            if ys and all(y is not None for y in ys):  # a run's colour is its own in every panel
                ax.plot(xs, ys, marker="o" if key == "acc" else None, markersize=4, label=label, color=f"C{i}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[-1].legend()  # the update norm is in every run's metrics, so every run is in this legend
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, metadata=dict([MARK]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
