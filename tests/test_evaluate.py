"""evaluate.py: pass@k, SEM, and the whole evaluation on toy models, including resume."""

import datetime
import json
import shutil
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data as D
import evaluate as E
import model as M
import sample as S
import verify


def test_pass_at_k_against_hand_computed_values():
    assert E.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert E.pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 include one of the 2 correct
    assert E.pass_at_k(16, 0, 16) == 0.0 and E.pass_at_k(16, 16, 1) == 1.0
    assert E.pass_at_k(16, 1, 16) == 1.0 and E.pass_at_k(16, 1, 8) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        E.pass_at_k(4, 1, 5)


def test_benchmark_metrics_against_hand_computed_values():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    m = E.benchmark_metrics(correct, ks=[1, 2, 4, 8])
    assert m["pass@1"] == pytest.approx(8 / 12)
    # per-sample scores P_j = 2/3, 1/3, 2/3, 1: sample std sqrt((1/9 + 1/9) / 3), over sqrt(4)
    assert m["sem"] == pytest.approx(np.sqrt((2 / 9) / 3) / 2)
    assert m["pass@2"] == pytest.approx((1 + 0.5 + 1) / 3)  # problem 2: 1 - C(3,2)/C(4,2)
    assert m["pass@4"] == 1.0 and "pass@8" not in m
    assert (m["problems"], m["samples"]) == (3, 4)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    D.toy_corpus(d / "toy", n_train=50, n_test=8, seed=2)
    config = M.Qwen2Config.from_pretrained(d / "toy" / "model")
    M.save_pretrained(M.build_model(config, seed=0), d / "model", tokenizer_from=d / "toy" / "model")
    return d


def run(toy, out, *extra):
    E.main(["--model", str(toy / "model"), "--benchmarks", str(toy / "toy" / "test.jsonl"), "--out", str(out),
            "--samples", "3", "--max-new-tokens", "12", "--prompt", "{problem}", *extra])
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return results, records


def test_end_to_end_on_a_toy_model(toy, tmp_path):
    results, records = run(toy, tmp_path / "out", "--pass-k", "1,2,3")
    m = results["benchmarks"]["test"]
    assert m["problems"] == 8 and m["samples"] == 3 and len(records) == 24
    assert {"pass@1", "pass@2", "pass@3", "sem", "cut_at_limit", "verify_timeouts"} <= set(m)
    for r in records:  # every generation with its answer, verdict and token count
        assert {"benchmark", "id", "sample", "completion", "tokens", "cut", "answer", "correct", "gold"} <= set(r)
        response = "<think>\n" + r["completion"]
        assert r["correct"] == verify.grade(response, r["gold"], require_think_end=True)  # the paper's rule
        assert r["correct_by_rule"] == {"paper": r["correct"], "lenient": verify.grade(response, r["gold"])}
        assert r["tokens"] == 12 or not r["cut"]  # cut: at the limit without a stop token
    assert m["cut_at_limit"] == sum(r["cut"] for r in records)
    assert m["pass@1"] == pytest.approx(np.mean([r["correct"] for r in records]))
    assert results["grading"] == "paper"


def test_eager_sampling_gives_the_same_generations(toy, tmp_path):
    """--eager (nothing compiled, no CUDA graphs: the escape hatch where compiling fails on a GPU) is accepted
    and samples the same tokens. On CPU the default path is already eager, so this checks the plumbing only."""
    _, default = run(toy, tmp_path / "default", "--temperature", "1.0", "--limit", "3")
    _, eager = run(toy, tmp_path / "eager", "--temperature", "1.0", "--limit", "3", "--eager")
    assert [r["completion"] for r in eager] == [r["completion"] for r in default]


def test_a_compile_failure_while_sampling_points_to_eager(toy, tmp_path, monkeypatch):
    """torch.compile failing inside the sampler ends the run with a clear error naming --eager, which then
    resumes the same --out."""
    real = S.Sampler.stream

    def failing(self, prompts, params, n=1, keys=None):
        yield from list(real(self, prompts[:1], params, n, keys[:1]))  # the first problem finishes
        raise torch._dynamo.exc.TorchDynamoException("inductor could not compile")
    monkeypatch.setattr(S.Sampler, "stream", failing)
    with pytest.raises(SystemExit, match="rerun the same command with --eager"):
        run(toy, tmp_path / "o", "--limit", "3")
    assert len((tmp_path / "o" / "generations.rank0.jsonl").read_text().splitlines()) == 3  # 3 samples kept
    monkeypatch.setattr(S.Sampler, "stream", real)
    _, records = run(toy, tmp_path / "o", "--limit", "3", "--eager")
    assert len(records) == 9


