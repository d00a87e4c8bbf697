"""train.py on a toy model, one CPU process and torchrun with 2 gloo ranks: stages, invariance of the update
to micro-batching and world size, exact resume, checkpoints, failure handling, activation checkpointing."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import data as D
import model as M
import train as T
from conftest import ROOT


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A prepared toy corpus and a randomly initialized toy base model (HF layout, with its tokenizer)."""
    d = tmp_path_factory.mktemp("train")
    D.toy_corpus(d / "toy", n_train=300, n_test=10, seed=1)
    D.prepare([d / "toy" / "raw"], d / "toy" / "model", d / "data", log=lambda *a: None)
    config = M.Qwen2Config.from_pretrained(d / "toy" / "model")
    M.save_pretrained(M.build_model(config, seed=0), d / "base", tokenizer_from=d / "toy" / "model")
    return d


def run(toy, out, *extra, stage="sft", model=None):
    argv = ["--stage", stage, "--model", str(model or toy / "base"), "--data", str(toy / "data"), "--out", str(out),
            "--batch-size", "8", "--max-len", "160", "--max-steps", "4", "--save-every", "0", "--log-every", "100",
            "--lr", "2e-3" if stage == "sft" else "1e-3", *extra]
    T.main(argv)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(path / "model.safetensors")


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="session")
def sft_model(toy):
    """A toy model after a short SFT, the starting point of the preference stages."""
    run(toy, toy / "sft", "--max-steps", "12", "--lr", "3e-3")
    return toy / "sft" / "final"


def test_sft_loss_falls(toy, tmp_path):
    log = run(toy, tmp_path / "run", "--max-steps", "8", "--lr", "3e-3")
    assert len(log) == 8 and log[-1]["loss"] < 0.8 * log[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "update_norm", "tokens_per_s", "peak_mem_gib", "eta_s"):
        assert key in log[0]
    assert log[0]["lr"] == 0.0 and log[0]["update_norm"] == 0.0  # warmup starts at lr 0, as in HF


