"""What of the GPU code paths can run on a CPU: the compiled flex_attention document mask, FSDP2's mixed
precision keeping RoPE in fp32, the NCCL group's device, and the one prepared device check (bench/gpu.py) on a
tiny config."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import model as M
import train as T
from conftest import ROOT


def test_compiled_flex_document_mask_matches_the_dense_reference():
    """Packed documents of ragged lengths (none a multiple of 128, one shorter than a block) through the
    compiled flex_attention and the BlockMask that training builds on GPU, against the CPU path (documents
    gathered into one causal SDPA), itself checked against transformers in test_model.py."""
    torch.manual_seed(0)
    lengths = [5, 200, 131, 77, 300]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 713)
    T_ = pos.shape[1]
    q, k, v = torch.randn(1, 4, T_, 16), torch.randn(1, 2, T_, 16), torch.randn(1, 2, T_, 16)
    flex = M.build_mask(pos, None, use_flex=True)
    assert flex.block is not None
    got = M._compiled_flex_attention()(q, k, v, block_mask=flex.block, enable_gqa=True)
    want = M.attend(q, k, v, M.build_mask(pos, None, use_flex=False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_nccl_group_is_bound_to_the_rank_device(monkeypatch):
    """On GPU, torchrun's process group is bound to LOCAL_RANK's device: unbound, NCCL guesses a collective's
    device from the global rank (rank 11 of two 8-GPU nodes is not device 11). CUDA and the group stubbed."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("current", device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.setdefault("group", (backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 11)
    monkeypatch.setattr(dist, "get_world_size", lambda: 16)
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert T.setup_distributed() == (11, 16, torch.device("cuda", 3))
    assert seen["current"] == torch.device("cuda", 3)
    assert seen["group"][0] == "nccl" and seen["group"][1]["device_id"] == torch.device("cuda", 3)


