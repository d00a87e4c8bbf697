"""Forward+backward throughput of model.py against transformers' Qwen2ForCausalLM, same weights, same tokens.

    python bench/bench_model.py            # CPU: a small and a toy config, fp32
    python bench/bench_model.py --gpu      # GPU: Qwen2.5-Math-1.5B config, bf16, 4k and 16k tokens

Each row times `loss.backward()` from token ids to parameter gradients, alternating implementations, and
reports the median. "logits" rows compute cross-entropy from full logits in both implementations (identical
work); "hidden" is our training path: final hidden states -> chunked token log-probs (losses.token_logprobs),
never holding (T, vocab) fp32 logits. On the GPU transformers runs its own loss (`labels=`) with sdpa.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import losses  # noqa: E402
import model as M  # noqa: E402


def hf_from_ours(ours: M.Qwen2ForCausalLM, path: Path, dtype: torch.dtype, device: str):
    M.save_pretrained(ours, path)
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(cases: dict, tokens: int, device: str, warmup: int, iters: int) -> dict:
    """Time each case alternately (so drift in machine load hits all equally); median seconds and peak GiB."""
    times = {name: [] for name in cases}
    peak = {}
    for i in range(warmup + iters):
        for name, fn in cases.items():
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            dt = timed(fn, device)
            if i >= warmup:
                times[name].append(dt)
            if device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
    return {name: (tokens / statistics.median(ts), peak.get(name)) for name, ts in times.items()}


def step_logits(model, ids, hf: bool):
    def fn():
        logits = model(ids).logits if hf else model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    return fn


def step_hf_loss(model, ids):
    def fn():
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return fn


def step_hidden(model, ids, position_ids=None):
    def fn():
        hidden = model(ids, position_ids=position_ids, return_hidden=True)  # (B, T, H)
        logp = losses.token_logprobs(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, ids[:, 1:].flatten())
        (-logp.mean()).backward()
        model.zero_grad(set_to_none=True)
    return fn


def report(title: str, results: dict, reference: str) -> None:
    print(f"\n{title}")
    ref = results[reference][0]
    for name, (tps, peak) in results.items():
        mem = f"  peak {peak:6.2f} GiB" if peak is not None else ""
        print(f"  {name:<34} {tps:10.0f} tok/s  {tps / ref:5.2f}x{mem}")


def cpu(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    sizes = {"small": (dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=2), 2, 512),
             "toy": (dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2), 8, 128)}
    for size, (cfg, B, T) in sizes.items():
        config = M.Qwen2Config(**cfg, tie_word_embeddings=True)
        ours = M.build_model(config, seed=0)
        hf = hf_from_ours(ours, Path(args.tmp) / f"bench-cpu-{size}", torch.float32, "cpu")
        ids = torch.randint(0, config.vocab_size, (B, T))
        results = run({"transformers (logits + CE)": step_logits(hf, ids, hf=True),
                       "ours (logits + CE)": step_logits(ours, ids, hf=False),
                       "ours (hidden + chunked logprobs)": step_hidden(ours, ids)},
                      B * T, "cpu", args.warmup, args.iters)
        report(f"CPU fp32 {size}: {torch.get_num_threads()} threads, hidden {config.hidden_size} x "
               f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, batch {B} x {T} tokens, "
               f"torch {torch.__version__}, transformers {transformers.__version__}",
               results, "transformers (logits + CE)")


def gpu(args) -> None:
    config = M.Qwen2Config.from_pretrained(ROOT / "tests" / "fixtures" / "qwen2.5-math-1.5b")
    config.rope_theta, config.max_position_embeddings = 300000.0, 32768  # the recipe's two edits
    ours = M.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    hf = hf_from_ours(ours, Path(args.tmp) / "bench-gpu", torch.bfloat16, "cuda").train()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    for T, ac in ((4096, False), (16384, True)):
        ids = torch.randint(0, config.vocab_size, (1, T), device="cuda")
        docs = torch.arange(T, device="cuda") % (T // 4)  # the same tokens packed as 4 documents
        if ac:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for i, layer in enumerate(ours.model.layers):
                ours.model.layers[i] = checkpoint_wrapper(layer)
        results = run({"transformers sdpa (labels= loss)": step_hf_loss(hf, ids),
                       "ours (logits + CE)": step_logits(ours, ids, hf=False),
                       "ours (hidden + chunked logprobs)": step_hidden(ours, ids),
                       "ours packed 4 docs (flex)": step_hidden(ours, ids, docs[None])},
                      T, "cuda", args.warmup, args.iters)
        report(f"1.5B bf16, 1 x {T} tokens, activation checkpointing {'on' if ac else 'off'}",
               results, "transformers sdpa (labels= loss)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the 1.5B bf16 GPU benchmark (needs CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--tmp", default="/tmp", help="where the shared weights are saved for transformers to load")
    args = p.parse_args()
    torch.manual_seed(0)
    gpu(args) if args.gpu else cpu(args)
