"""Memory and throughput of `data.py prepare` on a large synthetic raw corpus, with the real Qwen tokenizer.

    python bench/bench_data.py                       # 200k rows x 4 generations of ~3,000 characters
    python bench/bench_data.py --rows 50000          # a smaller input: peak memory should not change

Writes a raw OpenR1-schema parquet file (in row groups, so writing it is bounded too), runs
`python data.py prepare` on it in a child process and reports the child's wall time, peak RSS, rows/s and
tokens/s. In the same run it times tokenization of a sample of traces two ways: `encode_batch` (what prepare
uses) and a plain per-example `encode` loop.
"""

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("we", "have", "the", "so", "then", "therefore", "let", "equation", "solve", "for", "x", "=", "+", "-",
         "\\frac{1}{2}", "\\sqrt{3}", "$", "(", ")", "3", "17", "250", "0.5", "since", "which", "gives", "wait,",
         "check", "again", "triangle", "angle", "\\cdot", "\\pi", "n", "k", "sum", "of", "is", "not", "\n", "\n\n")


def scratch_dir(parent: str | None, prefix: str) -> Path:
    """A new scratch directory under `parent` (default: the system's temporary directory) for the caller to
    remove: never the directory the user named, which may hold their files."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def write_raw(path: Path, rows: int, gen_chars: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(WORDS, size=4_000_000))  # generations are random windows of this text
    schema = pa.schema([("problem", pa.string()), ("problem_is_valid", pa.string()), ("source", pa.string()),
                        ("generations", pa.list_(pa.string())),
                        ("correctness", pa.struct([("llama_verification", pa.list_(pa.bool_())),
                                                   ("math_verify_reparsed_answer", pa.list_(pa.bool_()))]))])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            offsets = rng.integers(0, len(text) - 2 * gen_chars, size=(n, 5))
            lengths = rng.integers(gen_chars // 2, 3 * gen_chars // 2, size=(n, 5))
            w.write_table(pa.table({
                "problem": [text[o:o + 300] for o in offsets[:, 4]],
                "problem_is_valid": rng.choice(["Yes", "No"], size=n, p=[0.95, 0.05]),
                "source": rng.choice(["olympiads", "amc_aime", "cn_k12"], size=n, p=[0.6, 0.2, 0.2]),
                "generations": [["<think>\n" + text[o:o + ln] for o, ln in zip(offsets[i, :4], lengths[i, :4])]
                                for i in range(n)],
                "correctness": [{"llama_verification": list(map(bool, rng.random(4) < 0.5)),
                                 "math_verify_reparsed_answer": list(map(bool, rng.random(4) < 0.8))}
                                for _ in range(n)]}, schema=schema))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--gen-chars", type=int, default=3000, help="mean characters per generation")
    p.add_argument("--tmp", help="where to make the scratch directory, removed at the end (default: the system's "
                                 "temporary directory)")
    p.add_argument("--sample", type=int, default=2000, help="traces in the tokenization comparison")
    args = p.parse_args()

    tmp = scratch_dir(args.tmp, "bench-data-")
    (tmp / "model").mkdir()
    fixture = ROOT / "tests" / "fixtures" / "qwen2.5-math-1.5b"
    shutil.copy(fixture / "config.json", tmp / "model" / "config.json")
    (tmp / "model" / "tokenizer.json").write_bytes(gzip.decompress((fixture / "tokenizer.json.gz").read_bytes()))
    t = time.time()
    write_raw(tmp / "raw.parquet", args.rows, args.gen_chars)
    size = (tmp / "raw.parquet").stat().st_size
    meta = pq.ParquetFile(tmp / "raw.parquet").metadata
    raw_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    print(f"synthetic raw: {args.rows:,} rows, {size / 2**30:.2f} GiB on disk, {raw_bytes / 2**30:.2f} GiB "
          f"uncompressed ({time.time() - t:.0f}s to write)")

    t = time.time()
    subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--raw", str(tmp / "raw.parquet"),
                    "--model", str(tmp / "model"), "--out", str(tmp / "out")], check=True)
    wall = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    tokens = sum(manifest["n_tokens"].values())
    print(f"prepare: {wall:.0f}s, peak RSS {peak:.2f} GiB, {args.rows / wall:,.0f} raw rows/s, "
          f"{tokens / wall:,.0f} tokens/s written ({tokens:,} tokens)")

    tok = Tokenizer.from_file(str(tmp / "model" / "tokenizer.json"))
    texts = pq.read_table(tmp / "out" / "sft.parquet", columns=["response"]).slice(0, args.sample)["response"].to_pylist()
    t = time.time()
    batch = tok.encode_batch(texts, add_special_tokens=False)
    t_batch = time.time() - t
    t = time.time()
    loop = [tok.encode(s, add_special_tokens=False) for s in texts]
    t_loop = time.time() - t
    assert [e.ids for e in batch] == [e.ids for e in loop]
    n = sum(len(e.ids) for e in batch)
    print(f"tokenize {len(texts)} traces ({n:,} tokens): encode_batch {n / t_batch:,.0f} tok/s, per-example "
          f"encode loop {n / t_loop:,.0f} tok/s ({t_loop / t_batch:.2f}x)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