def test_a_full_disk_while_sampling_keeps_what_was_written(toy, tmp_path, monkeypatch):
    """The disk fills while the second problem's samples are written: the run ends saying so, the first
    problem's lines are kept whole, and the same command then finishes with every sample once."""
    real_open = open

    class FullDisk:
        def __init__(self, f, lines):
            self.f, self.lines = f, lines

        def write(self, text):
            if self.lines == 0:
                self.f.write(text[:10])  # a torn line, as a write cut short leaves it
                self.f.flush()
                raise OSError(28, "No space left on device")
            self.lines -= 1
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(E, "open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode, *a, **k), 3)
                        if mode == "a" else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit, match=r"could not write the generations in \S+ \(\[Errno 28\] No space left on "
                                         r"device\); the problems finished before are kept"):
        run(toy, tmp_path / "o", "--limit", "3")
    lines = (tmp_path / "o" / "generations.rank0.jsonl").read_text().split("\n")
    assert len(lines) == 4 and all(json.loads(line) for line in lines[:3])  # 3 whole lines, then the torn one
    monkeypatch.undo()
    _, records = run(toy, tmp_path / "o", "--limit", "3")
    assert sorted((r["id"], r["sample"]) for r in records) == sorted({(r["id"], r["sample"]) for r in records})
    assert len(records) == 9


def scripted_stream(correct_of):
    """A stand-in for the sampler: every sample answers with the gold answer when correct_of(problem,
    sample) says so, else with a wrong one."""
    def stream(self, prompts, params, n=1, keys=None):
        tok = D.load_tokenizer(self._model_dir)
        for i, prompt in enumerate(prompts):
            gold = self._golds[i]
            for j in range(n):
                answer = gold if correct_of(i, j) else gold + "1"
                text = f"ok</think>\n\nTherefore, the final answer is: $\\boxed{{{answer}}}$. I hope it is correct"
                yield i, j, tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id(D.IM_END)]
    return stream


def test_metrics_of_a_scripted_run_are_exact(toy, tmp_path, monkeypatch):
    golds = [json.loads(line)["answer"] for line in (toy / "toy" / "test.jsonl").read_text().splitlines()]
    monkeypatch.setattr(S.Sampler, "_model_dir", toy / "model", raising=False)
    monkeypatch.setattr(S.Sampler, "_golds", golds, raising=False)
    monkeypatch.setattr(S.Sampler, "stream", scripted_stream(lambda i, j: (i + j) % 3 == 0))
    results, records = run(toy, tmp_path / "out")
    correct = np.array([[(i + j) % 3 == 0 for j in range(3)] for i in range(8)])
    assert [r["correct"] for r in records] == correct.flatten().tolist()
    m = results["benchmarks"]["test"]
    assert m["pass@1"] == pytest.approx(correct.mean())
    assert m["pass@3"] == pytest.approx(1.0)  # every problem has exactly one correct sample of three
    assert m["sem"] == pytest.approx(correct.mean(axis=0).std(ddof=1) / np.sqrt(3))
    assert m["cut_at_limit"] == 0


