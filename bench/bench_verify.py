"""verify.py against Math-Verify on the labelled cases of tests/verify_cases.jsonl, in one run.

Reports, per tool: accuracy per category, false positives/negatives, calls over the time budget, hangs,
injected payloads that got executed, and verifications per second (sequential, one process, time per call
summed). Each tool runs in a forked child that is killed if one case takes longer than --hard-limit
seconds (a hang is counted, and the run goes on with the next case). Math-Verify is a bench-only
dependency (`pip install math-verify`, not in requirements); without it only verify.py is measured.

Modes: `response` gives each tool the full model response and lets it extract the answer itself;
`answer` gives it only the boxed content (fairer to a tool whose extraction differs).

    python bench/bench_verify.py
    python bench/bench_verify.py --modes response --hard-limit 60
"""

import argparse
import json
import logging
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sympy  # noqa: E402

import verify  # noqa: E402

try:
    import math_verify
    from math_verify import parse as mv_parse, verify as mv_verify
except ImportError:
    math_verify = None


def verify_response(case: dict) -> bool:
    return verify.grade(case["response"], case["gold"], timeout=BUDGET)


def verify_answer(case: dict) -> bool:
    return case["answer"] is not None and verify.is_equivalent(case["answer"], case["gold"], timeout=BUDGET)


def mv_gold(gold: str) -> list:
    """Math-Verify's documented use: golds are parsed from LaTeX in math delimiters."""
    return mv_parse(gold if "$" in gold else f"${gold}$")


def mathverify_response(case: dict) -> bool:
    return mv_verify(mv_gold(case["gold"]), mv_parse(case["response"]))


def mathverify_answer(case: dict) -> bool:
    return case["answer"] is not None and mv_verify(mv_gold(case["gold"]), mv_parse(f"${case['answer']}$"))


BUDGET = 5.0  # seconds: both tools' default per-call budget


def _loop(conn, fn, cases: list[dict], start: int) -> None:
    logging.disable(logging.WARNING)  # Math-Verify logs every timeout and parse failure
    for j in range(start, len(cases)):
        t0 = time.perf_counter()
        try:
            ok = bool(fn(cases[j]))
        except Exception:
            ok = False
        conn.send((j, ok, time.perf_counter() - t0))


def run(fn, cases: list[dict], hard_limit: float) -> list[tuple[bool, float, bool]]:
    """(verdict, seconds, hung) per case; a child stuck on one case is killed and the run resumes after it."""
    ctx = multiprocessing.get_context("fork")
    results: list = [None] * len(cases)
    start = 0
    while start < len(cases):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_loop, args=(child, fn, cases, start), daemon=True)
        proc.start()
        child.close()
        i = start
        while i < len(cases):
            if not parent.poll(hard_limit):
                proc.kill()
                results[i] = (False, hard_limit, True)
                i += 1
                break
            try:
                j, ok, seconds = parent.recv()
            except EOFError:  # the child died (e.g. out of memory) on case i
                results[i] = (False, 0.0, True)
                i += 1
                break
            results[j] = (ok, seconds, False)
            i = j + 1
        proc.join()
        parent.close()
        start = i
    return results


def load_cases(marker_dir: Path) -> list[dict]:
    cases = []
    for k, line in enumerate((ROOT / "tests" / "verify_cases.jsonl").read_text().splitlines()):
        case = json.loads(line)
        marker = str(marker_dir / f"case{k}")
        case["response"] = case["response"].replace("MARKER", marker)
        case["answer"] = case["answer"].replace("MARKER", marker) if case["answer"] is not None else None
        cases.append(case)
    return cases


