"""Generated tokens/s of sample.py against transformers' generate, same model, prompts and settings, one run.

    python bench/bench_sample.py            # CPU: a small config, batch 1 and 16
    python bench/bench_sample.py --gpu      # GPU: Qwen2.5-Math-1.5B config, bf16: decode at batch 1 (1k-token
                                            # prompt), 64 and 256 (~8k context), and the long-tail workload
                                            # (also bench/gpu.py's sampler section)

Weights are random, so every run decodes to max_new_tokens (no stop token is ever produced) and both sides
do the same work. CPU: whole generate calls timed, and a long-tail case where 128 random token ids count as
stop tokens (temperature-1 sampling ends sequences after geometrically distributed lengths). GPU: decode
throughput alone (prefill excluded on both sides) at the evaluation's settings, and a long-tail workload
with imposed trace lengths (see `long_tail`), from which the paper's evaluation protocol is projected. Each
case prints the memory-bandwidth roofline: bytes read per decode step (weights, plus every row's KV cache at
the mean context) over the device's measured copy bandwidth, as generated tokens/s.
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.nn.attention import sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import sample as S  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device) -> float:
    """Measured bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - t)


def roofline(model, batch: int, context: float, bw: float) -> float:
    """Generated tokens/s if each decode step only had to read the weights once and every sequence's KV."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * context * S.PagedKVCache.bytes_per_token(model.config, next(model.parameters()).dtype)
    return batch / ((weight_bytes + kv_bytes) / bw)


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def useful_tokens(out: torch.Tensor, stop_ids) -> int:
    """Generated tokens up to and including each row's first stop token (the rest is padding)."""
    is_stop = torch.isin(out, torch.tensor(list(stop_ids) or [-1], device=out.device))
    before = is_stop.int().cumsum(1) - is_stop.int()  # stops strictly before each position
    return int((before == 0).sum())


def compare(name, ours, hf, prompts, new_tokens, device, bw, repeats, stop_ids=(), temperature=0.0, hf_batch=None,
            **sampler_kw):
    """transformers runs static batches of hf_batch prompts (default: all at once), as a user of generate does."""
    B = len(prompts)
    hf_batch = hf_batch or B
    gen_kw = dict(max_new_tokens=new_tokens, do_sample=temperature > 0, pad_token_id=0,
                  eos_token_id=list(stop_ids) or None)
    if temperature > 0:
        gen_kw |= dict(temperature=temperature, top_p=1.0, top_k=0)
    counts = {}

    def run_hf():
        counts["hf"] = 0
        for start in range(0, B, hf_batch):
            ids = torch.tensor(prompts[start:start + hf_batch], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **gen_kw)[:, ids.shape[1]:]
            counts["hf"] += useful_tokens(out, stop_ids)

    def run_ours():
        outs = S.generate(ours, prompts, max_new_tokens=new_tokens, temperature=temperature, stop_ids=stop_ids,
                          **sampler_kw)
        counts["ours"] = sum(len(o) for o in outs)

    t_hf, t_ours = timed(run_hf, device, repeats), timed(run_ours, device, repeats)
    tps_hf, tps_ours = counts["hf"] / t_hf, counts["ours"] / t_ours
    slots = min(B, sampler_kw.get("max_slots", B))
    context = len(prompts[0]) + counts["ours"] / B / 2  # mean context over the run
    roof = roofline(ours, slots, context, bw)
    print(f"  {name:<38} transformers {tps_hf:9,.0f} tok/s | ours {tps_ours:9,.0f} tok/s ({tps_ours / tps_hf:5.2f}x) "
          f"| roofline at {slots} slots {roof:9,.0f} tok/s ({100 * tps_ours / roof:.0f}%)", flush=True)
    return {"transformers_tok_s": tps_hf, "ours_tok_s": tps_ours, "speedup": tps_ours / tps_hf,
            "roofline_tok_s": roof, "of_roofline": tps_ours / roof}


def setup(config, device, dtype, tmp: Path):
    ours = M.build_model(config, device=device, dtype=dtype, seed=0).eval()
    M.save_pretrained(ours, tmp, dtype=dtype)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return ours, hf


