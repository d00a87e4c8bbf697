"""pass@k on the paper's math benchmarks: sample with sample.py, grade with verify.py.

    python evaluate.py --model runs/redi/final --benchmarks math500,aime24,amc23,minerva,olympiadbench \\
        --samples 16 --out runs/redi/eval
    torchrun --nproc_per_node 8 evaluate.py ...      # problems sharded across ranks, gathered on rank 0

The paper's protocol (Appendix C.5): its instruction and the problem as the user turn, the chat template
with the generation forced to start with <think>, temperature 0.6, top-p 0.95, up to 32,768 new tokens;
pass@1 averaged over the k samples with the SEM of the k per-sample benchmark scores, and pass@k with the
unbiased estimator. Grading is the paper's (its rllm/DeepScaleR grader): a response without </think> is
wrong and the answer is the last \\boxed{} after it; `--grading lenient` also searches the thinking part.
Both rules are computed, and results.json says how many verdicts they disagree on. Benchmarks are the
bundled benchmarks/<name>.jsonl or any JSONL file with `problem` and `answer` fields.

Writes <out>/generations.rank<r>.jsonl while sampling (a rerun with the same --out skips finished
problems; the sampler's randomness depends only on the seed and each problem's id, so a resumed run
produces what an uninterrupted one would), then <out>/generations.jsonl (every generation with its
extracted answer, verdict and token count) and <out>/results.json, and prints a table like the paper's.
<out>/settings.json marks the directory as an evaluation: evaluate.py writes only into a new or empty --out or
one holding it, and resumes only with the same settings and the same weights (a fingerprint of their content).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data as data_lib
import model as model_lib
import sample as sample_lib
import verify

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ("math500", "aime24", "amc23", "minerva", "olympiadbench")
PROMPT = ("Solve the following math problem efficiently and clearly. The last line of your response should be "
          "of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' "
          "(without quotes) where ANSWER is just the final number or expression that solves the problem. "
          "Think step by step before answering.\n\n{problem}")
# How a response is graded (verify.py): "paper" is the rule of the rllm/DeepScaleR grader the paper's numbers come
# from (a response without </think> is wrong; the answer is boxed after it); "lenient" also searches the thinking
# part when nothing is boxed after </think>, or when there is no </think> (a response cut at the token limit).
GRADING = ("paper", "lenient")
# Generation settings that must match for a rerun to reuse earlier generations; `weights` is the checkpoint's
# content fingerprint, so new weights at the same path are never reported with the old ones' generations.
SETTINGS = ("model", "weights", "samples", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "prompt",
            "think_prompt")
# The file that marks --out as ours: evaluate.py writes only into a new or empty directory, or one holding it.
SETTINGS_FILE = "settings.json"


# -----------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples,
    drawn without replacement, include a correct one."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def benchmark_metrics(correct: np.ndarray, ks: list[int]) -> dict:
    """correct: (problems, n) booleans. pass@1 is the mean over problems and samples; SEM (the paper's) is
    the sample standard deviation of the n per-sample benchmark scores P_j (the score of every problem's
    j-th sample) over sqrt(n); pass@k averages the unbiased estimator over problems."""
    n = correct.shape[1]
    per_sample = correct.mean(axis=0)  # (n,) P_1 .. P_n
    sem = float(per_sample.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    counts = correct.sum(axis=1)
    return {"problems": int(correct.shape[0]), "samples": n, "pass@1": float(correct.mean()), "sem": sem,
            **{f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks if k <= n}}


# -----------------------------------------------------------------------------
# Benchmarks


def load_benchmark(spec: str) -> tuple[str, list[dict]]:
    """A bundled benchmark by name, or a JSONL file with `problem` and `answer` fields (`id` optional)."""
    path = ROOT / "benchmarks" / f"{spec}.jsonl" if spec in BENCHMARKS else Path(spec)
    if not path.is_file():
        raise data_lib.DataError(f"{spec}: not a bundled benchmark ({', '.join(BENCHMARKS)}) or a JSONL file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem, answer = row["problem"], row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise data_lib.DataError(f"{path}:{i + 1}: a benchmark line needs `problem` and `answer` ({e})") from None
        rows.append({"id": str(row.get("id", i)), "problem": str(problem), "answer": str(answer)})
    if not rows:
        raise data_lib.DataError(f"{path}: holds no problems; a benchmark needs at least one")
    if len({r["id"] for r in rows}) != len(rows):
        raise data_lib.DataError(f"{path}: ids are not unique")
    return (spec if spec in BENCHMARKS else path.stem), rows


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over a checkpoint's config.json and safetensors files (names and contents): what identifies the
    model whose generations an --out holds, wherever it lives and whatever its path. Seconds per billion
    parameters, once per run."""
    h = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")) + [Path(path) / "config.json"]:
        h.update(f"{file.name}:{data_lib.file_sha256(file)}\n".encode())
    return h.hexdigest()


def eta_seconds(finish_times: list[float], total: int, window: int = 64) -> float | None:
    """Seconds left at the pace of the last `window` problems (their finishing times). The first problem's time
    includes the warm-up (compilation, the KV pool), so an ETA over all problems started hours too long for a
    minute's run; none is given until three problems are done, the first one's time left out."""
    if len(finish_times) < 3:
        return None
    recent = finish_times[-window:] if len(finish_times) > window else finish_times[1:]
    return (recent[-1] - recent[0]) / (len(recent) - 1) * (total - len(finish_times))


def problem_key(bench: str, problem_id: str) -> int:
    """A stable 32-bit id for the sampler's randomness: the same problem draws the same samples anywhere."""
    return int(hashlib.sha256(f"{bench}/{problem_id}".encode()).hexdigest()[:8], 16)


def read_generations(out: Path) -> dict[tuple[str, str], list[dict]]:
    """The samples of every problem in every rank's file of earlier or current runs, one record per sample in
    sample order. A line that does not parse (torn by a killed run) is ignored; a sample written twice (a run
    killed part-way through writing a problem, which the next run samples again, identically) counts once."""
    done = defaultdict(dict)
    for path in sorted(out.glob("generations.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(rec["benchmark"], rec["id"])][rec["sample"]] = rec
    return defaultdict(list, {k: [v[j] for j in sorted(v)] for k, v in done.items()})


def drop_torn_tails(out: Path, log: Callable[[str], None]) -> None:
    """Cut the torn last line (a run killed while writing it) off every rank's file, reporting it, so that a
    resumed run appends whole lines after whole lines: appended onto the torn line, its first record would be
    unreadable too, and its problem would be reported with a sample missing."""
    for path in sorted(out.glob("generations.rank*.jsonl")):
        with open(path, "r+b") as f:
            size = end = f.seek(0, os.SEEK_END)
            while end > 0:  # back to just after the last newline, a MiB at a time
                start = max(end - 2**20, 0)
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                f.truncate(end)
                log(f"{path}: dropped a torn last line ({size - end} bytes, left by a killed run); "
                    f"its problem is sampled again")


# -----------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help="comma-separated bundled names or JSONL paths (default: all five)")
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--samples", type=int, default=16, help="samples per problem (paper: 16; 4 for quick checks)")
    p.add_argument("--pass-k", default=None, help="comma-separated k for pass@k (default: 1 and --samples)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT, help="user-turn template with {problem} (default: the paper's)")
    p.add_argument("--think-prompt", choices=["paper", "train"], default="paper",
                   help="how the forced <think> starts the answer: paper = the authors' template "
                        "(assistant<think>), train = as the training traces begin (assistant, newline, <think>)")
    p.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    p.add_argument("--kv-gib", type=float, help="KV cache memory per rank (default: 70%% of free GPU memory)")
    p.add_argument("--max-slots", type=int, default=256, help="sequences decoded together per rank")
    p.add_argument("--eager", action="store_true", help="sample without torch.compile or CUDA graphs (on GPU "
                                                        "much slower: for a setup where compiling fails)")
    p.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per verification")
    p.add_argument("--grading", choices=GRADING, default="paper",
                   help="paper: no </think> is wrong, the last box after it is the answer (the rllm/DeepScaleR "
                        "grader); lenient: also search the thinking part. Both are computed and reported; this one "
                        "counts. Not a generation setting: rerun with the same --out to regrade.")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if "{problem}" not in args.prompt:
        p.error("--prompt must contain {problem}")
    args.ks = sorted({int(k) for k in args.pass_k.split(",")} if args.pass_k else {1, args.samples})
    return args


def main(argv: list[str] | None = None) -> None:
    from train import setup_distributed  # the same process-group setup as training (one process or torchrun)

    args = parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        evaluate(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def evaluate(args, rank: int, world: int, device: torch.device) -> None:
    out = Path(args.out)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        model_lib.check_replaceable(out, SETTINGS_FILE, "choose another --out (evaluate.py writes only into a new "
                                                        "or empty directory, or one of its own evaluations)")
        benches = [load_benchmark(spec.strip()) for spec in args.benchmarks.split(",") if spec.strip()]
        config = model_lib.Qwen2Config.from_pretrained(args.model)
        family = data_lib.chat_family(config.model_type)  # the checkpoint's own chat template
        tok = data_lib.load_tokenizer(args.model, config.vocab_size, family)  # before the weights: it fails fast
        model = model_lib.load_pretrained(args.model, device=device,
                                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except (data_lib.DataError, model_lib.ConfigError, model_lib.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if note := data_lib.template_note(args.model, family):
        log(note)
    if rank == 0:
        args.weights = checkpoint_fingerprint(args.model)
        settings = {k: getattr(args, k) for k in SETTINGS}
        settings_path = out / SETTINGS_FILE
        old = json.loads(settings_path.read_text()) if settings_path.exists() else settings
        changed = [k for k in SETTINGS if old.get(k) != settings[k]]
        if changed:
            why = "; the checkpoint's weights are not the ones evaluated there" if "weights" in changed else ""
            raise SystemExit(f"error: {out} holds generations made with other settings ({', '.join(changed)}{why}); "
                             f"use another --out")
        out.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n")
        drop_torn_tails(out, log)
    dist.barrier()
    # Ranks finish sampling hours apart (and rank 0 then grades for minutes), but a collective on the default
    # group fails after its 30-minute timeout (NCCL's watchdog then kills the job): the waits at the end of
    # the run go through a gloo group whose timeout no evaluation reaches.
    finish_line = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))

    problems = [(name, row) for name, rows in benches for row in rows[:args.limit]]
    done = read_generations(out)
    todo = [(name, row) for name, row in problems if len(done.get((name, row["id"]), [])) < args.samples]
    mine = todo[rank::world]
    log(f"{len(problems)} problems, {len(problems) - len(todo)} already done, {len(todo)} to sample "
        f"({args.samples} samples each, up to {args.max_new_tokens} new tokens) on {world} rank(s)")

    stops = tuple(data_lib.stop_ids(tok, family))
    params = sample_lib.SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, stops, args.seed)
    prompts = [tok.encode(data_lib.eval_prompt_text(args.prompt.replace("{problem}", row["problem"]),
                                                    args.think_prompt, family), add_special_tokens=False).ids
               for _, row in mine]
    keys = [problem_key(name, row["id"]) for name, row in mine]
    pending: dict[int, list] = defaultdict(list)
    generated, t0, last_log = 0, time.time(), 0.0
    finish_times: list[float] = []
    eager = dict(cuda_graphs=False, compile=False, in_place=False) if args.eager else {}
    sampler = sample_lib.Sampler(model, kv_gib=args.kv_gib, max_slots=args.max_slots, **eager)
    with open(out / f"generations.rank{rank}.jsonl", "a") as f, _eager_hint():
        for i, j, tokens in sampler.stream(prompts, params, n=args.samples, keys=keys):
            pending[i].append((j, tokens))
            generated += len(tokens)
            if len(pending[i]) < args.samples:
                continue
            name, row = mine[i]
            with _kept_on_disk_error(out, "the generations"):
                for j, toks in sorted(pending.pop(i), key=lambda x: x[0]):
                    cut = len(toks) >= args.max_new_tokens and toks[-1] not in stops
                    f.write(json.dumps({"benchmark": name, "id": row["id"], "sample": j, "tokens": len(toks),
                                        "cut": cut, "completion": tok.decode(toks, skip_special_tokens=True)},
                                       allow_nan=False) + "\n")
                f.flush()  # a whole problem at a time, so a rerun never sees half of one
            finish_times.append(time.time())
            if finish_times[-1] - last_log > 10 or len(finish_times) == len(mine):
                last_log = finish_times[-1]
                eta = eta_seconds(finish_times, len(mine))
                log(f"  rank 0: {len(finish_times)}/{len(mine)} problems, "
                    f"{generated / (last_log - t0):,.0f} generated tokens/s, eta "
                    f"{'(after a few problems)' if eta is None else time.strftime('%H:%M:%S', time.gmtime(eta))}")
    dist.barrier(group=finish_line)
    if rank == 0:
        with _kept_on_disk_error(out, "the report"):
            report(args, out, benches, problems)
    dist.barrier(group=finish_line)


@contextlib.contextmanager
def _kept_on_disk_error(out: Path, what: str):
    """A write that fails (a full disk) ends the run saying what is kept: every problem written whole before
    it (a line torn by the failure is dropped when the same command resumes)."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: could not write {what} in {out} ({e}); the problems finished before are kept: "
                         f"free space and rerun the same command to go on") from e


@contextlib.contextmanager
def _eager_hint():
    """A failure of torch.compile while sampling ends the run with the way around it: the finished problems
    are on disk, and --eager (not a setting) resumes them without compiling."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        raise SystemExit(f"error: compiling the sampler failed ({type(e).__name__}: {str(e)[:500]}); rerun the "
                         f"same command with --eager to go on without compiling (finished problems are kept)") from e


def report(args, out: Path, benches, problems) -> None:
    """Grade every generation by both rules (GRADING), write generations.jsonl and results.json, print the table.
    Metrics follow --grading; how many verdicts the other rule would change is reported with them."""
    done = read_generations(out)
    records = [rec for name, row in problems for rec in done[(name, row["id"])][:args.samples]]
    gold = {(name, row["id"]): row["answer"] for name, row in problems}
    pairs = [("<think>\n" + r["completion"], gold[(r["benchmark"], r["id"])]) for r in records]
    t = time.time()
    by_rule = {rule: verify.grade_batch(pairs, timeout=args.verify_timeout, require_think_end=rule == "paper")
               for rule in GRADING}
    graded, other = by_rule[args.grading], next(rule for rule in GRADING if rule != args.grading)
    print(f"graded {len(records)} generations by both rules in {time.time() - t:.0f}s "
          f"({graded.n_timeouts} verifier timeouts)")
    with open(out / "generations.jsonl", "w") as f:
        for k, rec in enumerate(records):
            rec |= {"gold": gold[(rec["benchmark"], rec["id"])], "answer": graded.answers[k],
                    "correct": graded.correct[k], "verify_timeout": graded.timed_out[k],
                    "correct_by_rule": {rule: by_rule[rule].correct[k] for rule in GRADING}}
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    results = {"model": args.model, "settings": {k: getattr(args, k) for k in SETTINGS}, "grading": args.grading,
               "benchmarks": {}}
    for name, _ in benches:
        recs = [r for r in records if r["benchmark"] == name]  # problem-major, samples in order
        correct = np.array([r["correct"] for r in recs], dtype=bool).reshape(-1, args.samples)  # (problems, n)
        changed = [r for r in recs if r["correct_by_rule"]["paper"] != r["correct_by_rule"]["lenient"]]
        results["benchmarks"][name] = benchmark_metrics(correct, args.ks) | {
            "verify_timeouts": sum(r["verify_timeout"] for r in recs), "cut_at_limit": sum(r["cut"] for r in recs),
            "mean_tokens": float(np.mean([r["tokens"] for r in recs])),
            f"pass@1 ({other})": float(np.mean([r["correct_by_rule"][other] for r in recs])),
            "changed_by_grading": len(changed)}
    scores = [m["pass@1"] for m in results["benchmarks"].values()]
    results["average"] = {"pass@1": float(np.mean(scores))} | {
        f"pass@{k}": float(np.mean([m[f"pass@{k}"] for m in results["benchmarks"].values()]))
        for k in args.ks if k <= args.samples}
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    changed = sum(m["changed_by_grading"] for m in results["benchmarks"].values())
    print(f"grading: {args.grading} rule; the {other} rule would change {changed} of {len(records)} verdicts")
    print(format_table(results, args.ks))


def format_table(results: dict, ks: list[int]) -> str:
    """A Markdown table like the paper's Table 1: pass@1 (%) +- SEM per benchmark and their average, then
    pass@k rows, timeouts, truncations, and what the other grading rule would give."""
    benches = results["benchmarks"]
    head = "| metric | " + " | ".join(benches) + " | avg |"
    lines = [head, "|" + "---|" * (len(benches) + 2)]
    lines.append("| pass@1 | " + " | ".join(f"{100 * m['pass@1']:.1f} ± {100 * m['sem']:.1f}" for m in benches.values())
                 + f" | {100 * results['average']['pass@1']:.1f} |")
    for k in ks:
        if k > 1 and all(f"pass@{k}" in m for m in benches.values()):
            lines.append(f"| pass@{k} | " + " | ".join(f"{100 * m[f'pass@{k}']:.1f}" for m in benches.values())
                         + f" | {100 * results['average'][f'pass@{k}']:.1f} |")
    lines.append("| problems | " + " | ".join(str(m["problems"]) for m in benches.values()) + " | |")
    lines.append("| cut at limit | " + " | ".join(str(m["cut_at_limit"]) for m in benches.values()) + " | |")
    lines.append("| verifier timeouts | " + " | ".join(str(m["verify_timeouts"]) for m in benches.values()) + " | |")
    other = next(rule for rule in GRADING if rule != results["grading"])
    lines.append(f"| pass@1, {other} grading | " + " | ".join(f"{100 * m[f'pass@1 ({other})']:.1f}"
                                                              for m in benches.values()) + " | |")
    lines.append(f"| verdicts {other} grading changes | " + " | ".join(str(m["changed_by_grading"])
                                                                       for m in benches.values()) + " | |")
    return f"graded by the {results['grading']} rule (evaluate.py --grading)\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