def summarize(name: str, cases: list[dict], results: list, marker_dir: Path) -> dict:
    wrong = [c for c, (ok, _, _) in zip(cases, results) if ok != c["expected"]]
    seconds = sum(s for _, s, _ in results)
    return {
        "name": name,
        "accuracy": 1 - len(wrong) / len(cases),
        "fp": sum(1 for c in wrong if not c["expected"]),
        "fn": sum(1 for c in wrong if c["expected"]),
        "over_budget": sum(1 for _, s, _ in results if s > BUDGET),
        "hung": sum(1 for _, _, h in results if h),
        "executed": len(list(marker_dir.iterdir())),
        "per_s": len(cases) / seconds if seconds else float("inf"),
        "max_s": max(s for _, s, _ in results),
        "by_category": Counter(c["category"] for c, (ok, _, _) in zip(cases, results) if ok == c["expected"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["response", "answer"], choices=["response", "answer"])
    p.add_argument("--hard-limit", type=float, default=30.0, help="seconds before a case counts as a hang")
    p.add_argument("--workers", type=int, default=None, help="grade_batch workers (default: all CPUs)")
    args = p.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, sympy {sympy.__version__}")
    if math_verify is None:
        print("math-verify is NOT installed: only verify.py is measured (pip install math-verify to compare)")
    else:
        from importlib.metadata import version
        print(f"math-verify {version('math-verify')} (parse(gold in $..$), verify(gold, parse(prediction)), defaults)")

    tools = [("verify.py", {"response": verify_response, "answer": verify_answer})]
    if math_verify is not None:
        tools.append(("Math-Verify", {"response": mathverify_response, "answer": mathverify_answer}))

    summaries = []
    for mode in args.modes:
        for name, fns in tools:
            with tempfile.TemporaryDirectory() as tmp:  # injected payloads would create files here
                cases = load_cases(Path(tmp))
                results = run(fns[mode], cases, args.hard_limit)
                summaries.append(summarize(f"{name} [{mode}]", cases, results, Path(tmp)))

    counts = Counter(c["category"] for c in cases)
    categories = sorted(counts)
    width = max(len(s["name"]) for s in summaries)
    print(f"\n{len(cases)} labelled cases, budget {BUDGET:.0f} s per call, hang limit {args.hard_limit:.0f} s\n")
    print("accuracy per category (correct verdicts / cases)")
    print(f"{'category':<22}{'n':>6}  " + "  ".join(f"{s['name']:>{width}}" for s in summaries))
    for cat in categories:
        shares = (s["by_category"][cat] / counts[cat] for s in summaries)
        print(f"{cat:<22}{counts[cat]:>6}  " + "  ".join(f"{share:>{width}.1%}" for share in shares))
    print()
    rows = [("accuracy", "{:.2%}", "accuracy"), ("false positives", "{}", "fp"), ("false negatives", "{}", "fn"),
            ("calls over budget", "{}", "over_budget"), ("hangs (killed)", "{}", "hung"),
            ("payloads executed", "{}", "executed"), ("verifications/s", "{:.0f}", "per_s"),
            ("slowest call (s)", "{:.2f}", "max_s")]
    print(f"{'':<28}" + "  ".join(f"{s['name']:>{width}}" for s in summaries))
    for label, fmt, key in rows:
        print(f"{label:<28}" + "  ".join(f"{fmt.format(s[key]):>{width}}" for s in summaries))

    with tempfile.TemporaryDirectory() as tmp:
        cases = load_cases(Path(tmp))
        t0 = time.time()
        batch = verify.grade_batch([(c["response"], c["gold"]) for c in cases], timeout=BUDGET, workers=args.workers)
        elapsed = time.time() - t0
        executed = len(list(Path(tmp).iterdir()))
    accuracy = sum(ok == c["expected"] for ok, c in zip(batch.correct, cases)) / len(cases)
    print(f"\nverify.grade_batch: {len(cases)} pairs in {elapsed:.1f} s ({len(cases) / elapsed:.0f}/s, "
          f"workers={args.workers or os.cpu_count()}), accuracy {accuracy:.2%}, timeouts {batch.n_timeouts}, "
          f"payloads executed {executed}")

    if math_verify is None:
        return
    print("\ntargets")
    for mode in args.modes:
        ours = next(s for s in summaries if s["name"] == f"verify.py [{mode}]")
        theirs = next(s for s in summaries if s["name"] == f"Math-Verify [{mode}]")
        behind = [c for c in categories if ours["by_category"][c] < theirs["by_category"][c]]
        print(f"  [{mode}] accuracy >= Math-Verify overall: {ours['accuracy'] >= theirs['accuracy']} "
              f"({ours['accuracy']:.2%} vs {theirs['accuracy']:.2%}); in every category: {not behind}"
              + (f" (behind in {', '.join(behind)})" if behind else ""))
        print(f"  [{mode}] zero executions and zero calls over budget: "
              f"{ours['executed'] == 0 and ours['over_budget'] == 0 and ours['hung'] == 0}")
        print(f"  [{mode}] >= 2x Math-Verify's verifications/s: {ours['per_s'] >= 2 * theirs['per_s']} "
              f"({ours['per_s'] / theirs['per_s']:.1f}x)")


if __name__ == "__main__":
    main()