def decode_rate_hf(hf, prompts, new: int, device, sdpa_backends=None, **sampling) -> float:
    """transformers' decode tokens/s: generate(new + 1) minus generate(1) (prefill and first token), over the
    B * new tokens decoded in between. sdpa_backends: the SDPA kernels it may use (default: torch's choice)."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, **sampling)
    with sdpa_kernel(sdpa_backends) if sdpa_backends else contextlib.nullcontext():
        t_one = timed(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), device, 1)
        sync(device)
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, **kw)
        sync(device)
    return len(prompts) * new / (time.perf_counter() - t - t_one)


def pool_for(model, rows: int, context: int, block_size: int = 128, sync_every: int = 16) -> float:
    """GiB of KV pool that holds `rows` sequences of `context` tokens at once: each row's blocks, its growth
    until the next synchronization and the copy of its prompt's partial last block."""
    blocks = rows * (math.ceil((context + sync_every + 1) / block_size) + 1) + 1  # + the scratch block
    per_token = S.PagedKVCache.bytes_per_token(model.config, next(model.parameters()).dtype)
    return blocks * block_size * per_token / 2**30


def decode_rate_ours(model, prompts, new: int, params_kw: dict, **sampler_kw) -> dict:
    """Our decode tokens/s: tokens decoded over the time spent decoding (prefill excluded, as for
    transformers), after a warm-up run of the same batch size that compiles and captures what it needs; the
    seconds of compiling and capturing the timed run still did (excluded from the rate; 0 when the warm-up
    covered it); the mean rows decoded per step, the seconds per step, the preemptions, and the tokens of the
    timed run (by prompt). Until 2026-11-26 the warm-up's other length limit made the timed run capture its
    graph again, inside the timed time.

    On GPU the KV pool is sized to hold every row at once (at most 90% of free memory): with the default
    (70% of free memory) 256 rows of 8k tokens did not fit an H100 beside transformers' copy of the model,
    so that case ran ~220 rows and then the rest as a small batch, and reported neither."""
    if next(model.parameters()).is_cuda and "kv_gib" not in sampler_kw:
        need = pool_for(model, len(prompts), len(prompts[0]) + new + 1)
        sampler_kw["kv_gib"] = min(need, 0.9 * S.free_device_memory(next(model.parameters()).device) / 2**30)
    sampler = S.Sampler(model, max_slots=len(prompts), **sampler_kw)
    list(sampler.stream([p[:16] for p in prompts], S.SamplingParams(2 * sampler.sync_every + 1, **params_kw)))
    sampler.generated, sampler.decode_s, sampler.capture_s = 0, 0.0, 0.0
    sampler.steps_decoded, sampler.rows_decoded, sampler.preemptions = 0, 0, 0
    out = sorted(sampler.stream(prompts, S.SamplingParams(new + 1, **params_kw)))
    decode_s = sampler.decode_s - sampler.capture_s
    return {"tokens": [t for _, _, t in out], "tok_s": sampler.generated / decode_s, "capture_s": sampler.capture_s,
            "mean_rows": sampler.rows_decoded / sampler.steps_decoded, "step_s": decode_s / sampler.steps_decoded,
            "preemptions": sampler.preemptions, "kv_gib": sampler_kw.get("kv_gib")}


class ImposedLengths(S.Sampler):
    """Random weights never say stop: sequence i ends after targets[i] tokens, as a real trace would."""

    def __init__(self, model, targets, **kw):
        super().__init__(model, **kw)
        self.targets = targets

    def _done(self, seq, params):
        return len(seq.tokens) >= self.targets[seq.prompt]


def trace_lengths(rng, n: int, mean: float, cap: int) -> np.ndarray:
    """Lengths of reasoning traces: lognormal (sigma 0.9) with the given mean before capping at `cap`
    (with mean 5.5k, 0.75% reach the 32k cap)."""
    sigma = 0.9
    return np.minimum(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n), cap).astype(int) + 1


