"""The whole REDI recipe on a toy model, end to end, in minutes on a CPU (and on a GPU when there is one).

    python demo.py                 # writes runs/demo/, prints the results table at the end
    python demo.py                 # again, after Ctrl-C or a crash: finished stages are skipped, training resumes
    python demo.py --fresh         # start over

It runs the project's own command-line tools, printing each command, exactly as a user would:

    python data.py toy            a synthetic math corpus in OpenR1-Math-Raw's schema, a held-out test split,
                                  a byte-level BPE tokenizer with Qwen's special tokens and a tiny Qwen2 config
    python data.py prepare        the paper's selection: D_SFT and D_Pref, tokenized
    python model.py init          a randomly initialized tiny Qwen2 (the "base model")
    python train.py --stage sft   stage 1: SFT on the correct traces
    python train.py --stage redi  stage 2: REDI (alpha 0.8) on (correct, incorrect) pairs
    python evaluate.py            the SFT model and the REDI model on the held-out test split, graded by verify.py

The toy's training prompts are the bare problems (as the paper's are), so evaluation uses the bare problem
as the user turn too, and starts the forced <think> the way training traces do (`--think-prompt train`: the
paper's template drops a newline there, which a model this small does not survive); sampling is the
paper's (temperature 0.6, top-p 0.95). SFT runs 8 epochs at lr 4e-3, REDI one epoch at lr 3e-5 (the
paper's REDI/SFT learning-rate ratio is 1/50).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MARKER = "DEMO"  # marks --out as a demo's: the only non-empty directory the demo writes into


def run(*cmd: str) -> None:
    """Run one tool. It gets its own process group, so Ctrl-C reaches only the demo, which then stops the tool
    (every tool's outputs survive a kill: checkpoints and results are written atomically) and says where
    things stand, instead of each process printing a traceback."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    print(f"  ({time.time() - t:.0f}s)", flush=True)


def stages(out: Path, samples: int) -> list[tuple[str, Path, list[str]]]:
    """(name, the output whose presence means the stage finished, command) of every stage, in order. Training
    checkpoints as it goes and always runs with --resume; evaluation resumes by itself."""
    common = ["--data", f"{out}/data", "--max-len", "256", "--micro-tokens", "4096", "--save-every", "100",
              "--log-every", "10", "--resume"]
    return [
        ("toy corpus", out / "toy" / "model" / "config.json",
         ["data.py", "toy", "--out", f"{out}/toy", "--n-train", "5000"]),
        ("prepare", out / "data" / "manifest.json",
         ["data.py", "prepare", "--raw", f"{out}/toy/raw", "--model", f"{out}/toy/model", "--out", f"{out}/data"]),
        ("base model", out / "base" / "config.json",
         ["model.py", "init", "--config", f"{out}/toy/model", "--out", f"{out}/base"]),
        ("SFT", out / "sft" / "final",
         ["train.py", "--stage", "sft", "--model", f"{out}/base", "--out", f"{out}/sft", "--batch-size", "32",
          "--epochs", "8", "--lr", "4e-3", *common]),
        ("REDI", out / "redi" / "final",
         ["train.py", "--stage", "redi", "--alpha", "0.8", "--model", f"{out}/sft/final", "--out", f"{out}/redi",
          "--batch-size", "32", "--epochs", "1", "--lr", "3e-5", *common]),
        *((f"{name} evaluation", out / name / "eval" / "results.json",
           ["evaluate.py", "--model", f"{out}/{name}/final", "--benchmarks", f"{out}/toy/test.jsonl",
            "--out", f"{out}/{name}/eval", "--samples", str(samples), "--max-new-tokens", "160",
            "--prompt", "{problem}", "--think-prompt", "train"]) for name in ("sft", "redi")),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where everything goes (an earlier demo there is continued)")
    p.add_argument("--fresh", action="store_true", help="remove an earlier demo in --out and start over")
    p.add_argument("--samples", type=int, default=4, help="samples per test problem")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MARKER).is_file():
        sys.exit(f"error: {out}: exists and is not an earlier demo (no {MARKER}); refusing to write into it: "
                 f"choose another --out")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by demo.py; `python demo.py` continues it, `--fresh` starts over\n")
    t0 = time.time()
    name = "setup"
    try:
        for name, done, cmd in stages(out, args.samples):
            if done.exists():
                print(f"\n{name}: done in an earlier run ({done}); skipped", flush=True)
            else:
                run(*cmd)
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: the step above failed (exit code {e.returncode}); rerun with the same --out to continue "
                 f"from that step")
    except KeyboardInterrupt:
        print(f"\ninterrupted during the {name} stage; finished stages and checkpoints are kept in {out}: rerun "
              f"with the same --out (without --fresh) to continue from there", flush=True)
        sys.exit(130)
    print(f"\nREDI recipe on the toy task, {time.time() - t0:.0f}s in all. pass@1 over {args.samples} samples "
          f"(%, ± SEM) on {out}/toy/test.jsonl:\n")
    print(f"| model | pass@1 | pass@{args.samples} | mean tokens | cut at limit |")
    print("|---|---|---|---|---|")
    changed = []
    for name, label in (("sft", "SFT (stage 1)"), ("redi", "+ REDI, alpha 0.8 (stage 2)")):
        m = json.loads((out / name / "eval" / "results.json").read_text())["benchmarks"]["test"]
        print(f"| {label} | {100 * m['pass@1']:.1f} ± {100 * m['sem']:.1f} | {100 * m[f'pass@{args.samples}']:.1f} | "
              f"{m['mean_tokens']:.0f} | {m['cut_at_limit']} |")
        changed.append(str(m["changed_by_grading"]))
    print(f"\nGraded by the paper's rule (evaluate.py's default); the lenient rule changes {' and '.join(changed)} "
          "verdicts of the two models.")


if __name__ == "__main__":
    main()