def test_update_norm_from_adamw_state_equals_the_difference_of_the_weights():
    """T.adamw_update_sq rebuilds ||theta_t - theta_(t-1)||^2 from AdamW's state, without a copy of the weights;
    checked against the copy over steps with warmup, decay and weight decay, and a parameter without a gradient."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4), torch.nn.Linear(4, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for lr in [0.0, 5e-3, 1e-2, 2e-3, 3e-2]:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = net[1](net[0](torch.randn(8, 16))).square().mean()  # net[2] gets no gradient
        loss.backward()
        before = [p.detach().clone() for p in net.parameters()]
        opt.step()
        expected = sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(net.parameters(), before))
        got = T.adamw_update_sq(opt)
        opt.zero_grad(set_to_none=True)
        if lr == 0.0:
            assert got == 0.0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def fixed_margins(toy, model_dir, n=48):
    """Summed and length-normalized chosen-minus-rejected log-probs of the first n triplets."""
    model = M.load_pretrained(model_dir)
    data = D.TokenData(toy / "data", "pref")
    mb = D.Loader(data, batch_size=n, max_tokens=100000, max_len=160).collate(list(range(n)))
    with torch.no_grad():
        logps, lengths, _ = T.sequence_logps(model, mb)
    summed = logps[0::2] - logps[1::2]
    normalized = logps[0::2] / lengths[0::2] - logps[1::2] / lengths[1::2]
    return summed.mean().item(), normalized.mean().item()


@pytest.mark.parametrize("stage, extra", [("redi", []), ("redi", ["--alpha", "1"]), ("simpo", []),
                                          ("dpo", ["--beta", "0.1", "--lr", "3e-4"])])
def test_preference_stages_raise_the_margin(toy, tmp_path, sft_model, stage, extra):
    log = run(toy, tmp_path / "run", "--max-steps", "10", "--warmup-ratio", "0", *extra, stage=stage,
              model=sft_model)
    assert all(k in log[0] for k in ("logps_chosen", "logps_rejected", "margin", "accuracy"))
    before, after = fixed_margins(toy, sft_model), fixed_margins(toy, tmp_path / "run" / "final")
    # DPO's margin is in summed log-probs; the others' in per-token (length-normalized) log-probs. A toy pair
    # differs in a few of its ~50 tokens, so the per-token margin moves ~50x less than the summed one.
    if stage != "dpo":
        assert after[1] > before[1] and after[0] > before[0] + 0.2, (before, after)
    else:
        assert after[0] > before[0] + 0.02, (before, after)
        assert abs(log[0]["margin"]) < 1e-5  # the policy starts as the reference: zero implicit reward
        assert (tmp_path / "run" / "ref_logps.pt").is_file()


@pytest.mark.parametrize("stage", ["sft", "redi"])
def test_update_does_not_depend_on_micro_batching(toy, tmp_path, sft_model, stage):
    model = None if stage == "sft" else sft_model
    one = run(toy, tmp_path / "one", "--micro-tokens", "100000", stage=stage, model=model)
    many = run(toy, tmp_path / "many", "--micro-tokens", "170" if stage == "sft" else "320", stage=stage, model=model)
    for a, b in zip(one, many):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "many" / "final", atol=1e-5)
    data = D.TokenData(toy / "data", "sft" if stage == "sft" else "pref")
    loader = D.Loader(data, batch_size=8, max_tokens=170 if stage == "sft" else 320, max_len=160, seed=42)
    assert min(len(loader.plan(0, s)[0]) for s in range(4)) >= 4  # really several micro-batches per step


@pytest.mark.parametrize("stage", ["sft", "redi"])
def test_linear_stages_take_the_head_gradient_in_the_forward_with_the_same_bits(toy, tmp_path, sft_model, stage,
                                                                                monkeypatch):
    """SFT and REDI train through losses.token_logprobs_linear_loss; with the plain head and loss (as DPO and
    SimPO train) the weights come out the same, bit for bit."""
    model = None if stage == "sft" else sft_model
    calls = []
    real = T.losses.token_logprobs_linear_loss
    monkeypatch.setattr(T.losses, "token_logprobs_linear_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(toy, tmp_path / "linear", "--max-steps", "2", stage=stage, model=model)
    assert calls
    monkeypatch.setattr(T, "LINEAR", ())
    run(toy, tmp_path / "plain", "--max-steps", "2", stage=stage, model=model)
    assert_same_weights(tmp_path / "linear" / "final", tmp_path / "plain" / "final", atol=0)


def test_no_reshard_gathers_and_reduces_once_per_step_with_the_same_update(toy, tmp_path, monkeypatch):
    """--no-reshard with several micro-batches per step: FSDP2 gathers each group's parameters once and reduces
    its gradients once per step (by default: per micro-batch, the blocks' twice), and the run takes the default
    run's steps."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
    calls = {"gathers": 0, "reduces": 0}
    real_unshard, real_reduce = group.FSDPParamGroup._to_unsharded, group.foreach_reduce

    def to_unsharded(self):
        calls["gathers"] += not self.is_unsharded  # (one rank skips the collective, not the switch)
        return real_unshard(self)

    def reduce(*args, **kwargs):
        calls["reduces"] += 1
        return real_reduce(*args, **kwargs)
    monkeypatch.setattr(group.FSDPParamGroup, "_to_unsharded", to_unsharded)
    monkeypatch.setattr(group, "foreach_reduce", reduce)
    default = run(toy, tmp_path / "default", "--micro-tokens", "170")
    per_micro_batch = dict(calls)
    calls.update(gathers=0, reduces=0)
    once = run(toy, tmp_path / "once", "--micro-tokens", "170", "--no-reshard")
    blocks = M.Qwen2Config.from_pretrained(toy / "base").num_hidden_layers
    data = D.TokenData(toy / "data", "sft")
    loader = D.Loader(data, batch_size=8, max_tokens=170, max_len=160, seed=42)
    micro_batches = sum(len(loader.plan(0, s)[0]) for s in range(4))
    assert micro_batches >= 4 * 4  # several per step
    assert per_micro_batch == {"gathers": micro_batches * (2 * blocks + 1), "reduces": micro_batches * (blocks + 1)}
    assert calls == {"gathers": 4 * (blocks + 1), "reduces": 4 * (blocks + 1)}
    for a, b in zip(default, once):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same_weights(tmp_path / "default" / "final", tmp_path / "once" / "final", atol=1e-5)


def torchrun(toy, out, *extra, stage="sft", model=None, nproc=2):
    argv = ["--stage", stage, "--model", str(model or toy / "base"), "--data", str(toy / "data"), "--out", str(out),
            "--batch-size", "8", "--max-len", "160", "--max-steps", "4", "--save-every", "0",
            "--lr", "2e-3" if stage == "sft" else "1e-3", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # its own process group, so a timeout kills the workers too instead of leaving them waiting forever
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage, extra", [("sft", []), ("redi", []),
                                          ("sft", ["--no-reshard", "--micro-tokens", "170"])])
