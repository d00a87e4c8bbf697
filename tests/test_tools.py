"""The small command-line tools: model.py init, plot.py and demo.py."""

import builtins
import shlex
import json

import pytest

import model as M
import plot


def test_model_init_writes_a_loadable_random_checkpoint(tmp_path):
    config = M.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "cfg" / "tokenizer.json").write_text("{}")
    M.main(["init", "--config", str(tmp_path / "cfg"), "--out", str(tmp_path / "base"), "--seed", "3"])
    model = M.load_pretrained(tmp_path / "base")
    assert model.num_parameters() == M.build_model(config, device="meta").num_parameters()
    assert model.model.norm.weight.abs().sum() > 0 and model.lm_head.weight.std() > 0.01  # initialized
    assert (tmp_path / "base" / "tokenizer.json").read_text() == "{}"
    with pytest.raises(SystemExit, match=r"nowhere: not a checkpoint directory \(no such path\)"):
        M.main(["init", "--config", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])


def write_run(path, steps, with_eval):
    path.mkdir(parents=True)
    records = [{"step": s, "update_norm": 0.1 / s, "logps_chosen": -0.1 * s, "logps_rejected": -0.2 * s, "loss": 1.0}
               for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if with_eval:
        for s in (2, 4):
            (path / f"step-{s:06d}" / "eval").mkdir(parents=True)
            (path / f"step-{s:06d}" / "eval" / "results.json").write_text(json.dumps({"average": {"pass@1": s / 10}}))


def test_plot_reads_runs_and_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", 5, with_eval=True)
    write_run(tmp_path / "b", 4, with_eval=False)
    run = plot.read_run(tmp_path / "a")
    assert run["acc_step"] == [2, 4] and run["acc"] == pytest.approx([20.0, 40.0]) and len(run["step"]) == 5
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    write_run(tmp_path / "a", 3, with_eval=False)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "fig.png")])


def test_plot_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="not a train.py run directory"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "fig.png")])


def test_plot_overwrites_only_its_own_figures(tmp_path):
    write_run(tmp_path / "a", 3, with_eval=False)
    (tmp_path / "mine.png").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="mine.png: exists and is not a figure plot.py wrote.*another --out"):
        plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "mine.png")])
    assert (tmp_path / "mine.png").read_bytes() == b"precious"
    pytest.importorskip("matplotlib")
    plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "fig.png")])
    plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "fig.png")])  # its own figure: redrawn


def demo_args(**kw):
    import demo
    p = {"n_train": 300, "n_test": 20, "sft_epochs": 1, "steps2": 4, "save_every2": 2, "seed": 0, "lr2": 1e-4,
         "samples": 4}
    return demo.argparse.Namespace(**{**p, **kw})


