"""Training throughput of train.py: against a plain transformers loop on CPU; tokens/s, MFU and memory on GPU.

    python bench/bench_train.py            # CPU: toy SFT data, a small Qwen2, ours vs a transformers loop
    python bench/bench_train.py --gpu      # GPU: Qwen2.5-Math-1.5B config, random weights, packed 16k-token
                                           # micro-batches with activation checkpointing, SFT and REDI

CPU: both train the same model from the same weights on the same examples of each step (our Loader's
order), fp32, AdamW with the same settings. Ours is train.py itself (FSDP2 with one rank, packed rows, the
head on response tokens only); the reference is the usual transformers loop: right-padded batches with
`labels` (-100 on prompt and padding) and its built-in loss. Tokens/s counts real (non-padding) tokens in
both. GPU: train.py's own metrics (tokens/s, MFU by its 6N + 12LdT formula, peak memory) on synthetic
token ids with a realistic spread of lengths, after warm-up steps.
"""

import argparse
import gzip
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
from bench_data import scratch_dir  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402


def median_tokens_per_s(out: Path, skip: int) -> tuple[float, list[dict]]:
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in log[skip:]), log[skip:]


def cpu(args) -> None:
    tmp = scratch_dir(args.tmp, "bench-train-")
    D.toy_corpus(tmp / "toy", n_train=2000, n_test=10)
    D.prepare([tmp / "toy" / "raw"], tmp / "toy" / "model", tmp / "data", log=lambda *a: None)
    vocab = M.Qwen2Config.from_pretrained(tmp / "toy" / "model").vocab_size
    config = M.Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=1024)
    M.save_pretrained(M.build_model(config, seed=0), tmp / "base", tokenizer_from=tmp / "toy" / "model")
    steps, batch, warmup = args.steps, 32, 3

    T.main(["--stage", "sft", "--model", str(tmp / "base"), "--data", str(tmp / "data"), "--out", str(tmp / "ours"),
            "--batch-size", str(batch), "--max-len", "256", "--micro-tokens", "4096", "--max-steps", str(steps),
            "--save-every", "0",
            "--log-every", "1000", "--lr", "1e-3"])
    ours, log = median_tokens_per_s(tmp / "ours", warmup)

    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32,
                                                       attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    data = D.TokenData(tmp / "data", "sft")
    loader = D.Loader(data, batch_size=batch, max_tokens=256, max_len=256, seed=42)
    times, tokens = [], []
    for step in range(steps):
        seqs = [(np.concatenate([p, r]).astype(np.int64), len(p)) for e in loader.step_examples(0, step)
                for p, r in data.docs(int(e))]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), data.manifest["eos_id"], dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (s, n_prompt) in enumerate(seqs):
            ids[i, :len(s)] = torch.from_numpy(s)
            labels[i, n_prompt:len(s)] = torch.from_numpy(s[n_prompt:])
            mask[i, :len(s)] = 1
        t = time.perf_counter()
        hf(ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        tokens.append(int(mask.sum()))
    theirs = statistics.median(n / dt for n, dt in zip(tokens[warmup:], times[warmup:]))
    n = M.build_model(config, device="meta").num_parameters()
    gflops = lambda tps: tps * 6 * n / 1e9  # noqa: E731  (attention is a few % at ~100-token sequences)
    print(f"CPU fp32, {torch.get_num_threads()} threads, {n:,}-parameter Qwen2 (hidden 256 x 4 layers), toy SFT data "
          f"(~{int(np.mean(tokens))} real tokens per step of {batch} sequences), median of steps {warmup + 1}-{steps}:")
    print(f"  transformers loop (padded batches, labels= loss): {theirs:10,.0f} tok/s  ~{gflops(theirs):.1f} GFLOP/s")
    print(f"  train.py (FSDP2 x1, packed rows, chunked head):    {ours:10,.0f} tok/s  ~{gflops(ours):.1f} GFLOP/s  "
          f"{ours / theirs:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


def realistic_lengths(n: int, parts: int, seed: int = 0) -> np.ndarray:
    """(n, parts) token counts: prompts of 100-800 tokens, responses log-uniform in 1k-15k, like reasoning traces."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(100, 800, size=(n, 1)),
                           np.exp(rng.uniform(np.log(1000), np.log(15000), size=(n, parts - 1))).astype(int)], 1)


def synthetic_prepared(out: Path, tokenizer: Path, kind: str, lengths: np.ndarray) -> None:
    """A prepared directory of random token ids with the given (n, parts) lengths, so the GPU benchmark
    needs no corpus download."""
    out.mkdir(parents=True)
    starts = np.concatenate([[0], np.cumsum(lengths.sum(1))[:-1]])
    np.save(out / f"{kind}.index.npy", np.concatenate([starts[:, None], lengths], 1).astype(np.int64))
    np.random.default_rng(0).integers(0, 151000, size=int(lengths.sum()), dtype=np.uint32).tofile(
        out / f"{kind}.tokens.bin")
    other = "pref" if kind == "sft" else "sft"
    np.save(out / f"{other}.index.npy", np.zeros((0, 3 if other == "sft" else 4), dtype=np.int64))
    (out / f"{other}.tokens.bin").write_bytes(b"")
    manifest = {"format": D.FORMAT_VERSION, "inputs": "synthetic",
                "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                "n_tokens": {kind: int(lengths.sum()), other: 0}, "eos_id": 151643, "im_end_id": 151645}
    (out / "manifest.json").write_text(json.dumps(manifest))


def gpu(args) -> None:
    tmp = scratch_dir(args.tmp, "bench-train-")
    (tmp / "base").mkdir(parents=True)
    fixture = ROOT / "tests" / "fixtures" / "qwen2.5-math-1.5b"
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.json").write_bytes(gzip.decompress((fixture / "tokenizer.json.gz").read_bytes()))
    config = M.Qwen2Config.from_pretrained(fixture)
    config.rope_theta, config.max_position_embeddings = 300000.0, 32768
    M.save_pretrained(M.build_model(config, dtype=torch.bfloat16, seed=0), tmp / "base", tokenizer_from=tmp / "tok")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    runs = [("sft", "sft", 16, realistic_lengths(256, 2), 16384),
            ("redi", "pref", 8, realistic_lengths(256, 3), 16384),
            ("sft", "sft", 1, np.array([[500, 32268]] * 8), 32768)]  # the longest sequence the recipe allows
    for i, (stage, kind, batch, lengths, budget) in enumerate(runs):
        synthetic_prepared(tmp / f"data-{i}", tmp / "tok" / "tokenizer.json", kind, lengths)
        out = tmp / f"run-{i}"
        T.main(["--stage", stage, "--model", str(tmp / "base"), "--data", str(tmp / f"data-{i}"), "--out", str(out),
                "--batch-size", str(batch), "--micro-tokens", str(budget), "--max-len", str(budget // (1 if kind == "sft" else 2)),
                "--truncate", "--max-steps", str(args.steps), "--save-every", "0", "--log-every", "1"])
        tps, log = median_tokens_per_s(out, skip=2)
        mfu = statistics.median(r["mfu"] for r in log)
        peak = max(r["peak_mem_gib"] for r in log)
        print(f"  {stage}, micro-batches of {budget} tokens: {tps:,.0f} tok/s, MFU {100 * mfu:.1f}%, peak {peak:.1f} GiB "
              f"(bf16, activation checkpointing)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tmp", help="where to make the scratch directory, removed at the end (default: the system's "
                                 "temporary directory)")
    args = p.parse_args()
    gpu(args) if args.gpu else cpu(args)