def in_flight(rng, slots: int, tiny: bool) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Sequences in flight mid-run on reasoning-trace lengths (trace_lengths, mean 5,500 and cap 32,768; tiny:
    40 and 160): each slot's trace drawn length-biased (a long trace holds its slot longer) and the tokens of it
    already done, part-way through; with the mean and cap."""
    mean, cap = (40, 160) if tiny else (5500, 32768)
    pool = trace_lengths(rng, 100_000, mean, cap)
    first = rng.choice(pool, size=slots, p=pool / pool.sum())  # length-biased
    return first, (rng.uniform(size=slots) * first).astype(int), mean, cap


def long_tail(model, device, tiny: bool, batch1_step_s: float | None, sampler_kw: dict) -> dict:
    """Steady-state throughput on reasoning-trace lengths, and the projected wall time of the paper's protocol.

    The slots start as they are mid-run: their sequences drawn length-biased (a long trace holds its slot
    longer) and each already part-way through (the done part is its prompt, prefilled before timing); then
    every finished sequence is replaced by a fresh one (150-token prompt, a new trace length). Timed over a
    window of decoding; tokens/s counts the refills' prefills, the host's bookkeeping and the decode, not the
    one-time compiling and capturing of a batch-size bucket first met in the window (reported apart)."""
    slots, window = (8, 3.0) if tiny else (256, 30.0)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    first, done, mean, cap = in_flight(rng, slots, tiny)
    fresh = trace_lengths(rng, 50 * slots, mean, cap)
    targets = list(first - done) + list(fresh)
    prompts = [rng.integers(10, V - 10, 150 + d).tolist() for d in done] + \
        [rng.integers(10, V - 10, 150).tolist() for _ in fresh]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = ImposedLengths(model, targets, max_slots=slots, **sampler_kw)
    params = S.SamplingParams(cap + 1, temperature=0.6, top_p=0.95)
    stream = sampler.stream(prompts, params)
    t0 = time.perf_counter()
    finished = 0
    for _ in stream:  # the first yield comes after the slots are filled and decoding runs
        if finished == 0:
            t0, base_tokens, base_decode = time.perf_counter(), sampler.generated, sampler.decode_s
            base_capture, base_steps, base_rows = sampler.capture_s, sampler.steps_decoded, sampler.rows_decoded
        finished += 1
        if sampler.decode_s - base_decode > window:
            break
    stream.close()
    capture = sampler.capture_s - base_capture  # a bucket first met in the window: once per run, not per token
    wall = time.perf_counter() - t0 - capture
    tokens = sampler.generated - base_tokens
    r = {"slots": slots, "window_s": wall, "capture_s_excluded": capture, "tokens": tokens, "finished": finished,
         "tok_s": tokens / wall, "decode_only_tok_s": tokens / (sampler.decode_s - base_decode - capture),
         "preemptions": sampler.preemptions, "kv_pool_tokens": (sampler.cache.n_blocks - 1) * sampler.cache.block_size,
         "mean_rows": (sampler.rows_decoded - base_rows) / max(1, sampler.steps_decoded - base_steps),
         "step_ms": 1e3 * (sampler.decode_s - base_decode - capture) / max(1, sampler.steps_decoded - base_steps)}
    if device.type == "cuda":  # how much of the device the default KV pool (70% of free memory) leaves unused
        r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        r["device_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    protocol = 24_960 * float(np.mean(trace_lengths(np.random.default_rng(1), 1_000_000, mean, cap)))
    r["protocol_tokens"] = protocol
    r["projected_h_8_gpus"] = protocol / (8 * r["tok_s"]) / 3600
    if batch1_step_s is not None:  # the last sequence of a rank may run alone: at most a full trace at batch 1
        r["tail_bound_h"] = cap * batch1_step_s / 3600
    print(f"  long tail ({slots} slots, lognormal mean {mean}, cap {cap}, KV pool {r['kv_pool_tokens']:,} tokens, "
          f"{sampler.preemptions} preemptions, {r['mean_rows']:.0f} rows per step of {r['step_ms']:.1f} ms): "
          f"{r['tok_s']:,.0f} tok/s over "
          f"{wall:.0f}s ({capture:.0f}s of capturing new buckets excluded); protocol ({protocol / 1e6:.0f}M tokens) on 8 GPUs: {r['projected_h_8_gpus']:.2f} h"
          f" + tail bound {r.get('tail_bound_h', float('nan')):.2f} h", flush=True)
    return r


def kernel_times(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of each kernel a torch.profiler run recorded. On CUDA, the device's kernels;
    record_function ranges also appear on the device timeline, as user annotations spanning their kernels,
    and are left out. On CPU, which has no kernels, each operator's own CPU time stands for them."""
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()]