def test_decode_attention_compiles_every_batch_bucket(monkeypatch):
    """The sampler's decode attention compiles once per batch-size bucket (static shapes): 9 buckets for 256
    slots, one more than dynamo's default limit of 8 compiles per function, past which a bucket would run
    uncompiled. With the limit lowered to 2, three batch sizes through model._decode_attention still make
    three compiled frames (called bare, the third is skipped), each equal to the eager path on the sampler's own
    page-table block mask (the CUDA-only SM count stubbed)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import sample as S
    config = M.Qwen2Config(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=6, num_key_value_heads=2)
    cache = S.PagedKVCache(config, n_blocks=12, block_size=16, device="cpu", dtype=torch.float32, in_place=True)
    g = torch.Generator().manual_seed(0)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.decode_buffers(4)
    cache.set_pages([[3, 5, 1], [2], [7, 4, 6, 8], [9, 10]])
    lengths = torch.tensor([40, 9, 64, 17])
    monkeypatch.setattr(M, "_sm_count", lambda device: 132)

    def graphs(fn):
        torch._dynamo.reset()
        before = counters["frames"]["ok"]
        for B in (1, 2, 4):
            mask = cache._block_mask(lengths[:B])
            q = torch.randn(B, 6, 1, 16, generator=g)
            got = fn(q, cache.k[0][None], cache.v[0][None], mask)
            torch.testing.assert_close(got, M._flex_decode(q, cache.k[0][None], cache.v[0][None], mask),
                                       rtol=1e-5, atol=1e-5)
        return counters["frames"]["ok"] - before  # frames compiled (not skipped for the limit)
    with torch._dynamo.config.patch(recompile_limit=2):
        assert graphs(M._compiled_flex_decode()) == 2
        assert graphs(M._decode_attention) == 3
    assert M.decode_split_kv(16, 2, 132) == 17 and M.decode_split_kv(64, 2, 132) == M.MIN_SPLIT_KV == 16
    assert M.decode_split_kv(1, 2, 132) == 64 and M.decode_split_kv(1024, 8, 132) == 16
    assert M.decode_split_kv(64, 2, 132, least=1) == 5 and M.decode_split_kv(256, 2, 132, least=1) == 2
    assert M.decode_split_kv(0, 2, 132) == 64
    assert M.decode_kernel_options(8, 2, 132) == {"SPLIT_KV": 33, "num_warps": 4, "num_stages": 3}
    assert M.decode_kernel_options(256, 2, 132) == {"SPLIT_KV": 16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_per_document_attention_on_cudnn_matches_the_reference():
    """model.doc_attention on CUDA (cuDNN per document, padded to CUDNN_LENGTH_GRID) against the reference
    equations in fp32: bf16 outputs and gradients within a few bf16 roundings, with lengths off the grid."""
    lengths = [1, 130, 700, 257]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, 128, device="cuda", generator=g).bfloat16().requires_grad_()
               for h in (12, 2, 2))
    grad = torch.randn(sum(lengths), 12, 128, device="cuda", generator=g).bfloat16()
    out, _ = M.doc_attention(q, k, v, bounds)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        doc = [x[s:e].detach().float() for x in (q, k, v)]
        for a, b in zip(got, [M._causal_with_lse(*doc)[0], *M._causal_grads(grad[s:e].float(), *doc)]):
            assert float((a[s:e].float() - b).abs().max()) <= 4 * 2**-8 * float(b.abs().max()) + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_heads_weight_gradient_accumulates_in_fp32_on_cuda(monkeypatch):
    """losses.token_logprobs on CUDA adds each chunk's bf16 weight-gradient product into fp32 in one GEMM
    (addmm's out_dtype); it agrees with the bf16 product added separately, to that product's rounding."""
    import losses
    assert losses._addmm_into_fp32(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(5000, 256, device="cuda", generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 5000, (3000,), device="cuda", generator=g)
    fused = torch.autograd.grad(losses.token_logprobs(hidden, weight, targets, chunk=512).sum(), weight)[0]
    monkeypatch.setattr(losses, "_addmm_into_fp32", lambda device: False)
    split = torch.autograd.grad(losses.token_logprobs(hidden, weight, targets, chunk=512).sum(), weight)[0]
    torch.testing.assert_close(fused.float(), split.float(), rtol=2**-6, atol=1e-3)


def test_rope_stays_fp32_under_fsdp2_mixed_precision():
    """FSDP2 with bf16 parameters must not cast the fp32 RoPE cos/sin that each block receives (sampling
    computes RoPE in fp32 too), while the hidden states run in bf16."""
    config = M.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = M.build_model(config, seed=0)
    T.setup_distributed()
    try:
        T.parallelize(model, torch.device("cpu"), ac=None, compile=False, bf16=True)
        seen = []
        model.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1].dtype)))
        model(torch.randint(0, 64, (1, 12)), position_ids=torch.arange(12)[None], return_hidden=True)
    finally:
        dist.destroy_process_group()
    assert seen == [(torch.bfloat16, torch.float32)]


def test_the_device_check_times_the_document_mask_once_per_document_attention_fails(tmp_path, monkeypatch):
    """A lent GPU's call must not fail the same way three times: once a train run with --attention
    per-document fails, that run and the queued ones run on the document mask instead, and the profile
    section profiles the mask twin of its run."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu
    ran = []

    def fake_run(ctx, name, *spec):
        ran.append(name)
        if "-perdoc" in name:
            raise RuntimeError("cuDNN: no such graph")
        return {"tokens_per_s": 1.0}
    monkeypatch.setattr(gpu, "train_run", fake_run)
    ctx = gpu.Ctx(True, tmp_path, tmp_path / "gpu.json")
    ctx.train_runs = ("sft-compile-opsac-perdoc", "sft-compile-opsac-perdoc-noreshard",
                      "redi-compile-opsac-perdoc-noreshard", "sft-compile-opsac")
    r = gpu.section_train(ctx)
    assert ran == ["sft-compile-opsac-perdoc", "sft-compile-opsac", "sft-compile-opsac-noreshard",
                   "redi-compile-opsac"]
    assert "cuDNN" in r["sft-compile-opsac-perdoc"]["error"] and ctx.perdoc_failed
    assert all(r[name] == {"tokens_per_s": 1.0} for name in ran[1:])

    def profiled(ctx, name, *spec, profiler):
        raise RuntimeError(f"profiled {name}")
    monkeypatch.setattr(gpu, "train_run", profiled)
    ctx.profile_run = "sft-compile-opsac-perdoc-noreshard"
    with pytest.raises(RuntimeError, match="^profiled profile-sft-compile-opsac-noreshard$"):
        gpu.section_profile(ctx)


def test_the_device_check_runs_every_section_on_cpu(tmp_path):
    """bench/gpu.py --tiny: every section on a tiny config, so the script a GPU session runs first cannot rot.
    It works in a scratch directory of its own under --tmp and removes only that."""
    out = tmp_path / "gpu.json"
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "theirs").write_text("kept")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out),
                           "--tmp", str(tmp_path / "scratch"), "--resume-runs", "defaults,compiled"],
                          capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())["sections"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["theirs"]
    assert set(report) == {"env", "parity", "train", "resume", "attention", "profile", "decode", "sample", "anatomy",
                           "grade", "evaluate"}
    assert report["grade"]["as_labelled"] and report["grade"]["cases"] > 400
    assert all("error" not in r and "partial" not in r for r in report.values())
    assert report["parity"]["greedy"]["ok"] and report["parity"]["causal"]["ok"] and report["parity"]["packed"]["ok"]
    runs = [r for r in report["train"].values() if isinstance(r, dict) and "stage" in r]
    assert len(runs) == 13 and all(r["tokens_per_s"] > 0 for r in runs)
    compiled = [r for name, r in report["train"].items() if "compile" in name and isinstance(r, dict) and "stage" in r]
    assert len(compiled) == 10 and 1 in report["train"]["sft-compile"]["steps_that_compiled"]  # later runs reuse it
    per_document = report["attention"]["3 documents, doc_attention (train.py --attention per-document)"]
    assert per_document["ok"] and per_document["same_bits_twice"]
    # stopped after step 1 and resumed in a fresh process, eager and compiled: the straight run's bits (on CPU)
    assert list(report["resume"]) == ["defaults", "compiled", "section_s"]
    for resumed in (report["resume"]["defaults"], report["resume"]["compiled"]):
        assert resumed["same_bits"] and resumed["tensors"] == 26 and len(resumed["process_s"]) == 3
        assert resumed["losses_straight"] == resumed["losses_resumed"]
    perdoc_run = report["train"]["sft-compile-opsac-perdoc"]
    assert perdoc_run["cudnn_graphs_built_before_s"] > 0 and perdoc_run["document_calls"]["warm_up_calls"] > 0
    assert len(perdoc_run["document_calls"]["per_step"]) == len(perdoc_run["allocator_per_step"]) == perdoc_run["steps"]
    assert all(not set(r["steady_steps"]) & set(r["steps_that_compiled"]) for r in compiled)
    phases = report["profile"]["kernel_ms_by_phase"]  # (on CPU: operators' own time) the phases are found by name
    # the profiled run is SFT: its head takes the gradient in the forward (three matmuls per chunk), and its
    # backward only scales it
    assert phases["chunked head forward"] > phases["chunked head backward"] > 0
    assert phases["optimizer step"] > 0 and phases["FSDP2 hooks (parameter casts and gradient copies)"] > 0
    assert report["train"]["recipe_projection"]["sft_5_epochs_h"] > 0
    sample = report["sample"]
    assert all(sample[k]["ours_tok_s"] > 0 for k in sample if k.startswith("batch"))
    assert [sample[k]["compiled_layers"] for k in sample if k.startswith("batch 1,")] == [True, False]
    # the uncompiled batch-1 case decodes the compiled one's prompt: the same first token (both prefill alike)
    uncompiled = sample["batch 1, 64-token prompts, 16 new tokens, layers uncompiled"]
    assert 1 <= uncompiled["identical_tokens_with_compiled"] <= 17
    assert sample["long tail"]["tokens"] > 0 and sample["long tail"]["projected_h_8_gpus"] > 0
    # every case decoded all its rows at once (the KV pool holds them), as its name says
    assert [sample[k]["mean_rows"] for k in sample if k.startswith("batch")] == [1, 1, 8, 16]
    assert sample["long tail"]["mean_rows"] == 8 and sample["long tail"]["step_ms"] > 0
    anatomy = report["anatomy"]["step anatomy, batch 1, uncaptured"]
    assert anatomy["steps"] == 32 and anatomy["events_per_step"] > 0 and anatomy["top_per_step"]
    assert "note" not in anatomy and anatomy["captured_step_ms"] == sample["step_ms_by_batch"]["1"] > 0
    assert report["anatomy"]["step anatomy, batch 8, uncaptured"]["steps"] == 32
    ev = report["evaluate"]
    assert ev["generations"] == ev["expected_generations"] == 8 and ev["rerun_identical"]
    cases = [case for name, case in report["decode"].items()
             if isinstance(case, dict) and name not in ("gemms", "draw")]
    variants = [v for case in cases for v in case.values()]
    assert len(variants) == 5 + 5 + 5 and all(v["ok"] for v in variants)  # three cases, five launch options each
    assert all(sum(name.endswith("(the sampler's)") for name in case) == 1 for case in cases[:2])
    assert "ragged positions" in list(report["decode"])[-4]  # the last case: rows of the long tail's lengths
    gemms = report["decode"]["gemms"]
    assert list(gemms) == ["1 rows", "4 rows"] and all(len(g) == 7 for g in gemms.values())
    assert all(v["us"] > 0 for g in gemms.values() for v in g.values())
    assert list(report["decode"]["draw"]) == ["1 rows, peaked", "1 rows, flat", "4 rows, peaked", "4 rows, flat",
                                              "4 rows, flat, one histogram copy"]
    assert all(v["us"] > 0 for v in report["decode"]["draw"].values())
    assert all(sum("(the sampler's)" in name for name in case) == 1 for case in cases)
