"""The one prepared device check: what a session with a lent GPU runs first, before anything else.

    python bench/gpu.py --tiny --out /tmp/gpu-tiny.json             # every section on CPU, tiny config (CI)
    python bench/gpu.py --sections parity,train                      # a subset
    # on a lent GPU all of it is more than one 10-minute call. On an H100 (2026-11-27): attention (brief) 205 s,
    # train 135 s for three compiled per-document runs (the first compile 21 s, cuDNN graphs 10 s), profile
    # 21 s, sample 261 s, decode 73 s, parity greedy 16 s, grade 1 s; the 2026-11-26 sessions: the first
    # compile of --ac-scope ops 239-260 s, evaluate 24 s. The next session's two calls, the second at once (a
    # machine idle for 30 s is given back), each ordered by what its issue needs most (sections and runs go in
    # the order given, so a time limit cuts the last). Call 1: SFT per-document without resharding first, in a
    # fresh process, then with resharding (the 2026-11-27 order gave 29.4% then 46.5%, and `document_calls`
    # now says whether cuDNN graphs were built inside the steps), then REDI twice (its second run over the
    # same lengths: steady state), and REDI's step profiled. Call 2: the step anatomy (kernels per decode
    # step, the batch-1 breakdown), decode (MIN_SPLIT_KV at uniform lengths), sample (the long tail with it),
    # resume (cuDNN's backward gave different bits twice in the attention section):
    PYTHONUNBUFFERED=1 timeout 360 python bench/gpu.py --sections train,profile \
        --train-runs sft-compile-opsac-perdoc-noreshard,sft-compile-opsac-perdoc,redi-compile-opsac-perdoc-noreshard,redi-compile-opsac-perdoc-noreshard \
        --profile-run redi-compile-opsac-perdoc-noreshard --out $OUT/gpu1.json
    PYTHONUNBUFFERED=1 timeout 400 python bench/gpu.py --sections anatomy,decode,sample,resume \
        --resume-runs defaults,compiled-perdoc --out $OUT/gpu2.json
    # (call 1's first compile took 21 s on 2026-11-27 after the attention section had compiled flex_attention
    # in the same process; from cold it may take minutes, hence its 360 s. If a per-document run fails in call
    # 1, that run and the queued ones run on the document mask instead, and the profile section profiles the
    # mask twin of its run. Call 2's sections are estimated at ~480 s: anatomy ~40, decode ~80, sample ~275,
    # resume ~80; call 1 taking ~220 s would leave ~570 s, so give call 2's timeout the budget `status` shows
    # after call 1 less ~25 s. A device-side assert ends the process: the sections after it are lost, as
    # resume was on 2026-11-27)

Sections, each guarded (a failure is recorded and the next section runs) and each written to the JSON report
as soon as it ends (train and sample also after each run or case), so a run killed at its time limit still
leaves what it measured:
  env     torch/CUDA/cuDNN versions, the device, measured copy bandwidth and bf16 matmul rate, and which SDPA
          backend each of our attention shapes selects (training causal, prefill, decode);
  parity  bf16 logits against transformers (sdpa) on the Qwen2.5-Math-1.5B config with random weights, both
          measured against transformers in fp32: a plain causal batch, packed ragged documents (flex_attention)
          against per-document forwards, and greedy decoding (sample.py) against transformers' argmax;
  train   train.py's own code path (FSDP2 on one rank, bf16, activation checkpointing) for SFT and REDI on
          packed ragged 16k-token micro-batches and on one 32k-token sequence, with and without --compile
          (and compiled with no activation checkpointing, and with it on the MLPs only or on the elementwise
          work only, --ac-scope mlp and ops; the last also with --attention per-document and --no-reshard):
          first-step (compile/warm-up) time, every step's time and MFU (6N + 12 L d T), tokens/s and MFU pooled
          over the steps that compiled nothing, peak memory, the per-document calls new to the process in each
          step (DocumentCalls: where cuDNN may build graphs) and MFU over the steps without any, the caching
          allocator's cudaMalloc calls and retries per step and its peak reserved memory (a run listed
          twice in --train-runs runs twice, the second as name#2); and the chunked head alone at 16k and 32k tokens,
          with the backward's recompute (losses.token_logprobs) and with the gradient taken in the forward
          (token_logprobs_linear_loss, as SFT and REDI train) (with --train-runs, where it lists `head`);
  resume  train.py stopped after step 1 and resumed, each run a fresh process, against the same 3 steps run
          straight (2 blocks of the config; train.py's defaults, then compiled blocks, then per-document
          attention): are the final weights the same bits?
  attention  (--attention-brief: flex_attention and doc_attention only)
          forward+backward of attention alone at 16k training shapes, for each way of computing it (SDPA
          backends, flex_attention, one SDPA call per document, model.doc_attention as train.py --attention
          per-document runs it, checked against fp32 beside flex_attention's own error, and whether a second
          forward and backward gives the same bits; varlen_attn), and what a run of new lengths costs each
          backend;
  profile the kernels of one train.py step (--profile-run, after the train section it reuses the compiled code)
          by kind and by phase (compiled blocks forward and backward, chunked head, optimizer, FSDP2), and the
          share of the step's wall time the device was busy;
  decode  one layer's decode attention alone over a paged pool, for ways of launching flex_attention's
          decoding kernel (SPLIT_KV, pipelining, warps): microseconds (replayed from a CUDA graph, as the
          sampler runs it, and called from Python) and bandwidth share, at uniform lengths and at the long
          tail's ragged ones; a step's matmuls alone, with q/k/v and gate/up as separate and as fused GEMMs;
          and the draw alone (exponential race and top-p);
  sample  sample.py against transformers' generate (as torch picks its attention, and without cuDNN, which
          torch 2.11 picks on Hopper and which builds a graph for each new key length, as a decode step's is)
          and the HBM roofline (bench/bench_sample.py's cases), then the long-tail workload and the
          protocol's projection;
  anatomy the kernels of a decode step replayed from a CUDA graph, at batch 1 and 64 (bench/bench_sample.py);
  grade   verify.py's labelled cases graded by grade_batch's workers forked from this process after it has
          used the device, as evaluate.py grades: every verdict must be the label;
  evaluate  evaluate.py end to end on two bundled benchmarks (short generations), then rerun: it must resume
          with nothing to sample and write the same results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_data  # noqa: E402
import bench_sample  # noqa: E402
import bench_train  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import sample as S  # noqa: E402
import train as T  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "qwen2.5-math-1.5b"


class Ctx:
    """What the sections share: device, dtype, config, sizes, a scratch directory and the report."""

    def __init__(self, tiny: bool, tmp: Path, out: Path) -> None:
        self.tiny = tiny
        self.out = out
        self.report: dict = {"tiny": tiny, "sections": {}}
        self.parity_parts = ("causal", "packed", "greedy")
        self.train_runs: tuple[str, ...] | None = None
        self.resume_runs: tuple[str, ...] = tuple(resume_runs())
        self.attention_brief = False
        self.profile_run = "sft-compile-opsac"
        self.perdoc_failed = False  # a train run with --attention per-document failed: later ones use the mask
        self.device = torch.device("cpu" if tiny else "cuda")
        self.dtype = torch.bfloat16
        self.tmp = tmp
        config = M.Qwen2Config.from_pretrained(FIXTURE)
        config.rope_theta, config.max_position_embeddings = 300000.0, 32768  # the recipe's two edits
        if tiny:  # the real vocabulary (synthetic data uses real token ids), a tiny body
            config = M.Qwen2Config(vocab_size=config.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_theta=300000.0, max_position_embeddings=32768)
        self.config = config
        self.tokenizer = tmp / "tok"
        self.tokenizer.mkdir(parents=True, exist_ok=True)
        (self.tokenizer / "tokenizer.json").write_bytes(gzip.decompress((FIXTURE / "tokenizer.json.gz").read_bytes()))
        self._checkpoint: Path | None = None
        self.doc_calls = DocumentCalls(self)  # main() installs it: the per-document calls new to the process

    def checkpoint(self) -> Path:
        """A random bf16 checkpoint of the config (seed 0), written once."""
        if self._checkpoint is None:
            self._checkpoint = self.tmp / "base"
            M.save_pretrained(M.build_model(self.config, dtype=self.dtype, seed=0), self._checkpoint,
                              tokenizer_from=self.tokenizer)
        return self._checkpoint

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def write(self, section: str | None = None, partial: dict | None = None) -> None:
        """Write the report; with `partial`, what a running section has measured so far (a run stopped at its
        time limit keeps it)."""
        if section is not None:
            self.report["sections"][section] = {**partial, "partial": True}
        self.out.write_text(json.dumps(self.report, indent=1, default=str) + "\n")


def timed(ctx: Ctx, fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def graph_timed(ctx: Ctx, fn, calls: int = 20) -> float:
    """Seconds per call of fn() as a decoding step runs it on GPU: `calls` calls captured in one CUDA graph,
    replayed (after one call outside the capture, which compiles and warms up). On CPU, timed()."""
    if ctx.device.type != "cuda":
        return timed(ctx, fn, calls)
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(ctx, graph.replay, 5) / calls


# -----------------------------------------------------------------------------
# 1. environment


def sdpa_backend(q, k, v, mask=None, causal=False) -> str:
    from torch.nn.attention import SDPBackend
    names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper()}
    return names[int(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, scale=None,
                                             enable_gqa=q.shape[1] != k.shape[1]))]


def section_env(ctx: Ctx) -> dict:
    c, dev = ctx.config, ctx.device
    r = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        r |= {"device": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
              "cudnn": torch.backends.cudnn.version()}
    else:
        r |= {"device": "cpu", "threads": torch.get_num_threads()}
    r["copy_gb_s"] = bench_sample.bandwidth(dev) / 1e9
    n = 512 if ctx.tiny else 8192
    a, b = torch.randn(n, n, device=dev, dtype=ctx.dtype), torch.randn(n, n, device=dev, dtype=ctx.dtype)
    r["matmul_bf16_tflops"] = 2 * n**3 / timed(ctx, lambda: a @ b, 5) / 1e12
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    T_train, T_prefill, B_dec, S_dec = (256, 64, 4, 128) if ctx.tiny else (16384, 1000, 64, 8192)
    x = lambda *shape: torch.randn(*shape, device=dev, dtype=ctx.dtype)  # noqa: E731
    mask = torch.ones(B_dec, 1, 1, S_dec, dtype=torch.bool, device=dev)
    r["sdpa_backend"] = {
        "training causal (1 x %d, GQA)" % T_train: sdpa_backend(x(1, H, T_train, hd), x(1, Hkv, T_train, hd),
                                                               x(1, Hkv, T_train, hd), causal=True),
        "prefill causal (1 x %d, GQA)" % T_prefill: sdpa_backend(x(1, H, T_prefill, hd), x(1, Hkv, T_prefill, hd),
                                                                 x(1, Hkv, T_prefill, hd), causal=True),
        "decode with bool mask (%d x 1 over %d, GQA)" % (B_dec, S_dec): sdpa_backend(
            x(B_dec, H, 1, hd), x(B_dec, Hkv, S_dec, hd), x(B_dec, Hkv, S_dec, hd), mask=mask),
    }
    return r


# -----------------------------------------------------------------------------
# 2. parity with transformers


def _errors(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max and mean absolute logit error of ours and of transformers bf16, both against transformers fp32."""
    e_ours, e_hf = (ours.float() - ref).abs(), (theirs.float() - ref).abs()
    return {"ours_max": float(e_ours.max()), "ours_mean": float(e_ours.mean()),
            "hf_bf16_max": float(e_hf.max()), "hf_bf16_mean": float(e_hf.mean()),
            "ok": bool(e_ours.mean() <= 1.5 * e_hf.mean() + 1e-6 and e_ours.max() <= 2 * e_hf.max() + 1e-6)}


