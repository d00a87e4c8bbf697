"""Generated tokens/s of sample.py against transformers' generate, same model, prompts and settings, one run.

    python bench/bench_sample.py            # CPU: a small config, batch 1 and 16
    python bench/bench_sample.py --gpu      # GPU: Qwen2.5-Math-1.5B config, bf16, batch 1, 64, 256 with ~1k-token
                                            # prompts, and a long-tail workload

Weights are random, so every run decodes to max_new_tokens (no stop token is ever produced) and both sides
do the same work, except in the long-tail workload, where 64 random token ids count as stop tokens and
temperature-1 sampling ends sequences after geometrically distributed lengths (a few reach the maximum):
there tokens/s is total generated tokens over wall time. Each case also prints the memory-bandwidth
roofline: bytes read per decode step (weights, plus the KV cache at the mean context) over the device's
measured copy bandwidth, as generated tokens/s.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

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


def device_cases(ours, hf, device, tiny: bool = False) -> dict:
    """The GPU cases (bench/gpu.py's sampler section): batch 1 with a 1k-token prompt, batch 64 and 256 at
    ~8k context. tiny: the same cases scaled down for a CPU smoke test."""
    g = torch.Generator().manual_seed(0)
    bw = bandwidth(device)
    V = ours.config.vocab_size
    cases = ([(1, 64, 8), (4, 128, 8), (8, 128, 4)] if tiny
             else [(1, 1000, 128), (64, 8000, 32), (256, 8000, 16)])  # (batch, prompt tokens, new tokens)
    r = {"copy_gb_s": bw / 1e9}
    for B, prompt_len, new in cases:
        name = f"batch {B}, {prompt_len}-token prompts, {new} new tokens"
        prompts = torch.randint(10, V - 10, (B, prompt_len), generator=g).tolist()
        try:
            r[name] = compare(name, ours, hf, prompts, new, device, bw, 1 if B > 1 else 2, hf_batch=min(B, 64),
                              **({"kv_gib": 0.05} if tiny else {}))
        except Exception as e:  # an out-of-memory error at one size should not hide the others
            r[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {r[name]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    bw = bandwidth(device)
    print(f"GPU {torch.cuda.get_device_name()}, bf16, Qwen2.5-Math-1.5B config (random weights), ~1k-token prompts, "
          f"measured copy bandwidth {bw / 1e9:.0f} GB/s")
    for B, new in ((1, 256), (64, 256), (256, 256)):
        prompts = torch.randint(10, 150000, (B, 1000), generator=g).tolist()
        compare(f"batch {B}, {new} new tokens", ours, hf, prompts, new, device, bw, args.repeats)
    stops = torch.randint(10, 150000, (64,), generator=g).tolist()  # ~0.04% per token: mean length ~2,400
    prompts = torch.randint(10, 150000, (256, 1000), generator=g).tolist()
    compare("long tail: 256 x up to 4096, T=1, 64 slots", ours, hf, prompts, 4096, device, bw, 1, stop_ids=stops,
            temperature=1.0, hf_batch=64, max_slots=64)


if __name__ == "__main__":
    main()
