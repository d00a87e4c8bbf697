"""The whole REDI recipe on a toy model, end to end, in minutes on a CPU (and on a GPU when there is one).

    python demo.py                 # writes runs/demo/, prints the results table at the end
    python demo.py                 # again, after Ctrl-C or a crash: finished stages are skipped, training resumes
    python demo.py --fresh         # start over

It runs the project's own command-line tools, printing each command, exactly as a user would:

    python data.py toy            a synthetic math corpus in OpenR1-Math-Raw's schema (running sums the teacher
                                  always gets right, and two-digit products it gets wrong 45% of the time), a
                                  held-out test split, a byte-level BPE tokenizer with Qwen's special tokens and
                                  a tiny Qwen2 config
    python data.py prepare        the paper's selection: D_SFT and D_Pref, tokenized
    python model.py init          a randomly initialized tiny Qwen2 (the "base model")
    python train.py --stage sft   stage 1: SFT on the correct traces
    python train.py --stage redi  stage 2, three times from the same SFT model, side by side, at one learning
                                  rate: alpha 0 (the control: more training on the positives alone), alpha 0.8
                                  (REDI) and alpha 1 (the symmetric objective, Eq. 4)
    python evaluate.py            every model on the held-out test split, graded by verify.py
    python plot.py                the stage-2 dynamics (accuracy by step, chosen and rejected LogPS), when
                                  matplotlib is installed

The paper's finding under test: at a learning rate where the symmetric objective collapses (both LogPS fall
and accuracy crashes), alpha 0.8 holds. The alpha-0 control separates what the negatives do from what
more training does. The toy's training prompts are the bare problems (as the paper's are), so evaluation
uses the bare problem as the user turn too, and starts the forced <think> the way training traces do
(`--think-prompt train`: the paper's template drops a newline there, which a model this small does not
survive); sampling is the paper's (temperature 0.6, top-p 0.95).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
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
# The arguments that shape a demo's results, kept in <out>/settings.json: a finished stage is skipped when the demo
# is continued, so continuing with other values would report the old results under the new ones.
SETTINGS, SETTINGS_FILE = ("seed", "n_train", "n_test", "sft_epochs", "lr2", "steps2", "save_every2",
                           "samples"), "settings.json"
# Stage 2: (run directory, alpha, label); all three start from the SFT model and share the learning rate.
STAGE2 = (("control", 0.0, "alpha 0 (control)"), ("redi", 0.8, "alpha 0.8 (REDI)"),
          ("symmetric", 1.0, "alpha 1 (symmetric)"))
# A stage: (name, the output whose presence means it finished, command, group run side by side or None).
Stage = tuple[str, Path, list[str], str | None]
CHECKPOINT_EVAL = ["--samples", "2", "--limit", "100"]  # the accuracy-by-step panel: cheaper than the final table


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


def run_together(cmds: list[list[str]], logs: list[Path]) -> None:
    """Run independent tools side by side, the CPU's cores split between them, each writing to its log. On 2
    cores this takes about as long as running them in a row (the three stage-2 runs: 50 s); with more cores,
    less. Ctrl-C or one failure stops them all."""
    threads = str(max(1, (os.cpu_count() or 1) // len(cmds)))
    procs = []
    t = time.time()
    try:
        for cmd, log in zip(cmds, logs):
            print(f"\n$ {shlex.join(cmd)} > {log}", flush=True)
            with open(log, "a") as f:
                procs.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, start_new_session=True, stdout=f,
                                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads}))
        for cmd, log, proc in zip(cmds, logs, procs):
            if proc.wait() != 0:
                print(f"\n{log}, last lines:\n" + "\n".join(log.read_text().splitlines()[-10:]), flush=True)
                raise subprocess.CalledProcessError(proc.returncode, cmd)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    print(f"  ({time.time() - t:.0f}s, side by side, {threads} thread(s) each)", flush=True)


def evaluate_args(out: Path) -> list[str]:
    """evaluate.py's settings for every model: the toy's test split, its prompt and its forced <think>."""
    return ["--benchmarks", f"{out}/toy/test.jsonl", "--max-new-tokens", "120", "--prompt", "{problem}",
            "--think-prompt", "train"]


def stages(out: Path, a: argparse.Namespace) -> list[Stage]:
    """Every stage, in order; consecutive unfinished stages of one group run side by side. Training checkpoints
    as it goes and always runs with --resume; evaluation resumes by itself."""
    common = ["--data", f"{out}/data", "--max-len", "256", "--micro-tokens", "4096", "--batch-size", "32",
              "--resume"]
    return [
        ("toy corpus", out / "toy" / "model" / "config.json",
         ["data.py", "toy", "--out", f"{out}/toy", "--n-train", str(a.n_train), "--n-test", str(a.n_test),
          "--seed", str(a.seed)], None),
        ("prepare", out / "data" / "manifest.json",
         ["data.py", "prepare", "--raw", f"{out}/toy/raw", "--model", f"{out}/toy/model", "--out", f"{out}/data"],
         None),
        ("base model", out / "base" / "config.json",
         ["model.py", "init", "--config", f"{out}/toy/model", "--out", f"{out}/base", "--seed", str(a.seed)], None),
        ("SFT", out / "sft" / "final",
         ["train.py", "--stage", "sft", "--model", f"{out}/base", "--out", f"{out}/sft", "--epochs",
          str(a.sft_epochs), "--lr", "4e-3", "--save-every", "100", "--log-every", "25", *common], None),
        *((f"stage 2, {label}", out / name / "final",
           ["train.py", "--stage", "redi", "--alpha", str(alpha), "--model", f"{out}/sft/final", "--out",
            f"{out}/{name}", "--max-steps", str(a.steps2), "--lr", str(a.lr2), "--save-every", str(a.save_every2),
            "--log-every", "10", *common], "stage 2") for name, alpha, label in STAGE2),
        *((f"{name} evaluation", out / name / "eval" / "results.json",
           ["evaluate.py", "--model", f"{out}/{name}/final", "--out", f"{out}/{name}/eval", "--samples",
            str(a.samples), *evaluate_args(out)], None) for name in ("sft", *(s[0] for s in STAGE2))),
    ]


def checkpoint_evals(out: Path) -> list[Stage]:
    """The evaluations behind the figure's accuracy panel: the SFT model (step 0 of every run) and each stage-2
    checkpoint, on the first 100 test problems."""
    evaluate = [*evaluate_args(out), *CHECKPOINT_EVAL]
    start = [("SFT model, accuracy panel", out / "sft" / "start-eval" / "results.json",
              ["evaluate.py", "--model", f"{out}/sft/final", "--out", f"{out}/sft/start-eval", *evaluate], None)]
    return start + [(f"{ckpt.parent.name} {ckpt.name}, accuracy panel", ckpt / "eval" / "results.json",
                     ["evaluate.py", "--model", f"{ckpt}/model", "--out", f"{ckpt}/eval", *evaluate], None)
                    for name, _, _ in STAGE2 for ckpt in sorted((out / name).glob("step-*"))]


def run_stages(todo: list[Stage], where: list[str]) -> None:
    """Run the unfinished stages in order, each group's side by side; `where` names the stage under way."""
    for label, group in itertools.groupby(todo, key=lambda s: s[3] or s[0]):  # stage names are unique
        group = list(group)
        for name, done, _, _ in group:
            if done.exists():
                print(f"\n{name}: done in an earlier run ({done}); skipped", flush=True)
        group = [s for s in group if not s[1].exists()]
        where[0] = label
        if len(group) == 1:
            run(*group[0][2])
        elif group:
            run_together([s[2] for s in group], [s[1].parent.with_suffix(".log") for s in group])