@torch.no_grad()
def section_parity(ctx: Ctx) -> dict:
    import transformers
    dev, V = ctx.device, ctx.config.vocab_size
    path = ctx.checkpoint()
    ours = M.load_pretrained(path, device=dev, dtype=ctx.dtype).eval()
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=ctx.dtype, attn_implementation="sdpa").to(dev).eval()
    ref = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="sdpa").to(dev).eval()
    g = torch.Generator().manual_seed(0)
    r = {}
    if "causal" in ctx.parity_parts:
        B, T = (2, 64) if ctx.tiny else (2, 1024)
        ids = torch.randint(0, V, (B, T), generator=g).to(dev)
        r["causal"] = {"shape": [B, T], **_errors(ours(ids), hf(ids).logits, ref(ids).logits.float())}
    if "packed" in ctx.parity_parts:
        lengths = [37, 130, 5, 200] if ctx.tiny else [700, 1300, 37, 1500, 509]
        ids = torch.randint(0, V, (1, sum(lengths)), generator=g).to(dev)
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(dev)
        packed = ours(ids, position_ids=pos)[0]  # (T, V)
        starts = np.cumsum([0] + lengths)
        docs = list(zip(starts[:-1], starts[1:]))
        per_doc = torch.cat([ours(ids[:, s:e])[0] for s, e in docs])
        hf_doc = torch.cat([hf(ids[:, s:e]).logits[0] for s, e in docs])
        ref_doc = torch.cat([ref(ids[:, s:e]).logits[0].float() for s, e in docs])
        r["packed"] = {"lengths": lengths,
                       "max_vs_own_per_document": float((packed.float() - per_doc.float()).abs().max()),
                       **_errors(packed, hf_doc, ref_doc)}
    if "greedy" not in ctx.parity_parts:
        return r
    prompt = torch.randint(0, V, (1, 48 if ctx.tiny else 300), generator=g)
    new = 16 if ctx.tiny else 64
    tokens = S.generate(ours, prompt.tolist(), max_new_tokens=new, kv_gib=0.05 if ctx.tiny else 4)[0]
    gathered = S.Sampler(ours, kv_gib=0.05 if ctx.tiny else 4, in_place=False, cuda_graphs=False).stream(
        prompt.tolist(), S.SamplingParams(new))
    gathered = next(gathered)[2]  # the same model through the gathering decode path, no CUDA graphs
    full = torch.cat([prompt[0], torch.tensor(tokens)])[None].to(dev)
    logits = ref(full).logits[0, prompt.shape[1] - 1:-1].float()  # (new, V): fp32 prediction at each step
    top2 = logits.topk(2, dim=-1)
    agree = top2.indices[:, 0].cpu() == torch.tensor(tokens)
    margin = (top2.values[:, 0] - top2.values[:, 1]).cpu()
    hf_tokens = hf.generate(prompt.to(dev), attention_mask=torch.ones_like(prompt).to(dev), max_new_tokens=new,
                            do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), new)
    # a step where ours differs from the fp32 argmax is a real error unless that argmax is a near-tie
    tol = 2 * float((hf(full).logits[0].float() - ref(full).logits[0].float()).abs().max())  # bf16's own error
    r["greedy"] = {"new_tokens": new, "agree_with_fp32_argmax": int(agree.sum()),
                   "disagree_on_near_ties": int((~agree & (margin <= tol)).sum()),
                   "disagree_clearly": int((~agree & (margin > tol)).sum()),
                   "identical_prefix_with_hf_bf16_generate": first_diff,
                   "identical_prefix_with_our_gathering_path": next(
                       (i for i, (a, b) in enumerate(zip(tokens, gathered)) if a != b), new)}
    r["greedy"]["ok"] = r["greedy"]["disagree_clearly"] == 0
    del ours, hf, ref
    return r


# -----------------------------------------------------------------------------
# 3. training through train.py


@contextlib.contextmanager
def no_checkpoint_writes():
    """The runs time steps, not checkpoint writes (~20 GB for the 1.5B model with its optimizer state): the
    final checkpoint becomes an empty directory."""
    saved = T.save_checkpoint

    def skip(out, step, *args, **kwargs):
        path = out / f"step-{step:06d}"
        (path / "model").mkdir(parents=True, exist_ok=True)
        return path
    T.save_checkpoint = skip
    try:
        yield
    finally:
        T.save_checkpoint = saved


@contextlib.contextmanager
def after_each_step(fn):
    """Call fn() at the end of each of train.py's steps, when the step's metrics are recorded."""
    record = T.metrics_record

    def hooked(*args, **kwargs):
        fn()
        return record(*args, **kwargs)
    T.metrics_record = hooked
    try:
        yield
    finally:
        T.metrics_record = record