def test_grading_rule_paper_by_default_lenient_on_request(toy, tmp_path, monkeypatch):
    """A response cut while thinking, or boxing its answer only inside the thinking, is wrong by the paper's
    rule and right by the lenient one; both are reported, and a rerun with the other rule only regrades."""
    golds = [json.loads(line)["answer"] for line in (toy / "toy" / "test.jsonl").read_text().splitlines()]
    forms = ("I get {a}.</think>\n\nTherefore, the final answer is: $\\boxed{{{a}}}$.",  # right by both rules
             "So the answer is \\boxed{{{a}}}, but let me check",  # no </think>: cut at the limit
             "It is \\boxed{{{a}}}.</think>\n\nThe answer is above.")  # boxed only while thinking

    def stream(self, prompts, params, n=1, keys=None):
        tok = D.load_tokenizer(toy / "model")
        for i, _ in enumerate(prompts):
            for j in range(n):
                yield i, j, tok.encode(forms[(i + j) % 3].format(a=golds[i]), add_special_tokens=False).ids

    monkeypatch.setattr(S.Sampler, "stream", stream)
    results, records = run(toy, tmp_path / "out")
    m = results["benchmarks"]["test"]
    by_form = [(i + j) % 3 for i in range(8) for j in range(3)]
    assert [r["correct"] for r in records] == [f == 0 for f in by_form]
    assert all(r["correct_by_rule"]["lenient"] for r in records)
    assert results["grading"] == "paper" and m["pass@1"] == pytest.approx(8 / 24)
    assert m["changed_by_grading"] == 16 and m["pass@1 (lenient)"] == 1.0

    monkeypatch.setattr(S.Sampler, "stream", lambda self, prompts, *a, **k: iter(()) if not prompts else 1 / 0)
    results, records = run(toy, tmp_path / "out", "--grading", "lenient")  # nothing is sampled again
    m = results["benchmarks"]["test"]
    assert results["grading"] == "lenient" and m["pass@1"] == 1.0
    assert m["changed_by_grading"] == 16 and m["pass@1 (paper)"] == pytest.approx(8 / 24)
    assert all(r["correct"] for r in records)


def test_resume_after_an_interrupted_run(toy, tmp_path, monkeypatch):
    full_results, full = run(toy, tmp_path / "full")
    real = S.Sampler.stream
    seen = []

    def dying(self, prompts, params, n=1, keys=None):
        for k, item in enumerate(real(self, prompts, params, n, keys)):
            if k == 12:  # killed half-way through the samples
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(S.Sampler, "stream", dying)
    with pytest.raises(KeyboardInterrupt):
        run(toy, tmp_path / "resumed")
    finished = len(E.read_generations(tmp_path / "resumed"))  # problems written whole before the kill
    assert 1 <= finished < 8
    monkeypatch.setattr(S.Sampler, "stream", lambda self, prompts, *a, **k: seen.append(len(prompts)) or
                        real(self, prompts, *a, **k))
    results, records = run(toy, tmp_path / "resumed")
    assert seen == [8 - finished]  # finished problems were not sampled again
    assert records == full  # the counter-based randomness: the same samples as an uninterrupted run
    assert results["benchmarks"] == full_results["benchmarks"]


def test_a_problem_written_in_part_then_again_counts_once(toy, tmp_path):
    """A run killed while writing a problem leaves some of its samples; the rerun samples the problem again
    and appends all of them: every sample still counts exactly once."""
    _, full = run(toy, tmp_path / "full")
    shard = (tmp_path / "full" / "generations.rank0.jsonl").read_text().splitlines()
    (tmp_path / "partial").mkdir()
    shutil.copy(tmp_path / "full" / "settings.json", tmp_path / "partial")  # written first by the killed run
    (tmp_path / "partial" / "generations.rank0.jsonl").write_text("\n".join(shard[:3 * 2 + 2]) + "\n")  # 2 + 2/3
    _, records = run(toy, tmp_path / "partial")
    assert records == full


def test_a_torn_last_line_is_dropped_and_reported_once(toy, tmp_path, capsys):
    """A run killed in the middle of writing a line leaves it torn: the rerun drops it (saying so once) and
    appends after the whole lines, samples that problem again and reports every sample exactly once."""
    _, full = run(toy, tmp_path / "full")
    shard = (tmp_path / "full" / "generations.rank0.jsonl").read_text().splitlines()
    (tmp_path / "torn").mkdir()
    shutil.copy(tmp_path / "full" / "settings.json", tmp_path / "torn")
    (tmp_path / "torn" / "generations.rank0.jsonl").write_text("\n".join(shard[:6]) + "\n" + shard[6][:40])
    capsys.readouterr()
    _, records = run(toy, tmp_path / "torn")
    assert records == full
    assert capsys.readouterr().out.count("torn last line") == 1
    lines = (tmp_path / "torn" / "generations.rank0.jsonl").read_text().splitlines()
    assert lines[:6] == shard[:6] and all(json.loads(line) for line in lines)