def logps_change(run_dir: Path) -> tuple[float, float]:
    """Change of the chosen and rejected LogPS (mean per-token log-prob of the training batch) over stage 2:
    the mean of the last few steps minus that of the first few (one step's batch is noisy)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    k = max(1, min(5, len(metrics) // 4))

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)
    return tuple(mean(metrics[-k:], key) - mean(metrics[:k], key) for key in ("logps_chosen", "logps_rejected"))


def verdict(pass1: float, control: float, d_chosen: float) -> str:
    """Plain words for a stage-2 row, against the alpha-0 control (pass@1 in %)."""
    if pass1 < control / 2:
        return "collapsed"
    if control - pass1 > 5:
        return f"degraded ({pass1 - control:+.1f} points)"
    return "stable" if d_chosen > -0.02 else "accuracy holds, chosen LogPS falling"


def report(out: Path, samples: int, seconds: float, figure: Path | None) -> None:
    results = {name: json.loads((out / name / "eval" / "results.json").read_text())["benchmarks"]["test"]
               for name in ("sft", *(s[0] for s in STAGE2))}
    print(f"\nREDI recipe on the toy task, {seconds:.0f}s in all. pass@1 over {samples} samples per problem "
          f"(%, ± SEM) on {out}/toy/test.jsonl; LogPS changes over stage 2:\n")
    print(f"| model | pass@1 | pass@{samples} | chosen LogPS | rejected LogPS | verdict |")
    print("|---|---|---|---|---|---|")
    control = 100 * results["control"]["pass@1"]
    for name, label in (("sft", "SFT (stage 1)"), *((s[0], f"+ stage 2, {s[2]}") for s in STAGE2)):
        m = results[name]
        pass1 = 100 * m["pass@1"]
        cells = [f"{pass1:.1f} ± {100 * m['sem']:.1f}", f"{100 * m[f'pass@{samples}']:.1f}"]
        if name == "sft":
            cells += ["", "", "the starting point"]
        else:
            d_chosen, d_rejected = logps_change(out / name)
            cells += [f"{d_chosen:+.3f}", f"{d_rejected:+.3f}",
                      "control" if name == "control" else verdict(pass1, control, d_chosen)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    changed = sum(m["changed_by_grading"] for m in results.values())
    print(f"\nGraded by the paper's rule (evaluate.py's default); the lenient rule changes {changed} verdicts of "
          "these models.")
    print(f"Dynamics figure: {figure}" if figure else
          "For the dynamics figure (accuracy by step, chosen and rejected LogPS), `pip install matplotlib` and "
          "run `python demo.py` again: it evaluates the stage-2 checkpoints and draws it.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where everything goes (an earlier demo there is continued)")
    p.add_argument("--fresh", action="store_true", help="remove an earlier demo in --out and start over")
    p.add_argument("--samples", type=int, default=4, help="samples per test problem")
    p.add_argument("--seed", type=int, default=0, help="the toy corpus and the base model's initialization")
    p.add_argument("--lr2", type=float, default=3e-4, help="stage 2's learning rate, shared by the three runs")
    g = p.add_argument_group("size (the defaults are the demo; tests run it smaller)")
    g.add_argument("--n-train", type=int, default=6000, help="training problems of the toy corpus")
    g.add_argument("--n-test", type=int, default=200, help="held-out test problems")
    g.add_argument("--sft-epochs", type=int, default=7,
                   help="SFT epochs (7: after them the alpha-0 control adds nothing, on the seeds checked)")
    g.add_argument("--steps2", type=int, default=60, help="stage-2 optimizer steps (about one epoch of D_Pref)")
    g.add_argument("--save-every2", type=int, default=20, help="stage-2 checkpoint interval (the figure's steps)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MARKER).is_file():
        sys.exit(f"error: {out}: exists and is not an earlier demo (no {MARKER}); refusing to write into it: "
                 f"choose another --out")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    if (out / SETTINGS_FILE).is_file():
        old = json.loads((out / SETTINGS_FILE).read_text())
        changed = [f"--{k.replace('_', '-')} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v]
        if changed:
            sys.exit(f"error: {out} holds a demo made with {', '.join(changed)}; continuing it would report its "
                     f"old results: pass --fresh to start over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by demo.py; `python demo.py` continues it, `--fresh` starts over\n")
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    t0 = time.time()
    figure, where = None, ["setup"]
    try:
        run_stages(stages(out, args), where)
        if importlib.util.find_spec("matplotlib"):
            run_stages(checkpoint_evals(out), where)
            for name, _, _ in STAGE2:  # plot.py reads a run's starting accuracy from <run>/start-eval
                (out / name / "start-eval").mkdir(exist_ok=True)
                shutil.copy(out / "sft" / "start-eval" / "results.json", out / name / "start-eval")
            figure, where[0] = out / "dynamics.png", "figure"
            run("plot.py", *(str(out / s[0]) for s in STAGE2), "--labels", *(s[2] for s in STAGE2),
                "--out", str(figure), "--title", f"Stage 2 on the toy task from one SFT model, lr {args.lr2:g} "
                f"(accuracy: {CHECKPOINT_EVAL[-1]} test problems x {CHECKPOINT_EVAL[1]} samples)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: the step above failed (exit code {e.returncode}); rerun with the same --out to continue "
                 f"from that step")
    except KeyboardInterrupt:
        print(f"\ninterrupted during the {where[0]} stage; finished stages and checkpoints are kept in {out}: "
              f"rerun with the same --out (without --fresh) to continue from there", flush=True)
        sys.exit(130)
    report(out, args.samples, time.time() - t0, figure)


if __name__ == "__main__":
    main()