class DocumentCalls:
    """model.doc_attention's per-document calls whose (thread, direction, padded length) this process has not
    run before, each timed between two device synchronizations (the calls already seen run unsynchronized).
    On CUDA these are the calls that may build a cuDNN graph: PyTorch keeps cuDNN's attention graphs in
    thread-local caches keyed by shape (aten/src/ATen/native/cudnn/MHA.cpp), and the backward runs on
    autograd's device thread. An H100 run's first per-document SFT run took ~0.9 s more per step than a rerun
    over the same documents, with every length's graphs built beforehand (warm_doc_attention): these calls
    say whether graphs were built inside its steps after all, and on which thread. On CPU the same calls run
    the reference equations, which build nothing; they are recorded alike, so the smoke test runs this code."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.seen: set[tuple[int, str, int]] = set()
        self.calls: list[dict] = []  # {"thread", "direction", "length", "s"} in the order made

    def install(self) -> None:
        """Wrap the per-document functions doc_attention calls (looked up at call time: it is a custom op,
        opaque to torch.compile, so its body runs eagerly even inside compiled blocks)."""
        cuda = self.ctx.device.type == "cuda"
        padded = lambda x: M.padded_length(x.shape[0])  # noqa: E731
        last = lambda a: a[-1]  # noqa: E731  (the cuDNN calls' padded length n)
        targets = ((("_cudnn_document", "forward", last), ("_cudnn_document_grads", "backward", last)) if cuda
                   else (("_causal_with_lse", "forward", lambda a: padded(a[0])),
                         ("_causal_grads", "backward", lambda a: padded(a[1]))))
        for attr, direction, length_of in targets:
            setattr(M, attr, self._wrapped(getattr(M, attr), direction, length_of))

    def _wrapped(self, fn, direction: str, length_of):
        def wrapped(*args):
            key = (threading.get_ident(), direction, int(length_of(args)))
            if key in self.seen:
                return fn(*args)
            self.seen.add(key)
            self.ctx.sync()
            t = time.perf_counter()
            out = fn(*args)
            self.ctx.sync()
            self.calls.append({"thread": key[0], "direction": direction, "length": key[2],
                               "s": time.perf_counter() - t})
            return out
        return wrapped

    def summary(self, since: int, ends: list[int]) -> dict:
        """The new calls made after calls[since], per step (ends: len(calls) at each step's end): how many and
        their seconds, and how many were of a (direction, length) already run on another thread."""
        other = {(c["direction"], c["length"]) for c in self.calls[:since]}
        per_step, at = [], since
        for end in ends:
            new = self.calls[at:end]
            per_step.append({"calls": len(new), "s": sum(c["s"] for c in new),
                             "seen_on_another_thread": sum((c["direction"], c["length"]) in other for c in new)})
            at = end
        return {"per_step": per_step, "threads_before": len({c["thread"] for c in self.calls[:since]}),
                "threads_in_steps": len({c["thread"] for c in self.calls[since:]})}


def train_run(ctx: Ctx, name: str, stage: str, batch: int, lengths: np.ndarray, budget: int, steps: int,
              extra: list[str], profiler=None) -> dict:
    """train.py's own loop on synthetic data: each step's time and MFU, and rates pooled over the steps that
    compiled nothing. profiler: a torch.profiler.profile to run during the last step alone."""
    from torch._dynamo.utils import counters
    kind = "sft" if stage == "sft" else "pref"
    data, out = ctx.tmp / f"data-{name}", ctx.tmp / f"run-{name}"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    bench_train.synthetic_prepared(data, ctx.tokenizer / "tokenizer.json", kind, lengths)
    max_len = budget // (1 if kind == "sft" else 2)
    before_warm_up = len(ctx.doc_calls.calls)
    warm_s = warm_doc_attention(ctx, lengths, max_len) if "per-document" in extra else None
    before_steps, ends = len(ctx.doc_calls.calls), []  # ends: len(calls) at each step's end
    allocator = [allocator_counts(ctx)]  # before step 1, then after each step
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    graphs = [counters["frames"]["total"]]  # frames dynamo has compiled: before step 1, after each step

    def step_done():
        graphs.append(counters["frames"]["total"])
        ends.append(len(ctx.doc_calls.calls))
        allocator.append(allocator_counts(ctx))
        if profiler is not None and len(graphs) == steps:  # steps - 1 done: profile the last
            profiler.start()
        elif profiler is not None and len(graphs) == steps + 1:
            ctx.sync()
            profiler.stop()
    with no_checkpoint_writes(), after_each_step(step_done):
        T.main(["--stage", stage, "--model", str(ctx.checkpoint()), "--data", str(data), "--out", str(out),
                "--batch-size", str(batch), "--micro-tokens", str(budget),
                "--max-len", str(max_len), "--truncate", "--max-steps", str(steps),
                "--save-every", "0", "--log-every", "1", "--dtype", "bf16", *extra])
    wall = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Steps that compiled something are not steady state: after the first, a micro-batch holding a single
    # document compiles the blocks again (plain causal attention instead of the document mask; an H100's
    # step 5 took 9 s instead of 2 s), and a block sees a second shape once before its shapes turn dynamic.
    compiled = [step for step in range(1, len(graphs)) if graphs[step] > graphs[step - 1]]
    steady = [x for x in log[1:] if x["step"] not in compiled] or log[-1:]
    seconds = sum(x["step_s"] for x in steady)
    mfu = [x["mfu"] * x["step_s"] for x in steady if x["mfu"] is not None]
    doc_calls = {"warm_up_calls": before_steps - before_warm_up, **ctx.doc_calls.summary(before_steps, ends)}
    # a long run makes each per-document call's first appearance once per process: the steps without any
    clean = [x for x in steady if x["mfu"] is not None and not doc_calls["per_step"][x["step"] - 1]["calls"]]
    return {"stage": stage, "micro_tokens": budget, "steps": len(log), "wall_s": wall,
            "each_step_s": [x["step_s"] for x in log], "each_step_mfu": [x["mfu"] for x in log],
            "each_step_tokens": [x["tokens"] for x in log],
            "steps_that_compiled": compiled, "steady_steps": [x["step"] for x in steady],
            "first_step_s": log[0]["step_s"], "step_s": seconds / len(steady),
            "tokens_per_step": sum(x["tokens"] for x in steady) / len(steady),
            "tokens_per_s": sum(x["tokens"] for x in steady) / seconds,
            "mfu": sum(mfu) / seconds if mfu else None, "peak_mem_gib": max(x["peak_mem_gib"] for x in log),
            "loss_first_last": [log[0]["loss"], log[-1]["loss"]], "cudnn_graphs_built_before_s": warm_s,
            "document_calls": doc_calls,
            # per step: cudaMalloc calls, and retries (the caching allocator, short of memory, freeing its cache
            # and synchronizing before it allocates again); None on CPU
            "allocator_per_step": [None if a is None else {k: b[k] - a[k] for k in a}
                                   for a, b in zip(allocator, allocator[1:])],
            "peak_reserved_gib": (torch.cuda.memory_stats().get("reserved_bytes.all.peak", 0) / 2**30
                                  if ctx.device.type == "cuda" else None),
            "mfu_steps_without_new_document_calls": [x["step"] for x in clean],
            "mfu_without_new_document_calls": (sum(x["mfu"] * x["step_s"] for x in clean)
                                               / sum(x["step_s"] for x in clean) if clean else None)}


def allocator_counts(ctx: Ctx) -> dict | None:
    """The CUDA caching allocator's running counts of cudaMalloc calls and of retries (None on CPU)."""
    if ctx.device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats()
    return {"device_allocs": stats.get("num_device_alloc", 0), "alloc_retries": stats.get("num_alloc_retries", 0)}


def warm_doc_attention(ctx: Ctx, lengths: np.ndarray, max_len: int) -> float:
    """Seconds spent running model.doc_attention forward and backward once at each padded document length
    the run's data holds, before it starts: cuDNN builds a graph per new length (382 ms on an H100), which a
    real run pays once per length in its first steps (at most max_len / 128 lengths), and which would
    otherwise land inside this short run's timed steps."""
    c, dev = ctx.config, ctx.device
    docs = np.minimum(lengths[:, :1] + lengths[:, 1:], max_len)  # prompt + each response, truncated
    padded = sorted({M.padded_length(int(n)) for n in docs.flatten()})
    t = time.perf_counter()
    for n in padded:
        q, k, v = (torch.zeros(n, h, c.head_dim, device=dev, dtype=ctx.dtype, requires_grad=True)
                   for h in (c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads))
        M.doc_attention(q, k, v, torch.tensor([0, n]))[0].sum().backward()
    ctx.sync()
    return time.perf_counter() - t


def head_costs(ctx: Ctx) -> dict:
    """losses.token_logprobs forward + backward alone, each chunk's softmax work eager and compiled (the
    default on CUDA), and compiled with the gradient taken in the forward (token_logprobs_linear_loss, as SFT
    and REDI train): seconds and peak memory above its inputs."""
    c, dev = ctx.config, ctx.device
    r = {}
    for n in ((256, 512) if ctx.tiny else (16384, 32768)):
        for chunk in (1024, 4096):
            for compile, linear in ((False, False), (True, False), (True, True)):
                h = torch.randn(n, c.hidden_size, device=dev, dtype=ctx.dtype, requires_grad=True)
                w = (torch.randn(c.vocab_size, c.hidden_size, device=dev, dtype=ctx.dtype) * 0.02).requires_grad_()
                t = torch.randint(0, c.vocab_size, (n,), device=dev)

                def step():
                    if linear:
                        losses.token_logprobs_linear_loss(h, w, t, torch.sum, chunk=chunk, compile=compile)[1].backward()
                    else:
                        losses.token_logprobs(h, w, t, chunk=chunk, compile=compile).sum().backward()
                    h.grad = w.grad = None
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                s = timed(ctx, step, 2)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else None
                # matmul FLOPs: forward logits, backward recompute (not with the gradient in the forward), grad_h,
                # grad_w
                gemms = 3 if linear else 4
                name = "gradient in the forward" if linear else "compiled" if compile else "eager"
                r[f"{n} tokens, chunk {chunk}, {name}"] = {
                    "s": s, "peak_extra_gib": peak, "tflops": 2 * gemms * n * c.vocab_size * c.hidden_size / s / 1e12}
    return r


def train_runs(ctx: Ctx) -> dict[str, tuple]:
    """The training runs the train section can time, by name: (stage, global batch, (n, parts) document lengths,
    micro-batch tokens, steps, extra train.py arguments)."""
    tiny = ctx.tiny
    budget, long = (256, 512) if tiny else (16384, 32768)
    sft_len = (np.array([[10, 50]] * 64) + np.arange(64)[:, None] % 7 if tiny
               else bench_train.realistic_lengths(256, 2))
    pref_len = (np.array([[10, 40, 45]] * 64) + np.arange(64)[:, None] % 5 if tiny
                else bench_train.realistic_lengths(256, 3))
    long_len = np.array([[50, long - 50]] * 8 if tiny else [[500, long - 500]] * 8)
    steps = 3 if tiny else 4  # compiled runs take 3 more: their steps 1, 2 and any one-document one compile
    runs = {"sft": ("sft", 8, sft_len, budget, steps, []),
            "redi": ("redi", 4, pref_len, budget, steps, []),
            "sft-32k": ("sft", 1, long_len, long, 3, []),
            "sft-compile": ("sft", 8, sft_len, budget, steps + 3, ["--compile"]),
            "redi-compile": ("redi", 4, pref_len, budget, steps + 3, ["--compile"]),
            "sft-compile-noac": ("sft", 8, sft_len, budget, steps + 3, ["--compile", "--no-ac"]),
            "sft-compile-mlpac": ("sft", 8, sft_len, budget, steps + 3, ["--compile", "--ac-scope", "mlp"]),
            "sft-compile-opsac": ("sft", 8, sft_len, budget, steps + 3, ["--compile", "--ac-scope", "ops"]),
            "sft-compile-opsac-perdoc": ("sft", 8, sft_len, budget, steps + 3,
                                         ["--compile", "--ac-scope", "ops", "--attention", "per-document"]),
            "sft-compile-opsac-noreshard": ("sft", 8, sft_len, budget, steps + 3,
                                            ["--compile", "--ac-scope", "ops", "--no-reshard"]),
            "sft-compile-opsac-perdoc-noreshard": ("sft", 8, sft_len, budget, steps + 3,
                                                   ["--compile", "--ac-scope", "ops", "--attention", "per-document",
                                                    "--no-reshard"]),
            "redi-compile-opsac": ("redi", 4, pref_len, budget, steps + 3, ["--compile", "--ac-scope", "ops"]),
            "redi-compile-opsac-perdoc-noreshard": ("redi", 4, pref_len, budget, steps + 3,
                                                    ["--compile", "--ac-scope", "ops", "--attention", "per-document",
                                                     "--no-reshard"])}
    if tiny:  # activation checkpointing, the GPU default
        runs = {k: v[:-1] + (v[-1] + ([] if "--no-ac" in v[-1] else ["--ac"]),) for k, v in runs.items()}
    return runs


def section_train(ctx: Ctx) -> dict:
    by_name = train_runs(ctx)
    runs = [(name, *spec) for name, spec in by_name.items()]
    if ctx.train_runs is not None:  # in the order asked for: the most wanted first, before a time limit
        unknown = set(ctx.train_runs) - set(by_name) - {"head"}
        if unknown:
            raise ValueError(f"unknown training runs {sorted(unknown)}; known: {', '.join(by_name)}, head")
        runs = [(name, *by_name[name]) for name in ctx.train_runs if name != "head"]
    r = {}

    def latest(name: str) -> dict:  # a run named twice is reported twice, the second time as name#2
        found = [v for k, v in r.items() if k.split("#")[0] == name]
        return found[-1] if found else {}
    while runs:
        name, *spec = runs.pop(0)
        done = sum(k.split("#")[0] == name for k in r)
        key = f"{name}#{done + 1}" if done else name
        try:
            r[key] = train_run(ctx, name, *spec)
        except BaseException as e:  # SystemExit from train.py included: record it, go on
            r[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            if "-perdoc" in name:  # this run and the rest time the document mask (flex_attention) instead
                ctx.perdoc_failed = True
                twins = [n.replace("-perdoc", "") for n in [name] + [run[0] for run in runs]]
                twins = [n if n in by_name else n.replace("-noreshard", "") for n in twins]  # (no REDI twin)
                runs = [(n, *by_name[n]) for n in dict.fromkeys(twins) if n not in r]
        print(f"    {key}: {json.dumps(r[key])[:400]}", flush=True)
        ctx.write("train", r)
    # The paper's recipe on 8 GPUs at these rates, if its traces have these synthetic lengths (mean document
    # ~5.6k tokens) and throughput scales linearly with GPUs (FSDP2's communication is not measured here).
    sft_len, pref_len = by_name["sft"][2], by_name["redi"][2]
    for suffix in ("", "-compile", "-compile-opsac", "-compile-opsac-perdoc-noreshard"):
        sft, redi = latest("sft" + suffix), latest("redi" + suffix)
        if "tokens_per_s" in sft and "tokens_per_s" in redi:
            hours_sft = 77_629 * 5 * float(sft_len.sum(1).mean()) / (8 * sft["tokens_per_s"]) / 3600
            hours_redi = 53_175 * float(pref_len.sum(1).mean() + pref_len[:, 0].mean()) / (8 * redi["tokens_per_s"]) / 3600
            r["recipe_projection" + suffix] = {"sft_5_epochs_h": hours_sft, "redi_1_epoch_h": hours_redi}
    if ctx.train_runs is None or "head" in ctx.train_runs:
        try:
            r["head"] = head_costs(ctx)
        except Exception as e:
            r["head"] = {"error": f"{type(e).__name__}: {e}"}
    return r


def resume_runs() -> dict[str, list[str]]:
    """The resume section's runs, by name: train.py arguments beyond the shared ones. `defaults`: train.py's
    own (blocks uncompiled and checkpointed; on GPU flex_attention and the head's softmax compiled), the
    cheapest to compile; the others compile the blocks too."""
    ops = ["--compile", "--ac-scope", "ops"]
    return {"defaults": [], "compiled": ops, "compiled-perdoc": ops + ["--attention", "per-document"]}


def section_resume(ctx: Ctx) -> dict:
    """train.py --resume as a user resumes, every run a fresh process: 3 steps straight, against 1 step
    (--stop-at 1) then --resume to 3. README promises the same bits; on GPU that holds only where every kernel
    is deterministic (PyTorch counts cuDNN attention, which --attention per-document runs, as not). The 1.5B
    config cut to 2 blocks (a checkpoint with its optimizer state is ~4 GB instead of ~18), bf16, 4k-token
    micro-batches."""
    config = dataclasses.replace(ctx.config, num_hidden_layers=2)
    base, data = ctx.tmp / "resume-base", ctx.tmp / "resume-data"
    for d in (base, data):
        shutil.rmtree(d, ignore_errors=True)
    M.save_pretrained(M.build_model(config, dtype=ctx.dtype, seed=0), base, tokenizer_from=ctx.tokenizer)
    budget = 128 if ctx.tiny else 4096
    lengths = np.minimum(bench_train.realistic_lengths(32, 2) // (64 if ctx.tiny else 2), budget // 2)
    bench_train.synthetic_prepared(data, ctx.tokenizer / "tokenizer.json", "sft", lengths)
    shared = [sys.executable, str(ROOT / "train.py"), "--stage", "sft", "--model", str(base), "--data", str(data),
              "--batch-size", "8", "--micro-tokens", str(budget), "--max-len", str(budget), "--max-steps", "3",
              "--save-every", "0", "--log-every", "1", "--dtype", "bf16"]
    r, extra = {}, resume_runs()
    for name in ctx.resume_runs:
        try:
            straight, stopped = ctx.tmp / f"resume-{name}-straight", ctx.tmp / f"resume-{name}-stopped"
            seconds = []
            for out, more in ((straight, []), (stopped, ["--stop-at", "1"]), (stopped, ["--resume"])):
                t = time.perf_counter()
                proc = subprocess.run([*shared, *extra[name], "--out", str(out), *more], cwd=ROOT,
                                      capture_output=True, text=True, timeout=600)
                seconds.append(round(time.perf_counter() - t, 1))
                if proc.returncode != 0:
                    raise RuntimeError(f"train.py {' '.join(more)} exited {proc.returncode}: {proc.stderr[-1500:]}")
            a, b = (load_file(out / "final" / "model.safetensors") for out in (straight, stopped))
            differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
            logs = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
                    for out in (straight, stopped)]
            r[name] = {"same_bits": not differ and a.keys() == b.keys(), "tensors": len(a),
                       "tensors_differing": len(differ), "max_abs_diff": max(differ.values(), default=0.0),
                       "losses_straight": logs[0], "losses_resumed": logs[1], "process_s": seconds}
        except Exception as e:
            r[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        finally:
            for out in (straight, stopped):
                shutil.rmtree(out, ignore_errors=True)
        print(f"    {name}: {json.dumps(r[name])[:400]}", flush=True)
        ctx.write("resume", r)
    return r


# -----------------------------------------------------------------------------
# attention backends and where a training step's time goes


def _fwd_bwd(fn, *xs):
    def run():
        for x in xs:
            x.grad = None
        fn().sum().backward()
    return run


def section_attention(ctx: Ctx) -> dict:
    """Forward+backward of the attention alone at training shapes, for each way we could compute it: one
    causal document (each SDPA backend), packed documents (flex_attention, one SDPA call per document,
    model.doc_attention, varlen_attn where this torch has it), and a run of distinct lengths (cuDNN builds a
    graph per shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    c, dev = ctx.config, ctx.device
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    T = 512 if ctx.tiny else 16384
    docs = [T * 3 // 8, T * 3 // 16, T - T * 3 // 8 - T * 3 // 16]
    q = torch.randn(1, H, T, hd, device=dev, dtype=ctx.dtype, requires_grad=True)
    k = torch.randn(1, Hkv, T, hd, device=dev, dtype=ctx.dtype, requires_grad=True)
    v = torch.randn(1, Hkv, T, hd, device=dev, dtype=ctx.dtype, requires_grad=True)
    flops = lambda lengths: 4 * 2 * sum(n * n / 2 for n in lengths) * H * hd * 3.5 / 2  # noqa: E731 fwd 2 + bwd 5 matmuls
    r = {"T": T, "docs": docs}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "math": SDPBackend.MATH} if dev.type == "cuda" else {"flash": SDPBackend.FLASH_ATTENTION}

    def record(name, fn, lengths):
        try:
            s = timed(ctx, fn, 3)
            r[name] = {"ms": 1e3 * s, "tflops": flops(lengths) / s / 1e12}
        except Exception as e:
            r[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    for name, b in backends.items() if not ctx.attention_brief else ():
        if name == "math" and not ctx.tiny:
            continue
        def one(b=b):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        record(f"1 document, sdpa {name}", _fwd_bwd(one, q, k, v), [T])

        def per_doc(b=b):
            outs, s0 = [], 0
            with sdpa_kernel(b):
                for n in docs:
                    outs.append(F.scaled_dot_product_attention(q[:, :, s0:s0 + n], k[:, :, s0:s0 + n],
                                                               v[:, :, s0:s0 + n], is_causal=True, enable_gqa=True))
                    s0 += n
            return torch.cat(outs, dim=2)
        record(f"{len(docs)} documents, one sdpa {name} call each", _fwd_bwd(per_doc, q, k, v), docs)

    doc_id = torch.cat([torch.full((n,), i) for i, n in enumerate(docs)]).to(dev)
    flex = torch.compile(flex_attention) if dev.type == "cuda" else flex_attention
    make = torch.compile(create_block_mask) if dev.type == "cuda" else create_block_mask
    mask = make(lambda b, h, qi, ki: (doc_id[qi] == doc_id[ki]) & (ki <= qi), 1, None, T, T, device=dev)
    record(f"{len(docs)} documents, flex_attention", _fwd_bwd(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
                                                               q, k, v), docs)
    # (max-autotune and USE_TMA, timed here on an H100 on 2026-11-26, moved flex_attention by 3%: dropped, as
    # autotuning took a minute of the device check)
    # train.py --attention per-document: model.doc_attention, one cuDNN call per document padded to a multiple
    # of 128 tokens (on CPU: the reference equations); first checked against those equations in fp32, beside
    # flex_attention's own error
    bounds = torch.tensor([0, *np.cumsum(docs)])
    tokens = lambda x: x.detach()[0].transpose(0, 1).contiguous().requires_grad_()  # noqa: E731 (T, heads, hd)
    tq, tk, tv = tokens(q), tokens(k), tokens(v)

    def per_document():
        return M.doc_attention(tq, tk, tv, bounds)[0]
    try:
        grad = torch.randn(T, H, hd, device=dev, generator=torch.Generator(device=dev).manual_seed(0)).to(ctx.dtype)
        got = {}  # output and q, k, v gradients, token-major (T, heads, hd); flex_attention has no CPU backward
        repeatable = {}  # a second forward and backward gives the same bits (what a bit-exact --resume needs)
        ways = [("doc_attention", per_document, (tq, tk, tv))] + [
            ("flex_attention", lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)[0].transpose(0, 1), (q, k, v))
        ] * (dev.type == "cuda")
        for name, fn, xs in ways:
            runs = []
            for _ in range(2):
                out = fn()
                runs.append([out.detach()] + [g if g.dim() == 3 else g[0].transpose(0, 1)
                                              for g in torch.autograd.grad(out, xs, grad)])
            got[name] = runs[0]
            repeatable[name] = all(torch.equal(a, b) for a, b in zip(*runs))
            del runs
        err = dict.fromkeys(got, 0.0)
        rounding = 0.0  # a bf16 rounding of the largest reference value: the error of the CPU path
        for s0, e0 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):  # the fp32 reference, document by document
            doc = [x[s0:e0].detach().float() for x in (tq, tk, tv)]
            want = [M._causal_with_lse(*doc)[0], *M._causal_grads(grad[s0:e0].float(), *doc)]
            rounding = max(rounding, *(float(b.abs().max()) * 2**-8 for b in want))
            for name, values in got.items():
                err[name] = max(err[name], *(float((a[s0:e0].float() - b).abs().max()) for a, b in zip(values, want)))
            del doc, want
        record(f"{len(docs)} documents, doc_attention (train.py --attention per-document)",
               _fwd_bwd(per_document, tq, tk, tv), docs)
        r[f"{len(docs)} documents, doc_attention (train.py --attention per-document)"] |= {
            "max_err_vs_fp32": err["doc_attention"], "flex_max_err_vs_fp32": err.get("flex_attention"),
            "same_bits_twice": repeatable["doc_attention"], "flex_same_bits_twice": repeatable.get("flex_attention"),
            "ok": err["doc_attention"] <= max(2 * err.get("flex_attention", 0.0), rounding)}
    except Exception as e:
        r[f"{len(docs)} documents, doc_attention (train.py --attention per-document)"] = {
            "error": f"{type(e).__name__}: {str(e)[:500]}", "trace": traceback.format_exc()[-1500:]}
    if ctx.attention_brief:
        return r
    try:
        from torch.nn.attention.varlen import varlen_attn
        cu = torch.tensor([0, *np.cumsum(docs)], device=dev, dtype=torch.int32)

        def varlen():  # flash-attention's varlen kernel takes fewer k/v heads as they are (GQA): no enable_gqa
            return varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, max(docs),
                               max(docs), window_size=(-1, 0))
        record(f"{len(docs)} documents, varlen_attn", _fwd_bwd(varlen, q, k, v), docs)
    except Exception as e:
        r["varlen_attn"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"

    lengths = [T - 97 * i for i in range(1, 9)]  # 8 new shapes: a graph-building backend pays on each
    for name, b in backends.items():
        if name == "math":
            continue
        def run(b=b):
            for n in lengths:
                with sdpa_kernel(b):
                    F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True,
                                                   enable_gqa=True).sum().backward()
        try:
            ctx.sync()
            t = time.perf_counter()
            run()
            ctx.sync()
            first = time.perf_counter() - t
            again = timed(ctx, run, 1)
            r[f"8 new lengths, sdpa {name}"] = {"first_ms": 1e3 * first, "again_ms": 1e3 * again}
        except Exception as e:
            r[f"8 new lengths, sdpa {name}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return r


def _kernel_kind(name: str) -> str:
    """A kernel's kind from its name: cuBLAS, cuDNN and flash kernels, inductor's (triton_poi/red/per: fused
    elementwise and reductions; triton_tem: templates, flex_attention's or a tuned matmul's), or, on CPU, an
    operator's."""
    n = name.lower()
    if any(w in n for w in ("flex", "attention", "fmha", "flash", "sdpa")):  # (cuDNN's: ..._native_sdpa_...)
        return "attention"
    if any(w in n for w in ("gemm", "matmul", "nvjet", "xmma", "cutlass", "wgmma")) or \
            n.startswith(("aten::mm", "aten::addmm", "triton_tem")):
        return "matmul"
    if n.startswith("triton_"):
        return "fused elementwise and reductions (inductor)"
    return "other"


# Ranges of a train.py step whose kernels the profile section sums: (phase, exact range names, name prefixes).
PHASES = (("blocks forward and the block mask (compiled)", (), ("Torch-Compiled Region",)),
          ("blocks backward, with recompute (compiled)", ("CompiledFunctionBackward",), ()),
          # SFT and REDI take the head's gradient in its forward (_LinearLossHead): its backward only scales it
          ("chunked head forward", ("_ChunkedTokenLogProbs", "_LinearLossHead"), ()),
          ("chunked head backward", ("_ChunkedTokenLogProbsBackward", "_LinearLossHeadBackward"), ()),
          ("optimizer step", ("Optimizer.step#AdamW.step",), ()),
          ("FSDP2 hooks (parameter casts and gradient copies)", (), ("FSDP::",)))


def section_profile(ctx: Ctx) -> dict:
    """The last step of a train.py run (--profile-run, by default SFT with --compile --ac-scope ops), profiled:
    the device's kernel time against the step's wall time (what is left is the device waiting for the host),
    by kind of kernel, by phase of the step (PHASES: blocks, chunked head, optimizer, FSDP2), and the top
    kernels. Run after the train section in the same process, it reuses that run's compiled code."""
    from torch.profiler import ProfilerActivity, profile
    name = ctx.profile_run.replace("-perdoc", "") if ctx.perdoc_failed else ctx.profile_run
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    prof = profile(activities=acts)
    stage, batch, lengths, budget, _, extra = train_runs(ctx)[name]
    run = train_run(ctx, f"profile-{name}", stage, batch, lengths, budget, 4, extra, profiler=prof)
    cuda = ctx.device.type == "cuda"
    kernels = bench_sample.kernel_times(prof, cuda)
    if cuda:  # each operator's own kernels (those it launched itself)
        owned = [(e, sum(k.duration for k in e.kernels)) for e in prof.events() if e.kernels]
    else:  # the CPU smoke test: each operator's own CPU time stands for kernels
        owned = [(e, e.self_cpu_time_total) for e in prof.events()]
    kernel_ms = sum(us for _, us in kernels) / 1e3
    kinds: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for kernel, us in kernels:
        kind = _kernel_kind(kernel)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        by_name.setdefault(kernel, [0.0, 0])
        by_name[kernel][0] += us / 1e3
        by_name[kernel][1] += 1
    rest = "the rest (embedding, loss, clipping, metrics)"
    phases = dict.fromkeys([phase for phase, _, _ in PHASES] + [rest], 0.0)
    for e, us in owned:  # a kernel belongs to the outermost phase range around the operator that launched it
        phase, up = rest, e  # (the head's own compiled regions are inside it)
        while up is not None:
            phase = next((ph for ph, exact, prefixes in PHASES if up.name in exact or up.name.startswith(prefixes)),
                         phase)
            up = up.cpu_parent
        phases[phase] += us / 1e3
    phases["kernels the profiler linked to no operator"] = kernel_ms - sum(phases.values())
    wall_ms, tokens, mfu = 1e3 * run["each_step_s"][-1], run["each_step_tokens"][-1], run["each_step_mfu"][-1]
    rates = {}
    if mfu is not None:  # the step's FLOPs by train.flops (6N + 12 L d T per token) are its MFU x time x peak
        c = ctx.config
        peak = next(f for gpu, f in T.PEAK_FLOPS if gpu in torch.cuda.get_device_name(ctx.device))
        n = M.build_model(c, device="meta").num_parameters()
        n -= 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size  # as train.flops counts it
        # + the head's recompute (~all tokens), which SFT and REDI no longer run (train.LINEAR)
        recompute = 0 if stage in T.LINEAR else 2 * c.vocab_size * c.hidden_size * tokens
        attention = (mfu * wall_ms / 1e3 * peak - 6 * n * tokens) / 2  # 12 L d T counts twice the causal work
        rates = {"matmul (6N per token" + (")" if not recompute else " and the head's recompute)"):
                 (6 * n * tokens + recompute) / kinds.get("matmul", math.nan) / 1e9,
                 "attention (causal work)": attention / kinds.get("attention", math.nan) / 1e9}
    top = sorted(by_name.items(), key=lambda kv: kv[1][0], reverse=True)[:30]
    return {"run": name, "tokens": tokens, "profiled_step_wall_ms": wall_ms,
            "profiled_step_compiled": len(run["each_step_s"]) in run["steps_that_compiled"],
            "unprofiled_step_s": run["step_s"], "kernel_ms": kernel_ms,
            "device_busy_share": kernel_ms / wall_ms, "kernel_ms_by_kind": kinds, "kernel_ms_by_phase": phases,
            "achieved_tflops_by_kind": rates,
            "top": [{"name": k[:90], "ms": ms, "calls": n} for k, (ms, n) in top]}


def ragged_lengths(rows: int, tiny: bool) -> list[int]:
    """Context lengths of `rows` sequences in flight on the long-tail workload (bench_sample.in_flight, as
    bench_sample.long_tail starts): each one's done part after a 150-token prompt. At 256 rows: mean ~6k, the
    longest ~25-30k."""
    _, done, _, _ = bench_sample.in_flight(np.random.default_rng(0), rows, tiny)
    return (150 + done).tolist()


@torch.no_grad()
def section_decode(ctx: Ctx) -> dict:
    """One layer's decode attention alone (model._flex_decode compiled over a paged pool with the sampler's
    block mask, bf16), for ways of launching flex_attention's decoding kernel: inductor's options, our SPLIT_KV
    (four thread blocks per SM), and with it 3 pipelining stages with 2 or 4 warps, and
    model.decode_kernel_options, the sampler's (with MIN_SPLIT_KV since 2026-11-27), marked. Then rows of
    ragged lengths, as the long tail has them in flight (ragged_lengths), for SPLIT_KV 2 to 32: the kernel
    gives each split of a row an equal share of that row's blocks, so with few splits the longest row's share
    runs on alone after the others end. Each variant is
    checked against an fp32 reference on each row's gathered keys, and timed as microseconds per call and the
    share of the measured copy bandwidth its KV reads reach (the sampler's step does this once per layer). On
    GPU `us` is a call replayed from a CUDA graph, as in the sampler (20 calls per graph), and `us_launched` a
    call from Python, through the compiled function's guards, with a synchronization: at batch 1 mostly host
    time. The H100 runs of 2026-11-26 timed only the latter, and also the mask's old layout (every whole block
    listed as full): 1.1-1.5x slower at batch 1 and 64, the same at 256; dropped since."""
    c, dev = ctx.config, ctx.device
    Hkv = c.num_key_value_heads
    bw = bench_sample.bandwidth(dev)
    sms = M._sm_count(dev) if dev.type == "cuda" else 8
    r = {"copy_gb_s": bw / 1e9}
    for B, n in ((2, 300), (4, 500)) if ctx.tiny else ((1, 1000), (64, 8000), (128, 8000), (256, 8000)):
        split = M.decode_split_kv(B, Hkv, sms, least=1)  # four thread blocks per SM: the rule before MIN_SPLIT_KV
        variants = {"inductor's options": None, f"SPLIT_KV {split}": {"SPLIT_KV": split},
                    "... num_stages 3": {"SPLIT_KV": split, "num_stages": 3},
                    "... num_stages 3, num_warps 4": {"SPLIT_KV": split, "num_stages": 3, "num_warps": 4},
                    "decode_kernel_options": M.decode_kernel_options(B, Hkv, sms)}
        decode_case(ctx, r, f"batch {B}, {n} positions", [n] * B, variants, sms, bw)
    B = 4 if ctx.tiny else 256
    lengths = ragged_lengths(B, ctx.tiny)
    variants = {f"SPLIT_KV {split}": M.decode_kernel_options(B, Hkv, sms, split) for split in (2, 4, 8, 16, 32)}
    decode_case(ctx, r, f"batch {B}, ragged positions (mean {statistics.mean(lengths):.0f}, longest {max(lengths)})",
                lengths, variants, sms, bw)
    for name, part in (("gemms", decode_gemms), ("draw", decode_draw)):
        try:
            r[name] = part(ctx, bw)
        except Exception as e:
            r[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        ctx.write("decode", r)
    return r


def decode_case(ctx: Ctx, r: dict, title: str, lengths: list[int], variants: dict, sms: int, bw: float) -> None:
    """section_decode's timing of each launch variant over rows of these lengths, into r[title]; the sampler's
    own options marked, each output checked against an fp32 reference."""
    c, dev = ctx.config, ctx.device
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    B, bs = len(lengths), 32 if ctx.tiny else 128  # the sampler's block sizes on CPU and GPU
    per_row = [-(-n // bs) for n in lengths]
    one = S.PagedKVCache(dataclasses.replace(c, num_hidden_layers=1), n_blocks=sum(per_row) + 1, block_size=bs,
                         device=dev, dtype=ctx.dtype, in_place=True)
    g = torch.Generator(device=dev).manual_seed(0)
    one.k.normal_(generator=g)
    one.v.normal_(generator=g)
    blocks = (torch.randperm(one.n_blocks - 1, generator=torch.Generator().manual_seed(B)) + 1).tolist()
    starts = np.cumsum([0] + per_row).tolist()
    pages = [blocks[starts[i]:starts[i + 1]] for i in range(B)]
    one.decode_buffers(B)
    one.set_pages(pages)
    # scores with a standard deviation of 3: a few keys dominate each row, so a misread block shows
    q = (3 * torch.randn(B, H, 1, hd, device=dev, generator=g)).to(ctx.dtype)
    k, v = one.k[0][None], one.v[0][None]
    mask = one._block_mask(torch.tensor(lengths, device=dev))
    # the reference, row by row on each row's gathered keys in fp32 (uncompiled flex_attention would score the
    # whole pool: tens of GB at batch 256); bf16's own error: SDPA on the same keys in bf16
    want, bf16_err = torch.empty(B, H, 1, hd, device=dev), 0.0
    for b, n in enumerate(lengths):
        rows = one.pool_rows(torch.tensor(pages[b], device=dev)).flatten()[:n]
        kk, vv = (x[0][:, rows][None].float() for x in (one.k, one.v))  # (1, Hkv, n, hd)
        qb = q[b:b + 1].float().view(1, Hkv, H // Hkv, hd)
        want[b] = ((qb @ kk.transpose(-1, -2) / hd**0.5).softmax(-1) @ vv).reshape(H, 1, hd)
        sdpa = F.scaled_dot_product_attention(qb.to(ctx.dtype), kk.to(ctx.dtype), vv.to(ctx.dtype))
        bf16_err = max(bf16_err, float((sdpa.reshape(H, 1, hd).float() - want[b]).abs().max()))
    r[f"{title}, sdpa on gathered keys, max_err_vs_fp32"] = bf16_err
    sampler = M.decode_kernel_options(B, Hkv, sms)
    unique = {}  # options -> name: a variant listed twice is compiled and timed once
    for name, options in variants.items():
        unique.setdefault(json.dumps(options, sort_keys=True), name)
    variants = {name + (" (the sampler's)" if variants[name] == sampler else ""): variants[name]
                for name in unique.values()}  # (each variant is a compile)
    case = {}
    kv_bytes = sum(lengths) * Hkv * hd * 2 * ctx.dtype.itemsize
    for name, options in variants.items():
        try:
            torch._dynamo.reset()
            # on CPU the sampler runs it uncompiled (inductor's CPU flex template fails to build some of these
            # masks), so the smoke test does too
            fn = torch.compile(M._flex_decode, dynamic=False) if dev.type == "cuda" else M._flex_decode
            got = fn(q, k, v, mask, options)
            err = float((got.float() - want).abs().max())
            launched = timed(ctx, lambda: fn(q, k, v, mask, options), 20)
            s = graph_timed(ctx, lambda: fn(q, k, v, mask, options))
            case[name] = {"us": 1e6 * s, "us_launched": 1e6 * launched, "of_copy_bandwidth": kv_bytes / s / bw,
                          "max_err_vs_fp32": err, "ok": err <= 4 * bf16_err + 1e-4}
        except Exception as e:
            case[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"    {title}, {name}: {json.dumps(case[name])}", flush=True)
    r[title] = case
    ctx.write("decode", r)
    del one


def decode_rows(ctx: Ctx) -> tuple[int, ...]:
    """The rows of a decode step that the decode section's matmuls and draw are timed at."""
    return (1, 4) if ctx.tiny else (1, 64, 256)


def decode_draw(ctx: Ctx, bw: float) -> dict:
    """The draw alone (sample.draw, compiled as the sampler runs it: the exponential race and top-p's radix
    select, whose histograms are scatter-adds), temperature 0.6 and top-p 0.95 over the real vocabulary, at the
    rows of a decode step (1, 64, 256; tiny: 1, 4), replayed from a CUDA graph: microseconds, and the share of
    the copy bandwidth that one read of its bf16 logits would reach. Logits of two shapes: peaked (a few
    tokens 15 above a N(0, 4) tail, as a confident model's) and flat (N(0, 1): a nucleus of most of the
    vocabulary), since the histograms' atomic adds contend on the buckets the tail's probabilities share.
    Last, flat logits at the most rows with the histograms in one copy (sample.NUCLEUS_COPIES = 1), the layout
    before 2026-11-27 and never timed alone: what the 32 interleaved copies save."""
    V = ctx.config.vocab_size
    params = S.SamplingParams(1, temperature=0.6, top_p=0.95)
    compiled = ctx.device.type == "cuda"
    fn = S._compiled_draw() if compiled else S.draw
    g = torch.Generator(device=ctx.device).manual_seed(0)

    def logits_of(rows: int, shape: str) -> torch.Tensor:
        logits = torch.randn(rows, V, device=ctx.device, generator=g)
        if shape == "peaked":
            logits = 2 * logits
            logits[:, :5] += 15
        return logits.to(ctx.dtype)

    r = {}
    for rows in decode_rows(ctx):
        keys = torch.arange(rows, device=ctx.device)
        for shape in ("peaked", "flat"):
            logits = logits_of(rows, shape)
            s = graph_timed(ctx, lambda: fn(logits, params, keys, keys, keys))
            r[f"{rows} rows, {shape}"] = {"us": 1e6 * s, "of_copy_bandwidth": logits.nbytes / s / bw}
        print(f"    draw at {rows} rows: " + ", ".join(f"{shape} {r[f'{rows} rows, {shape}']['us']:.0f} us"
                                                  for shape in ("peaked", "flat")), flush=True)
    rows, copies = decode_rows(ctx)[-1], S.NUCLEUS_COPIES
    keys, logits = torch.arange(rows, device=ctx.device), logits_of(rows, "flat")
    try:
        S.NUCLEUS_COPIES = 1  # a global: dynamo guards on it, so the fresh compile below traces one copy
        one = torch.compile(S.draw, dynamic=True) if compiled else S.draw
        s = graph_timed(ctx, lambda: one(logits, params, keys, keys, keys))
    finally:
        S.NUCLEUS_COPIES = copies
    r[f"{rows} rows, flat, one histogram copy"] = {"us": 1e6 * s, "of_copy_bandwidth": logits.nbytes / s / bw}
    print(f"    draw at {rows} rows, flat, histograms in one copy: {1e6 * s:.0f} us", flush=True)
    return r


def decode_gemms(ctx: Ctx, bw: float) -> dict:
    """A decoding step's matmuls alone, at the rows of a decode step (1, 64, 256; tiny: 1, 4), bf16, replayed
    from a CUDA graph: microseconds and the share of the copy bandwidth their weight reads reach. q, k, v as
    one GEMM (the sampler's since 2026-11-27, model.Qwen2Attention.fused_qkv) and as the three the model ran
    before, and gate, up as the two the model runs and as one: what fusing saves (fewer, larger reads; the
    batch-1 roofline counts each weight byte once)."""
    c, dev = ctx.config, ctx.device
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    groups = {  # name: the (out, in, bias) GEMMs it runs one after the other
        "q, k, v (3 GEMMs)": [(q, d, True), (kv, d, True), (kv, d, True)],
        "q, k, v fused (1 GEMM, the sampler's)": [(q + 2 * kv, d, True)],
        "o_proj": [(d, q, False)],
        "gate, up (2 GEMMs)": [(f, d, False), (f, d, False)],
        "gate, up fused (1 GEMM)": [(2 * f, d, False)],
        "down_proj": [(d, f, False)],
        "head": [(c.vocab_size, d, False)],
    }
    g = torch.Generator(device=dev).manual_seed(0)
    r = {}
    for rows in decode_rows(ctx):
        case = {}
        for name, shapes in groups.items():
            ws = [(torch.randn(o, i, device=dev, generator=g, dtype=ctx.dtype),
                   torch.randn(o, device=dev, generator=g, dtype=ctx.dtype) if bias else None) for o, i, bias in shapes]
            xs = [torch.randn(rows, i, device=dev, generator=g, dtype=ctx.dtype) for _, i, _ in shapes]
            s = graph_timed(ctx, lambda: [F.linear(x, w, b) for x, (w, b) in zip(xs, ws)])
            weight_bytes = sum(w.numel() * w.element_size() for w, _ in ws)
            case[name] = {"us": 1e6 * s, "of_copy_bandwidth": weight_bytes / s / bw}
        r[f"{rows} rows"] = case
        print(f"    GEMMs at {rows} rows: " + ", ".join(f"{k} {v['us']:.1f} us ({100 * v['of_copy_bandwidth']:.0f}%)"
                                                    for k, v in case.items()), flush=True)
    return r


# -----------------------------------------------------------------------------
# 4. sampling


def section_sample(ctx: Ctx) -> dict:
    import transformers
    path = ctx.checkpoint()
    ours = M.load_pretrained(path, device=ctx.device, dtype=ctx.dtype).eval()
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=ctx.dtype, attn_implementation="sdpa")
    hf = hf.to(ctx.device).eval()
    return bench_sample.device_cases(ours, hf, ctx.device, tiny=ctx.tiny, progress=lambda r: ctx.write("sample", r))


def section_anatomy(ctx: Ctx) -> dict:
    """The kernels of a captured decode step (bench_sample.anatomies), beside the step times of this run's
    sample section if it ran."""
    ours = M.load_pretrained(ctx.checkpoint(), device=ctx.device, dtype=ctx.dtype).eval()
    step_ms = ctx.report["sections"].get("sample", {}).get("step_ms_by_batch")
    return bench_sample.anatomies(ours, ctx.device, tiny=ctx.tiny, step_ms=step_ms,
                                  progress=lambda r: ctx.write("anatomy", r))


def section_evaluate(ctx: Ctx) -> dict:
    """evaluate.py end to end on the device, as the README runs it (one process): two bundled benchmarks, a few
    problems and samples, short generations (random weights write until the token limit); then the same
    command again, which must resume with nothing left to sample and write the same results."""
    import evaluate as E
    out = ctx.tmp / "eval"
    limit, samples, new = (2, 2, 16) if ctx.tiny else (16, 4, 512)
    argv = ["--model", str(ctx.checkpoint()), "--benchmarks", "math500,aime24", "--limit", str(limit),
            "--samples", str(samples), "--max-new-tokens", str(new), "--out", str(out)]
    seconds, outputs = [], []
    for _ in range(2):
        t = time.perf_counter()
        E.main(argv)
        seconds.append(time.perf_counter() - t)
        outputs.append([(out / name).read_text() for name in ("results.json", "generations.jsonl")])
    results = json.loads(outputs[0][0])
    generations = [json.loads(line) for line in outputs[0][1].splitlines()]
    return {"first_run_s": seconds[0], "rerun_s": seconds[1], "generations": len(generations),
            "expected_generations": 2 * limit * samples, "tokens": sum(g["tokens"] for g in generations),
            "rerun_identical": outputs[1] == outputs[0],
            "pass@1": {name: m["pass@1"] for name, m in results["benchmarks"].items()}}


def section_grade(ctx: Ctx) -> dict:
    """verify.py's labelled cases (tests/verify_cases.jsonl, known misses left out) graded by grade_batch's
    forked workers from this process, after it has used the device, as evaluate.py grades after sampling: a
    process that has used a GPU holds far more address space than a CPU one, and until 2026-11-26 the
    workers' memory cap, a fixed 4 GiB of address space, sat below what they inherited and failed their
    allocations. Every verdict must be the label."""
    import verify
    if ctx.device.type == "cuda":
        torch.ones(1, device=ctx.device).sum().item()  # (the sample section has usually run already)
    cases = [json.loads(line) for line in (ROOT / "tests" / "verify_cases.jsonl").read_text().splitlines()]
    cases = [c for c in cases if "known_miss" not in c]
    t = time.perf_counter()
    got = verify.grade_batch([(c["response"], c["gold"]) for c in cases]).correct
    wrong = [c["category"] for c, ok in zip(cases, got) if ok != c["expected"]]
    return {"address_space_gib": verify._address_space() / 2**30, "cases": len(cases), "as_labelled": not wrong,
            "not_as_labelled": wrong[:20], "grade_s": time.perf_counter() - t}


SECTIONS = {"env": section_env, "parity": section_parity, "train": section_train, "resume": section_resume,
            "attention": section_attention, "profile": section_profile, "decode": section_decode,
            "sample": section_sample, "anatomy": section_anatomy, "grade": section_grade,
            "evaluate": section_evaluate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="every section on CPU with a tiny config (a smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--parity", default="causal,packed,greedy", help="parity checks to run")
    p.add_argument("--train-runs", help="training runs to time, in this order (default all: sft,redi,sft-32k,"
                                        "sft-compile,redi-compile,sft-compile-noac,sft-compile-mlpac,"
                                        "sft-compile-opsac,sft-compile-opsac-perdoc,sft-compile-opsac-noreshard,"
                                        "sft-compile-opsac-perdoc-noreshard,redi-compile-opsac,"
                                        "redi-compile-opsac-perdoc-noreshard; and head: the chunked head alone)")
    p.add_argument("--attention-brief", action="store_true",
                   help="the attention section times and checks only flex_attention and doc_attention")
    p.add_argument("--resume-runs", default=",".join(resume_runs()),
                   help="the resume section's runs, in this order (default: all)")
    p.add_argument("--profile-run", default="sft-compile-opsac", help="the training run whose last step the "
                                                                        "profile section profiles")
    p.add_argument("--out", default="gpu.json", help="the JSON report")
    p.add_argument("--tmp", help="where to make the scratch directory (checkpoints, synthetic data), removed at the "
                                 "end (default: the system's temporary directory)")
    args = p.parse_args(argv)
    names = args.sections.split(",")
    unknown = set(names) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: run with --tiny for the CPU smoke test")
    tmp = bench_data.scratch_dir(args.tmp, "redi-gpu-check-")
    ctx = Ctx(args.tiny, tmp, Path(args.out))
    ctx.doc_calls.install()
    ctx.parity_parts = tuple(args.parity.split(","))
    ctx.train_runs = tuple(args.train_runs.split(",")) if args.train_runs else None
    if args.profile_run not in train_runs(ctx):
        p.error(f"unknown --profile-run {args.profile_run!r}; known: {', '.join(train_runs(ctx))}")
    ctx.profile_run = args.profile_run
    ctx.resume_runs = tuple(args.resume_runs.split(","))
    ctx.attention_brief = args.attention_brief
    if set(ctx.resume_runs) - set(resume_runs()):
        p.error(f"unknown --resume-runs {args.resume_runs!r}; known: {', '.join(resume_runs())}")
    failed = 0
    for name in names:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = SECTIONS[name](ctx)
        except (Exception, SystemExit) as e:  # SystemExit: train.py's or evaluate.py's own error exits
            failed += 1
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        result["section_s"] = round(time.perf_counter() - t, 1)
        ctx.report["sections"][name] = result
        print(json.dumps(result, indent=1, default=str), flush=True)
        ctx.write()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"report in {args.out}; {failed} section(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