def finish_late(rank, toy, out, init):
    """A rank of a 2-rank gloo group whose collectives time out after 2 seconds; rank 1 samples 5 seconds
    longer than rank 0."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        real = S.Sampler.stream
        S.Sampler.stream = lambda *a, **k: time.sleep(5) or real(*a, **k)
    args = E.parse_args(["--model", str(toy / "model"), "--benchmarks", str(toy / "toy" / "test.jsonl"),
                         "--out", str(out), "--samples", "2", "--max-new-tokens", "4", "--prompt", "{problem}"])
    try:
        E.evaluate(args, rank, 2, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_ranks_finishing_past_the_collective_timeout_still_finish(toy, tmp_path):
    """Under torchrun, ranks end their sampling hours apart while the default group's collectives time out
    after 30 minutes: here 5 seconds apart, with a 2-second timeout, and the run still ends with a report."""
    mp.spawn(finish_late, args=(toy, tmp_path / "out", f"file://{tmp_path / 'rendezvous'}"), nprocs=2)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["benchmarks"]["test"]["problems"] == 8


def test_bad_benchmark_and_settings_are_refused(toy, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1"}\n')
    with pytest.raises(SystemExit, match="needs `problem` and `answer`"):
        E.main(["--model", str(toy / "model"), "--benchmarks", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not a bundled benchmark"):
        E.main(["--model", str(toy / "model"), "--benchmarks", "math5000", "--out", str(tmp_path / "o")])
    run(toy, tmp_path / "o2")
    with pytest.raises(SystemExit, match="other settings"):
        run(toy, tmp_path / "o2", "--temperature", "1.0")


def test_refuses_a_directory_it_did_not_write(toy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("generations.jsonl", "results.json"):
        (mine / name).write_text("precious\n")
    with pytest.raises(SystemExit, match=r"mine: exists and is not a directory we wrote \(no settings.json\).*--out"):
        run(toy, mine)
    assert all((mine / name).read_text() == "precious\n" for name in ("generations.jsonl", "results.json"))


def test_new_weights_at_the_same_path_are_not_reported_with_old_generations(toy, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy / "model", model)
    E.main(["--model", str(model), "--benchmarks", str(toy / "toy" / "test.jsonl"), "--out", str(tmp_path / "o"),
            "--samples", "2", "--max-new-tokens", "4", "--prompt", "{problem}"])
    M.save_pretrained(M.build_model(M.Qwen2Config.from_pretrained(model), seed=1), tmp_path / "new",
                      tokenizer_from=model)
    shutil.rmtree(model)
    (tmp_path / "new").rename(model)
    with pytest.raises(SystemExit, match=r"other settings \(weights; the checkpoint's weights are not the ones"):
        E.main(["--model", str(model), "--benchmarks", str(toy / "toy" / "test.jsonl"), "--out", str(tmp_path / "o"),
                "--samples", "2", "--max-new-tokens", "4", "--prompt", "{problem}"])


def test_an_empty_benchmark_is_refused_and_results_are_strict_json(toy, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="empty.jsonl: holds no problems"):
        E.main(["--model", str(toy / "model"), "--benchmarks", str(tmp_path / "empty.jsonl"), "--out",
                str(tmp_path / "out"), "--samples", "2"])
    assert not (tmp_path / "out").exists()
    results, _ = run(toy, tmp_path / "ok", "--limit", "2")
    json.loads((tmp_path / "ok" / "results.json").read_text(), parse_constant=lambda c: 1 / 0)  # no NaN, no Infinity


def test_the_eta_leaves_out_the_warm_up_and_settles_fast():
    """A first problem that takes 100 s (compilation), then one a second: the ETA is the pace after the first."""
    times = [100.0 + i for i in range(10)]
    assert E.eta_seconds(times[:2], 1000) is None  # too early to tell
    assert E.eta_seconds(times[:3], 1000) == pytest.approx(997.0)
    assert E.eta_seconds(times, 1000) == pytest.approx(990.0)
    assert E.eta_seconds(times + [200.0 + i for i in range(100)], 1000, window=10) == pytest.approx(890.0)