def step_anatomy(model, device, sampling: dict, batch: int, prompt_len: int, captured: bool = False) -> dict:
    """Where a decode step's time goes at this batch and context, with the layers compiled: device kernels per
    step, their summed time and the top ones, from the difference of two profiled runs of 16 and 48 new
    tokens, so the prompts' prefill cancels. captured (GPU): the steps replayed from CUDA graphs, as the
    sampler runs them, captured before profiling starts (the profiler records a replay's kernels through
    CUPTI; the report says so if it saw fewer than two per layer); else launched one by one. Set beside the
    captured step's wall time, the kernel time tells launch gaps from slow kernels. On CPU it counts operator
    events instead."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    prompts = [list(range(10 + b, 10 + b + prompt_len)) for b in range(batch)]
    per_token = S.PagedKVCache.bytes_per_token(model.config, next(model.parameters()).dtype)
    kv_gib = batch * (prompt_len + 48 + 2 * 128) * per_token / 2**30  # each row, its growth and two partial blocks
    seen = {}
    for new in (16, 48):
        sampler = S.Sampler(model, max_slots=batch, cuda_graphs=captured, compile=True, sync_every=1,
                            kv_gib=kv_gib)
        params = S.SamplingParams(new, **sampling)
        list(sampler.stream(prompts, params))  # warm-up: compiles and captures what it needs
        sampler.generated = 0
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            list(sampler.stream(prompts, params))
            sync(device)
        by_name: dict[str, list] = {}  # kernel (operator on CPU) name: [count, microseconds]
        for name, us in kernel_times(prof, cuda):
            by_name.setdefault(name, [0, 0.0])
            by_name[name][0] += 1
            by_name[name][1] += us
        seen[new] = (sampler.generated, by_name)
        del sampler
    (gen16, few), (gen48, many) = seen[16], seen[48]
    if not many:
        raise RuntimeError("the profiler recorded no events of this device")
    steps = (gen48 - gen16) // batch
    per_step = {k: [(n - few.get(k, [0, 0.0])[0]) / steps, (us - few.get(k, [0, 0.0])[1]) / steps]
                for k, (n, us) in many.items()}
    top = sorted(per_step.items(), key=lambda kv: kv[1][1], reverse=True)[:15]
    r = {"steps": steps, "events_per_step": sum(n for n, _ in per_step.values()),
         "event_ms_per_step": sum(us for _, us in per_step.values()) / 1e3,
         "top_per_step": [{"name": k[:90], "calls": n, "us": us} for k, (n, us) in top]}
    if r["events_per_step"] < 2 * model.config.num_hidden_layers:  # a step runs several kernels per layer
        r["note"] = (f"the profiler saw {r['events_per_step']:.1f} kernels per decode step, not each of them"
                     + (" (CUDA graph replays)" if captured else ""))
    return r


def device_cases(ours, hf, device, tiny: bool = False, progress=None) -> dict:
    """The GPU cases (bench/gpu.py's sampler section), decode throughput at the evaluation's sampling settings
    (temperature 0.6, top-p 0.95) against transformers' generate and the HBM roofline: batch 1 with a
    1k-token prompt, batch 64 and 256 at ~8k context; then the long-tail workload. tiny: the same, scaled
    down for a CPU smoke test. progress: called with the results so far after each case."""
    g = torch.Generator().manual_seed(0)
    bw = bandwidth(device)
    V = ours.config.vocab_size
    sampling = dict(temperature=0.6, top_p=0.95)
    cases = ([(1, 64, 16), (8, 200, 16), (16, 200, 8)] if tiny
             else [(1, 1000, 128), (64, 8000, 64), (256, 8000, 32)])  # (batch, prompt tokens, new tokens)
    cases.insert(1, cases[0] + ({"compile": False},))  # batch 1 again, the layers uncompiled: what compiling gives
    # (on the same prompt: its tokens should be the compiled case's, up to a near-tie in the race rounding
    # differently, which random weights' near-flat logits make likely only after tens of steps)
    r = {"copy_gb_s": bw / 1e9}
    # transformers as torch picks its attention (cuDNN first on Hopper with torch 2.11; cuDNN builds a graph
    # for each new key length, and a decode step's is new at every step), and without cuDNN (model.py's choice)
    hf_rate, hf_no_cudnn, step_s = {}, {}, {}  # step_s: seconds per captured decode step, by batch
    compiled_tokens = None  # the last compiled case's tokens (batch 1 when the uncompiled case reads them)
    mode = {"kv_gib": 0.05, "compile": True} if tiny else {}  # tiny (CPU): the GPU default, compiled layers
    # on a first GPU run, what fails is recorded and the case measured again without it: the compiled layers
    # first, then CUDA graphs
    fallbacks = [{"compile": False}, {"compile": False, "cuda_graphs": False}] if device.type == "cuda" else []
    for B, prompt_len, new, *extra in cases:
        extra = extra[0] if extra else {}
        name = f"batch {B}, {prompt_len}-token prompts, {new} new tokens" + (", layers uncompiled" if extra else "")
        if not extra:
            prompts = torch.randint(10, V - 10, (B, prompt_len), generator=g).tolist()
        try:
            hf_B = min(B, 64)  # transformers runs a batch of 256 x 8k as 4 batches of 64 (fits in memory)
            if hf_B not in hf_rate:
                hf_rate[hf_B] = decode_rate_hf(hf, prompts[:hf_B], new, device, do_sample=True, top_k=0, **sampling)
                if device.type == "cuda":
                    try:  # (its failure must not hide ours)
                        hf_no_cudnn[hf_B] = decode_rate_hf(hf, prompts[:hf_B], new, device, M._CUDA_SDPA_BACKENDS,
                                                           do_sample=True, top_k=0, **sampling)
                    except Exception as e:
                        r.setdefault("transformers_no_cudnn_errors", []).append(f"{type(e).__name__}: {str(e)[:500]}")
                        torch.cuda.empty_cache()
            while True:
                try:
                    got = decode_rate_ours(ours, prompts, new, sampling, **(mode | extra))
                    break
                except Exception as e:
                    if not fallbacks or isinstance(e, torch.cuda.OutOfMemoryError):  # memory is no compile error
                        raise
                    r.setdefault("fallback_errors", []).append(f"{type(e).__name__}: {str(e)[:1500]}")
                    mode |= fallbacks.pop(0)
                    print(f"  {name}: failed ({type(e).__name__}: {str(e)[:300]}); again with {mode}", flush=True)
                    torch.cuda.empty_cache()
            ours_tps = got["tok_s"]
            roof = roofline(ours, B, prompt_len + new / 2, bw)
            cuda = device.type == "cuda"
            r[name] = {"cuda_graphs": mode.get("cuda_graphs", cuda),
                       "compiled_layers": (mode | extra).get("compile", mode.get("cuda_graphs", cuda)),
                       "transformers_tok_s": hf_rate[hf_B], "transformers_batch": hf_B, "ours_tok_s": ours_tps,
                       "speedup": ours_tps / hf_rate[hf_B], "roofline_tok_s": roof, "of_roofline": ours_tps / roof,
                       "capture_s_excluded": got["capture_s"], "mean_rows": got["mean_rows"],
                       "step_ms": 1e3 * got["step_s"], "preemptions": got["preemptions"], "kv_gib": got["kv_gib"]}
            no_cudnn = ""
            if hf_B in hf_no_cudnn:
                r[name] |= {"transformers_no_cudnn_tok_s": hf_no_cudnn[hf_B],
                            "speedup_vs_no_cudnn": ours_tps / hf_no_cudnn[hf_B]}
                no_cudnn = f", without cuDNN attention {hf_no_cudnn[hf_B]:,.0f} tok/s"
            if not extra:
                step_s[B], compiled_tokens = got["step_s"], got["tokens"]
            elif compiled_tokens is not None:  # the compiled case's prompt, uncompiled
                r[name]["identical_tokens_with_compiled"] = next(
                    (i for i, (a, b) in enumerate(zip(got["tokens"][0], compiled_tokens[0])) if a != b), new + 1)
            print(f"  {name}: transformers (batch {hf_B}) {hf_rate[hf_B]:,.0f} tok/s{no_cudnn} | ours "
                  f"{ours_tps:,.0f} tok/s ({ours_tps / hf_rate[hf_B]:.2f}x"
                  + (f", {ours_tps / hf_no_cudnn[hf_B]:.2f}x" if no_cudnn else "")
                  + f") | roofline {roof:,.0f} tok/s ({100 * ours_tps / roof:.0f}%) | {got['mean_rows']:.0f} rows per "
                  f"step, {1e3 * got['step_s']:.2f} ms, {got['preemptions']} preemptions"
                  + (f", the compiled case's first {r[name]['identical_tokens_with_compiled']} tokens"
                     if "identical_tokens_with_compiled" in r[name] else ""), flush=True)
        except Exception as e:  # an out-of-memory error at one size should not hide the others
            r[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {r[name]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress(r)
    r["step_ms_by_batch"] = {B: 1e3 * s for B, s in step_s.items()}  # the compiled cases' (for anatomies)
    try:
        r["long tail"] = long_tail(ours, device, tiny, step_s.get(1), mode)
    except Exception as e:
        r["long tail"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  long tail: {r['long tail']['error']}", flush=True)
    if progress is not None:
        progress(r)
    return r


def anatomies(ours, device, tiny: bool = False, step_ms: dict[int, float] | None = None, progress=None) -> dict:
    """The kernels of a decode step (step_anatomy) at batch 1 with a 1k-token prompt and at batch 64 x 8k
    (tiny: 1 x 64 and 8 x 200), replayed from CUDA graphs as the sampler runs them (GPU); launched one by one
    on CPU, or where the replays' profile failed or showed no kernels. step_ms: the captured step's ms by
    batch, from device_cases, reported beside the kernel time (launch gaps against slow kernels). Apart from
    device_cases, so that a crash of the profiler or a time limit cannot cost the throughput figures."""
    sampling = dict(temperature=0.6, top_p=0.95)
    r = {}
    for B, prompt_len in ((1, 64), (8, 200)) if tiny else ((1, 1000), (64, 8000)):
        for captured in (True, False) if device.type == "cuda" else (False,):
            name = f"step anatomy, batch {B}, {'captured' if captured else 'uncaptured'}"
            try:
                anatomy = step_anatomy(ours, device, sampling, B, prompt_len, captured)
                if step_ms and B in step_ms:
                    anatomy["captured_step_ms"] = step_ms[B]  # the same step in a CUDA graph, from its case
            except Exception as e:
                anatomy = {"error": f"{type(e).__name__}: {e}"}
            r[name] = anatomy
            print(f"  {name}: {json.dumps(anatomy)}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress is not None:
                progress(r)
            if "error" not in anatomy and "note" not in anatomy:
                break
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", default="/tmp/bench-sample")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    if not args.gpu:
        device = torch.device("cpu")
        config = M.Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        ours, hf = setup(config, device, torch.float32, Path(args.tmp))
        bw = bandwidth(device)
        print(f"CPU fp32, {torch.get_num_threads()} threads, {ours.num_parameters():,} parameters (hidden 256 x 4), "
              f"64-token prompts, 128 new tokens, greedy; measured copy bandwidth {bw / 1e9:.1f} GB/s")
        for B in (1, 16):
            prompts = torch.randint(10, 8192, (B, 64), generator=g).tolist()
            compare(f"batch {B}, 128 new tokens", ours, hf, prompts, 128, device, bw, args.repeats, kv_gib=0.5)
        stops = torch.randint(10, 8192, (128,), generator=g).tolist()  # ~1.6% per token: mean length ~60
        prompts = torch.randint(10, 8192, (48, 64), generator=g).tolist()
        compare("long tail: 48 x up to 256, T=1, 16 slots", ours, hf, prompts, 256, device, bw, args.repeats,
                stop_ids=stops, temperature=1.0, hf_batch=16, max_slots=16, kv_gib=0.5)
        return
    device = torch.device("cuda")
    config = M.Qwen2Config.from_pretrained(ROOT / "tests" / "fixtures" / "qwen2.5-math-1.5b")
    config.rope_theta, config.max_position_embeddings = 300000.0, 32768
    ours, hf = setup(config, device, torch.bfloat16, Path(args.tmp))
    print(f"GPU {torch.cuda.get_device_name()}, bf16, Qwen2.5-Math-1.5B config (random weights)")
    r = device_cases(ours, hf, device)
    anatomies(ours, device, step_ms=r["step_ms_by_batch"])

if __name__ == "__main__":
    main()