def test_demo_refuses_a_foreign_directory_and_resumes_after_ctrl_c(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the SFT stage ends with one line; the rerun skips the finished stages and resumes training,
    and runs the three stage-2 trainings side by side; a rerun with other settings is refused."""
    import demo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="mine: exists and is not an earlier demo.*another --out"):
        demo.main(["--out", str(tmp_path / "mine")])

    out = tmp_path / "demo"
    outputs = {shlex.join(cmd): done for _, done, cmd, _ in demo.stages(out, demo_args(n_train=6000, n_test=200,
                                                                                       sft_epochs=7, steps2=60,
                                                                                       save_every2=20, lr2=3e-4))}
    ran = []

    def finish(cmd):
        done = outputs[shlex.join(cmd)]
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"benchmarks": {"test": {"pass@1": 0.5, "sem": 0.1, "pass@4": 0.75,
                                                            "changed_by_grading": 0}}}))
        if cmd[:3] == ["train.py", "--stage", "redi"]:
            (done.parent / "metrics.jsonl").write_text("".join(
                json.dumps({"logps_chosen": -0.1 * i, "logps_rejected": -0.2 * i}) + "\n" for i in range(8)))

    def fake_run(*cmd):
        if "sft" in cmd and not ran[-1:] == ["interrupted"]:
            ran.append("interrupted")
            raise KeyboardInterrupt
        ran.append(shlex.join(cmd))
        finish(list(cmd))

    def fake_run_together(cmds, logs):
        ran.append([shlex.join(c) for c in cmds])
        for cmd in cmds:
            finish(cmd)

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo, "run_together", fake_run_together)
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)  # no figure
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(out)])
    assert e.value.code == 130 and len(ran) == 4  # toy, prepare, init, then Ctrl-C in SFT
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("interrupted during the SFT stage")
    demo.main(["--out", str(out)])
    rerun = ran[4:]
    assert rerun[0].startswith("train.py --stage sft") and "--resume" in rerun[0] and len(rerun) == 6
    assert [c.split(" --model")[0] for c in rerun[1]] == [f"train.py --stage redi --alpha {a}" for a in (0.0, 0.8, 1.0)]
    assert all(c.startswith("evaluate.py") for c in rerun[2:])
    printed = capsys.readouterr().out
    assert "toy corpus: done in an earlier run" in printed and "pip install matplotlib" in printed
    # continued with another stage-2 rate, the finished stages would report their old results as the new ones
    with pytest.raises(SystemExit, match=r"made with --lr2 0.0003 \(now 0.0005\).*--fresh"):
        demo.main(["--out", str(out), "--lr2", "5e-4"])
    assert len(ran) == 10  # nothing ran


def test_demo_pipeline_end_to_end_on_a_smaller_setting(tmp_path, capsys):
    """The demo itself, through the real tools in subprocesses, on a tiny corpus: every stage runs and the
    table has the SFT row and the three stage-2 rows with their LogPS changes and verdicts."""
    import demo

    demo.main(["--out", str(tmp_path / "demo"), "--n-train", "300", "--n-test", "20", "--sft-epochs", "1",
               "--steps2", "4", "--save-every2", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| SFT") or line.startswith("| + stage 2")]
    assert len(rows) == 4 and rows[0].endswith("| the starting point |")
    assert rows[1].endswith("| control |") and all("±" in r for r in rows)
    for row in rows[2:]:
        assert row.split(" | ")[-1].rstrip(" |").split(" (")[0] in (
            "stable", "accuracy holds, chosen LogPS falling", "degraded", "collapsed")
    for name in ("control", "redi", "symmetric"):
        assert (tmp_path / "demo" / name / "final" / "model.safetensors").is_file()
    import importlib.util
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "demo" / "dynamics.png").is_file()
    else:
        assert "pip install matplotlib" in lines[-1]


def test_demo_verdicts():
    import demo
    assert demo.verdict(90.0, 93.0, -0.01) == "stable"
    assert demo.verdict(90.0, 93.0, -0.05) == "accuracy holds, chosen LogPS falling"
    assert demo.verdict(95.0, 93.0, -0.05) == "accuracy holds, chosen LogPS falling"
    assert demo.verdict(80.0, 93.0, 0.0) == "degraded (-13.0 points)"
    assert demo.verdict(40.0, 93.0, -0.3) == "collapsed"


def test_every_run_has_its_label_and_one_colour(tmp_path, monkeypatch):
    """Runs without an eval/ folder are in the legend too, each in one colour across the panels (a stand-in
    pyplot records the calls, so this runs without matplotlib)."""
    import sys
    import types
    calls = []

    class Axis:
        def __init__(self, index):
            self.index = index

        def plot(self, xs, ys, **kw):
            calls.append(("plot", self.index, kw["label"], kw.get("color")))

        def legend(self):
            calls.append(("legend", self.index, None, None))

        def __getattr__(self, name):
            return lambda *a, **k: None

    class Figure:
        def __getattr__(self, name):
            return lambda *a, **k: None

    pyplot = types.SimpleNamespace(subplots=lambda *a, **k: (Figure(), [Axis(i) for i in range(4)]))
    matplotlib = types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    write_run(tmp_path / "a", 5, with_eval=True)
    write_run(tmp_path / "b", 4, with_eval=False)
    write_run(tmp_path / "c", 4, with_eval=True)
    plot.main([str(tmp_path / r) for r in "abc"] + ["--out", str(tmp_path / "fig.png")])
    [(_, legend_axis, _, _)] = [c for c in calls if c[0] == "legend"]
    assert [c[2] for c in calls if c[0] == "plot" and c[1] == legend_axis] == ["a", "b", "c"]
    colours = {(c[2], c[3]) for c in calls if c[0] == "plot"}
    assert len(colours) == 3 and len({colour for _, colour in colours}) == 3