def test_update_does_not_depend_on_world_size(toy, tmp_path, sft_model, stage, extra):
    """One rank against two (gloo); the last case with several micro-batches per step and --no-reshard on two
    ranks, whose gradients are then reduced across ranks once per step."""
    model = None if stage == "sft" else sft_model
    one = run(toy, tmp_path / "one", stage=stage, model=model)
    two = torchrun(toy, tmp_path / "two", *extra, stage=stage, model=model)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=1e-5)


def test_exact_resume(toy, tmp_path):
    full = run(toy, tmp_path / "full", "--max-steps", "6")
    run(toy, tmp_path / "split", "--max-steps", "6", "--stop-at", "3")
    assert not (tmp_path / "split" / "final").exists() and (tmp_path / "split" / "step-000003").is_dir()
    resumed = run(toy, tmp_path / "split", "--max-steps", "6", "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # the log continues without duplicates
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert_same_weights(tmp_path / "full" / "final", tmp_path / "split" / "final", atol=0)


def test_resume_after_a_kill_during_a_checkpoint_write(toy, tmp_path):
    """The process dies inside the second checkpoint's write: that checkpoint never looks complete, --resume
    continues from the first, and the run still ends with the uninterrupted run's weights."""
    argv = ["--stage", "sft", "--model", str(toy / "base"), "--data", str(toy / "data"), "--batch-size", "8",
            "--max-len", "160", "--max-steps", "6", "--save-every", "2", "--lr", "2e-3"]
    run(toy, tmp_path / "full", "--max-steps", "6", "--save-every", "2")
    killer = ("import os, sys, train\n"
              "orig, calls = train.dcp.save, []\n"
              "def dying(*a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os._exit(9)\n"
              "    return orig(*a, **k)\n"
              "train.dcp.save = dying\n"
              "train.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", killer, *argv, "--out", str(tmp_path / "killed")], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 9
    assert [p.name for p in T.complete_checkpoints(tmp_path / "killed")] == ["step-000002"]
    assert (tmp_path / "killed" / ".step-000004.tmp").is_dir()  # the partial write, not mistaken for a checkpoint
    T.main([*argv, "--out", str(tmp_path / "killed"), "--resume"])
    assert_same_weights(tmp_path / "full" / "final", tmp_path / "killed" / "final", atol=0)
    assert not (tmp_path / "killed" / ".step-000004.tmp").exists()


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_where_to_resume(toy, tmp_path, monkeypatch):
    """The disk fills during the second checkpoint's write (the error as torch's checkpoint writer raises it):
    the run ends naming the checkpoint to resume from, the partial write is gone, and --resume then finishes."""
    import torch.distributed.checkpoint.filesystem as fs
    real_write, real_save, saves = fs._write_item, T.dcp.save, []

    def full_disk(*args, **kwargs):
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_write(*args, **kwargs)

    def counted(*args, **kwargs):
        saves.append(1)
        return real_save(*args, **kwargs)
    monkeypatch.setattr(fs, "_write_item", full_disk)
    monkeypatch.setattr(T.dcp, "save", counted)
    with pytest.raises(SystemExit, match=r"could not write the checkpoint of step 4 \(\[Errno 28\] No space left on "
                                         r"device\); its partial copy is removed. The last complete checkpoint is "
                                         r"\S+step-000002 \(--resume continues from it\)"):
        run(toy, tmp_path / "run", "--max-steps", "6", "--save-every", "2")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["RUN", "metrics.jsonl", "step-000002"]
    monkeypatch.setattr(fs, "_write_item", real_write)
    log = run(toy, tmp_path / "run", "--max-steps", "6", "--save-every", "2", "--resume")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and (tmp_path / "run" / "final").is_dir()


def test_checkpoints_load_in_our_loader_and_transformers(toy, tmp_path):
    run(toy, tmp_path / "run", "--max-steps", "4", "--save-every", "2", "--keep-state", "1")
    ckpts = T.complete_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    assert not (ckpts[0] / "state").exists() and (ckpts[1] / "state").is_dir()  # older state pruned
    assert json.loads((ckpts[1] / "args.json").read_text())["lr"] == 2e-3
    ours = M.load_pretrained(ckpts[1] / "model")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpts[1] / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert (ckpts[1] / "model" / "tokenizer.json").is_file()
    assert_same_weights(ckpts[1] / "model", tmp_path / "run" / "final", atol=0)


def test_refuses_to_overwrite_or_resume_with_other_arguments(toy, tmp_path):
    run(toy, tmp_path / "run", "--max-steps", "2", "--save-every", "1")
    with pytest.raises(SystemExit, match="already holds checkpoints; pass --resume"):
        run(toy, tmp_path / "run", "--max-steps", "2")
    with pytest.raises(SystemExit, match=r"different lr \(lr=0.002\)"):
        run(toy, tmp_path / "run", "--max-steps", "2", "--resume", "--lr", "1e-3")


def scale_sft_loss(monkeypatch, from_step: int, factor: float) -> None:
    """train.py's SFT loss times `factor` from 0-based step `from_step` on, however often a step evaluates it."""
    real, real_lr_at = T.losses.sft_loss, T.lr_at
    steps = []

    def lr_at(step, total, args):  # called once at the start of each step
        steps.append(step)
        return real_lr_at(step, total, args)

    monkeypatch.setattr(T, "lr_at", lr_at)
    monkeypatch.setattr(T.losses, "sft_loss",
                        lambda logps, n_tokens: real(logps, n_tokens) * (factor if steps[-1] >= from_step else 1.0))


def test_non_finite_loss_stops_before_the_step(toy, tmp_path, monkeypatch):
    scale_sft_loss(monkeypatch, from_step=3, factor=float("nan"))
    with pytest.raises(SystemExit, match=r"diverged at step 4: non-finite loss \(nan\); stopped before the optimizer "
                                         r"step. Its weights came from diverged-step-000003 .* The last healthy "
                                         r"checkpoint is \S+step-000002 \(--resume continues from it\)"):
        run(toy, tmp_path / "run", "--max-steps", "6", "--save-every", "1", "--micro-tokens", "100000",
            "--keep-state", "2")
    assert [c.name for c in T.complete_checkpoints(tmp_path / "run")] == ["step-000001", "step-000002"]
    assert (tmp_path / "run" / "diverged-step-000003" / "model").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the error's step 4 is the step after the log's last line


def test_divergence_is_stopped_before_its_checkpoint_is_saved(toy, tmp_path):
    """--lr 1e10: step 1 runs at lr 0 (warmup), step 2's update blows the weights up while they stay finite."""
    with pytest.raises(SystemExit, match=r"diverged at step 2: the update norm .* exceeds the norm of the weights "
                                         r".* The last healthy checkpoint is \S+step-000001 \(--resume continues"):
        run(toy, tmp_path / "run", "--lr", "1e10", "--warmup-ratio", "0.25", "--save-every", "1")
    assert [c.name for c in T.complete_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert not (tmp_path / "run" / "final").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[-1]["update_norm"] > 1e6


def test_an_exploding_loss_stops_the_run(toy, tmp_path, monkeypatch):
    scale_sft_loss(monkeypatch, from_step=2, factor=1e6)
    with pytest.raises(SystemExit, match=r"diverged at step 3: the loss exploded to .* Its weights came from "
                                         r"diverged-step-000002 .* last healthy checkpoint is \S+step-000001 \(its "
                                         r"model/; its resumable state was pruned"):
        run(toy, tmp_path / "run", "--save-every", "1", "--micro-tokens", "100000")
    assert [c.name for c in T.complete_checkpoints(tmp_path / "run")] == ["step-000001"]


def test_refuses_a_directory_it_did_not_write(toy, tmp_path):
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("precious")
    (out / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(SystemExit, match=r"mine: exists and is not a directory we wrote \(no RUN\).*another --out"):
        run(toy, out)
    assert (out / "final" / "notes.txt").read_text() == "precious"
    assert (out / "metrics.jsonl").read_text() == '{"loss": 1}\n'
    run(toy, tmp_path / "ours", "--max-steps", "1")
    assert (tmp_path / "ours" / T.RUN_MARKER).is_file()
    run(toy, tmp_path / "ours", "--max-steps", "1", "--resume")  # its own run: continued (here, already done)


def test_ctrl_c_ends_with_one_line_and_resumes(toy, tmp_path, monkeypatch, capsys):
    real, saves = T.save_checkpoint, []

    def interrupted_after_the_second(*a, **k):
        path = real(*a, **k)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(T, "save_checkpoint", interrupted_after_the_second)
    with pytest.raises(SystemExit) as e:
        run(toy, tmp_path / "run", "--save-every", "1")
    assert e.value.code == 130
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"interrupted after step 2; the newest checkpoint is {tmp_path / 'run' / 'step-000002'}: "
                    f"rerun the same command with --resume to continue from it")
    monkeypatch.setattr(T, "save_checkpoint", real)
    assert [r["step"] for r in run(toy, tmp_path / "run", "--save-every", "1", "--resume")] == [1, 2, 3, 4]


def test_bad_inputs_get_clear_errors(toy, tmp_path, tmp_path_factory):
    with pytest.raises(SystemExit, match="not a complete prepared directory"):
        T.main(["--stage", "sft", "--model", str(toy / "base"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"nowhere: not a checkpoint directory \(no such path\)"):
        run(toy, tmp_path / "o", model=tmp_path / "nowhere")  # said first, before the tokenizer and data checks
    with pytest.raises(SystemExit, match=r"data: not a checkpoint directory \(no config.json in it\)"):
        run(toy, tmp_path / "o", model=toy / "data")
    other = tmp_path_factory.mktemp("other")
    D.toy_corpus(other, n_train=20, n_test=2, seed=9)  # a different tokenizer
    M.save_pretrained(M.build_model(M.Qwen2Config.from_pretrained(other / "model")), other / "base",
                      tokenizer_from=other / "model")
    with pytest.raises(SystemExit, match="is not the tokenizer this data was prepared with"):
        run(toy, tmp_path / "o2", model=other / "base")
    with pytest.raises(SystemExit, match="exceeds the model's max_position_embeddings 1024"):
        run(toy, tmp_path / "o3", "--max-len", "2048")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]  # no failed run left its --out behind


def test_stage_defaults_are_the_papers():
    base = ["--model", "m", "--data", "d", "--out", "o"]
    sft = T.parse_args(["--stage", "sft", *base])
    assert (sft.lr, sft.batch_size, sft.epochs, sft.max_len, sft.betas, sft.eps, sft.weight_decay,
            sft.warmup_ratio) == (5e-5, 128, 5, 32768, (0.9, 0.999), 1e-8, 1e-4, 0.1)
    redi = T.parse_args(["--stage", "redi", *base])
    assert (redi.lr, redi.alpha, redi.batch_size, redi.epochs, redi.max_len) == (1e-6, 0.8, 32, 1, 19800)
    assert T.parse_args(["--stage", "redi", "--alpha", "1", *base]).lr == 2e-7  # symmetric REDI's best LR
    assert T.parse_args(["--stage", "redi", "--alpha", "1", "--lr", "1e-6", *base]).lr == 1e-6
    dpo = T.parse_args(["--stage", "dpo", *base])
    assert (dpo.lr, dpo.beta) == (2e-7, 0.001)
    simpo = T.parse_args(["--stage", "simpo", *base])
    assert (simpo.lr, simpo.beta, simpo.gamma) == (5e-7, 2.0, 1.0)


def test_lr_schedule_is_huggingface_linear_with_warmup():
    args = T.parse_args(["--stage", "sft", "--model", "m", "--data", "d", "--out", "o", "--lr", "1.0"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    total = 37
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=total)
    for step in range(total):
        assert T.lr_at(step, total, args) == pytest.approx(sched.get_last_lr()[0])
        opt.step()
        sched.step()


def test_flops_formula():
    config = M.Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, tie_word_embeddings=False)
    n = M.build_model(config, device="meta").num_parameters()
    # 6N (without the input embedding) + 12 L d T per token, T the token's own document
    expected = 10 * (6 * (n - 6400) + 12 * 2 * 64 * 10) + 3 * (6 * (n - 6400) + 12 * 2 * 64 * 3)
    assert T.flops(config, n, [10, 3]) == expected


KEPT_BY_FORWARD = """
import ctypes, os, sys, torch
import model as M, train as T

def rss():
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory goes back: what stays resident is alive
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

config = M.Qwen2Config(vocab_size=50, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2)
model = M.build_model(config, seed=0)
if sys.argv[1] != "none":
    T.checkpoint_activations(model, sys.argv[1])
ids = torch.randint(0, 50, (1, 4096))
base = rss()
hidden = model(ids, return_hidden=True)
print(rss() - base)
"""


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    """Every scope of --ac-scope: a second forward of the matmuls with "block" and "mlp" but not with "ops"
    (it keeps their outputs), and bitwise the gradients of the plain model."""
    config = M.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 50, (2, 24))

    def step(scope):
        model = M.build_model(config, seed=0)
        if scope is not None:
            T.checkpoint_activations(model, scope)
        with FlopCounterMode(display=False) as counter:
            model(ids).logsumexp(-1).sum().backward()
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
        return counter.get_total_flops(), grads

    flops_plain, grads_plain = step(None)
    flops_block, grads_block = step("block")
    flops_mlp, grads_mlp = step("mlp")
    flops_ops, grads_ops = step("ops")
    assert flops_block > flops_mlp > flops_plain == flops_ops  # the blocks' (the MLPs') matmuls run again
    for grads in (grads_block, grads_mlp, grads_ops):
        assert grads.keys() == grads_plain.keys()
        for name in grads_plain:
            torch.testing.assert_close(grads[name], grads_plain[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="unknown activation checkpointing scope"):
        T.checkpoint_activations(M.build_model(config, seed=0), "attention")


@pytest.mark.skipif(sys.platform != "linux", reason="reads resident memory from /proc, returns it with glibc")
def test_activation_checkpointing_keeps_less_memory():
    """The memory a forward keeps for backward: least with "block", then "mlp", then "ops" (with the MLP 4x
    the hidden size), all less than without checkpointing."""
    def kept(scope):  # resident memory the forward adds, in a fresh process
        proc = subprocess.run([sys.executable, "-c", KEPT_BY_FORWARD, scope], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert kept("block") < kept("mlp") < kept("ops") < kept("none")


@pytest.mark.parametrize("scope", ["block", "mlp", "ops"])
def test_training_with_activation_checkpointing_ends_with_the_same_weights(toy, tmp_path, scope, capsys):
    """train.py --ac-scope: the same final checkpoint, with Hugging Face's keys, as without activation
    checkpointing: bitwise for "block" and "mlp"; for "ops", which needs --compile (compiled kernels round
    differently), the same losses to 1e-4."""
    plain = run(toy, tmp_path / "plain", "--max-steps", "2")
    capsys.readouterr()
    compile = ["--compile"] if scope == "ops" else []
    log = run(toy, tmp_path / "ac", "--max-steps", "2", "--ac-scope", scope, *compile)  # implies --ac on CPU
    out = capsys.readouterr().out
    assert f"activation checkpointing {scope}" in out
    assert ("compiling the decoder blocks during the first step" in out) == (scope == "ops")
    if scope == "ops":
        assert weights(tmp_path / "plain" / "final").keys() == weights(tmp_path / "ac" / "final").keys()
        assert [x["loss"] for x in log] == pytest.approx([x["loss"] for x in plain], rel=1e-4)
    else:
        assert_same_weights(tmp_path / "plain" / "final", tmp_path / "ac" / "final", atol=0)
    with pytest.raises(SystemExit):
        T.parse_args(["--stage", "sft", "--model", "m", "--data", "d", "--out", "o", "--no-ac", "--ac-scope", scope])
    assert "--no-ac contradicts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.parse_args(["--stage", "sft", "--model", "m", "--data", "d", "--out", "o", "--ac-scope", "ops"])
    assert "--ac-scope ops needs --compile" in capsys.readouterr().err


def test_per_document_attention_trains_as_the_document_mask_does(toy, tmp_path, monkeypatch):
    """--attention per-document (model.doc_attention, one call per document) gives the document-mask path's
    losses and gradient norms, eager and compiled with selective checkpointing (the op is opaque to
    torch.compile, and its output is among what --ac-scope ops keeps)."""
    mask = run(toy, tmp_path / "mask", "--max-steps", "3")
    calls = []
    per_doc = M._causal_with_lse
    monkeypatch.setattr(M, "_causal_with_lse", lambda *a: calls.append(1) or per_doc(*a))
    for name, extra in (("eager", []), ("compiled", ["--compile", "--ac-scope", "ops"])):
        calls.clear()
        log = run(toy, tmp_path / name, "--max-steps", "3", "--attention", "per-document", *extra)
        assert calls, name  # the documents went through doc_attention
        for key in ("loss", "grad_norm"):
            assert [x[key] for x in log] == pytest.approx([x[key] for x in mask], rel=1e-4), (name, key)


def test_a_compile_failure_names_the_way_around_it(toy, tmp_path, monkeypatch):
    """torch.compile failing inside a step ends the run with an error that names the flags around it."""
    def failing(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("inductor could not compile")
    monkeypatch.setattr(T, "sequence_logps", failing)
    with pytest.raises(SystemExit, match="torch.compile failed at step 1 .*without --compile, or with --eager-head"):
        run(toy, tmp_path / "o")
    monkeypatch.undo()
    assert len(run(toy, tmp_path / "eager", "--eager-head", "--max-steps", "1")) == 1
