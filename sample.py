"""Batched sampling with a paged KV cache and continuous batching, on model.py.

    python sample.py --model runs/redi/final --prompt "What is 1+1?" --n 4 --temperature 0.6 --top-p 0.95 \\
        --max-new-tokens 2048

Reasoning traces run from hundreds to 32k tokens, so a static batch mostly waits for its longest member. Here
a fixed number of slots decode together and a finished slot takes the next waiting sequence at once. KV
memory is a pool of fixed-size blocks handed out as sequences grow (a paged cache), so memory follows actual
lengths; a prompt is prefilled once and its full blocks are shared by its n samples (each copies only the
partial last block). When the pool runs out, the newest sequence is preempted and recomputed later.

Randomness is counter-based: the token a sample draws at step t is an exponential race between the kept
tokens with noise from (seed, prompt key, sample index, t, token id) alone, never from the slot or batch it
ran in. A seed therefore gives the same outputs whatever the memory budget, the scheduling, a preemption, a
resumed evaluation or the number of GPUs, as long as the logits agree up to rounding far below the gap between
the race's top two candidates (and the winner is not within rounding of the top-k/top-p boundary): logits do
round differently per batch size (other GEMM kernels), and the race, unlike inverting a CDF over sorted tokens,
only notices at near-ties.

Public API: `generate(model, prompts, *, max_new_tokens, temperature, top_p, top_k, stop_ids, n, seed)`, and
`Sampler.stream(...)`, which yields each (prompt, sample) as soon as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import sys
import time
from collections import deque
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

import data as data_lib
import model as model_lib

# -----------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32); products stay below 2^59."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def exponentials(seed: int, prompt: Tensor, sample: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Exp(1) noise (B, V) float64 of every token id of every row, a function of (seed, prompt key, sample
    index, step, token id) alone, so a row gets the same noise in any batch. 52 random bits per token (two
    32-bit hashes): the race is won by a small E (about 1/V when the distribution is flat), which needs the
    fine grid of u near 1 to be exact; one 32-bit hash would round E to multiples of ~2^-32."""
    key = _hash32(_hash32(_hash32(_hash32(torch.full_like(prompt, seed & 0xFFFFFFFF)) ^ prompt) ^ sample) ^ step)
    token = torch.arange(vocab, device=prompt.device)  # (V,)
    hi = _hash32(_hash32(key ^ 0x9E3779B9)[:, None] ^ token)  # (B, V), 32 bits
    lo = _hash32(_hash32(key ^ 0x7F4A7C15)[:, None] ^ token) >> 12  # (B, V), 20 bits
    u = ((hi << 20 | lo).double() + 0.5) * 2.0**-52  # (B, V) in (0, 1), exactly
    return -u.log()


# Copies of each top-p histogram, interleaved by token id (see _nucleus): at most this many.
NUCLEUS_COPIES = 32


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Tokens (B, V) whose strictly more probable tokens hold less than top_p of the mass, by a radix select
    of the threshold probability t* (the smallest kept one) instead of a sort: kept <=> p >= t*.

    Masses are summed in 2^-52 fixed point, so sums are exact and do not depend on the order of summation.
    Non-negative floats order like their bit patterns (30 bits for p <= 1), so t* is found 10 bits at a time:
    a histogram of the mass per 10-bit digit among tokens sharing the digits found so far; the digit of t* is
    the lowest one whose mass above it (above the prefix, plus the higher digits' buckets) is below top_p.
    Three rounds of fixed-shape passes, no branch on values: ready for CUDA graphs.

    Each histogram is built as C copies, token v adding to copy v mod C, then summed (exact: integers). On a
    GPU a histogram is atomic adds, which serialize on one address, and a flat tail's ~150k tokens share a
    few buckets: with one copy the 32 lanes of a warp, adjacent token ids, mostly add to the same address.
    With 32 copies they add to 32 different ones. C is NUCLEUS_COPIES, but at most one copy per 1,024 tokens
    of the vocabulary, so the copies (B, C * 1024) never outgrow the masses (B, V)."""
    B, V = probs.shape
    C = max(1, min(NUCLEUS_COPIES, V // 1024))
    bits = probs.view(torch.int32).long()  # (B, V), ordered like probs
    mass = (probs.double() * 2.0**52).long()  # (B, V), fixed point
    limit = math.ceil(top_p * 2.0**52)  # mass < top_p <=> fixed-point mass < limit
    prefix = torch.zeros(B, 1, dtype=torch.long, device=probs.device)  # t*'s digits so far
    above = torch.zeros_like(prefix)  # mass of the tokens above the prefix's range, < limit
    offset = torch.arange(V, device=probs.device) % C * 1024  # (V,) where token v's copy starts
    for shift in (20, 10, 0):
        digit = (bits >> shift) & 1023  # (B, V)
        inside = (bits >> (shift + 10)) == prefix  # (B, V)
        copies = torch.zeros(B, C * 1024, dtype=torch.long, device=probs.device)
        copies.scatter_add_(1, digit + offset, mass.where(inside, 0))  # (B, C * 1024)
        hist = copies.view(B, C, 1024).sum(1)  # (B, 1024)
        over = above + hist.flip(-1).cumsum(-1).flip(-1) - hist  # (B, 1024) mass above each bucket, non-increasing
        d = (over >= limit).sum(-1, keepdim=True)  # (B, 1) the lowest bucket with over < limit (over[1023] = above)
        above = over.gather(1, d)
        prefix = prefix * 1024 + d
    return bits >= prefix


def kept_tokens(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """The tokens (B, V) a draw may return, defined without an order so that exactly tied tokens are kept or
    dropped together: top-k keeps every token whose score is at least the k-th largest; top-p then keeps a
    token iff the strictly more probable tokens of softmax(scores) restricted to top-k hold less than top_p of
    the mass. No full-vocabulary sort: top-k selects k values, top-p is a radix select."""
    keep = torch.ones_like(scores, dtype=torch.bool)  # (B, V)
    if 0 < top_k < scores.shape[-1]:
        keep = scores >= scores.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1:
        keep &= _nucleus(scores.masked_fill(~keep, float("-inf")).softmax(dim=-1), top_p)
    return keep


def draw(logits: Tensor, params: SamplingParams, prompt: Tensor, sample: Tensor, step: Tensor) -> Tensor:
    """Next tokens (B,) from logits (B, V) of rows identified by (prompt key, sample, step) (B,) each.

    Greedy at temperature 0. Otherwise an exponential race (Gumbel-max): the kept token maximizing
    logits / temperature - log E, with E ~ Exp(1) from `exponentials`. The winner is distributed exactly as
    softmax(logits / temperature) restricted to the kept tokens and renormalized, and it only changes when
    the logits move by as much as the gap between the race's top two candidates: rounding noise in the logits
    (another batch size, another kernel) changes a draw only at near-ties, unlike inverting a CDF, which
    any reordering of the tail shifts. Fixed-shape tensor ops only: no host synchronization."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature  # (B, V)
    race = scores.double() - exponentials(params.seed, prompt, sample, step, scores.shape[-1]).log()  # (B, V)
    if params.top_k or params.top_p < 1:
        race = race.masked_fill(~kept_tokens(scores, params.top_k, params.top_p), float("-inf"))
    return race.argmax(dim=-1)


# -----------------------------------------------------------------------------
# Paged KV cache


class PagedKVCache:
    """Keys and values in a pool of blocks of `block_size` positions: (L, Hkv, n_blocks * block_size, hd).

    The scheduler owns the bookkeeping (free list, reference counts, each sequence's block list) on the host
    and tells the cache what the next forward is: `prefill(slots)`, new prompts packed into one row whose
    tokens go to the given pool rows and attend within their own prompt; or `decode(table, attend)`, one new
    token per row at its position, attending to that row's cached positions (table: (B, width) block ids).

    Decoding reads the pool in one of two ways. In place (GPU): flex_attention over the whole pool with a
    block mask made from the page table and each row's length, so a row reads only its own blocks, up to its
    own length, with no copy and no mask tensor; its buffers have fixed addresses, so a decode step can be
    captured in a CUDA graph. By gathering (CPU): each row's positions are copied into a padded batch for SDPA
    with a boolean mask; there compiling flex_attention costs more than the copy. Both are exact.

    Block 0 is scratch: table padding points there. Attention reads the masked tail of a row's last block
    too, and 0 * NaN is NaN, so blocks are zeroed when handed out (in one write, before the next forward)
    rather than the whole pool up front: what a masked position holds is always finite, whatever an earlier
    owner of its block wrote. (Uncompiled flex_attention, the in-place path on CPU, reads the whole pool, so
    there the pool starts zeroed.)
    """

    def __init__(self, config: model_lib.Qwen2Config, n_blocks: int, block_size: int, *,
                 device: torch.device | str, dtype: torch.dtype, in_place: bool | None = None) -> None:
        self.device = torch.device(device)
        shape = (config.num_hidden_layers, config.num_key_value_heads, n_blocks * block_size, config.head_dim)
        self.in_place = self.device.type == "cuda" if in_place is None else in_place
        # uncompiled flex_attention (in place on CPU) reads the whole pool: it must be finite everywhere
        alloc = torch.zeros if self.in_place and self.device.type == "cpu" else torch.empty
        self.k = alloc(shape, device=device, dtype=dtype)
        self.v = alloc(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.group = config.num_attention_heads // config.num_key_value_heads  # queries per KV head in decoding
        self.free = list(range(n_blocks - 1, 0, -1))
        self.refs = [0] * n_blocks
        self.fresh = [0]  # blocks to zero before the next forward
        self._slots_written: Tensor | None = None  # prefill: the pool rows of the new tokens
        self.compile_decoding = False  # decode forwards run the layers compiled between attentions (the Sampler's)
        self.qkv_weights: list[tuple[Tensor, Tensor | None]] | None = None  # each layer's fused_qkv (the Sampler's)
        self.rows = 0  # decode buffers' capacity in rows (decode_buffers: once, by the Sampler)

    @staticmethod
    def bytes_per_token(config: model_lib.Qwen2Config, dtype: torch.dtype) -> int:
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize

    def allocate(self) -> int:
        block = self.free.pop()
        self.refs[block] = 1
        self.fresh.append(block)
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)

    def pool_rows(self, blocks: Tensor) -> Tensor:
        """Pool rows of whole blocks: (...,) block ids -> (..., block_size) positions in the pool."""
        return blocks[..., None] * self.block_size + torch.arange(self.block_size, device=blocks.device)

    def zero_fresh(self) -> None:
        if self.fresh:
            rows = self.pool_rows(torch.tensor(self.fresh, device=self.device)).flatten()
            self.k[:, :, rows] = 0
            self.v[:, :, rows] = 0
            self.fresh.clear()

    def copy_block(self, src: int) -> int:
        dst = self.allocate()
        self.fresh.remove(dst)
        rows = self.pool_rows(torch.tensor([src, dst], device=self.device))
        self.k[:, :, rows[1]] = self.k[:, :, rows[0]]
        self.v[:, :, rows[1]] = self.v[:, :, rows[0]]
        return dst

    # what the next forward is, set by the scheduler
    def prefill(self, slots: Tensor) -> None:
        """The next forward is a prefill of fresh prompts whose (T,) tokens go to these pool rows."""
        self._slots_written = slots

    def decode(self, table: Tensor, attend: int = 0) -> None:
        """The next forwards decode one token per row with these (B, width) block ids. attend (the gathering
        path only): how many positions the longest row reads, at least its length after the forward."""
        self._slots_written = None
        self.table, self.attend = table, attend

    def decode_buffers(self, rows: int) -> None:
        """Fixed-address decode buffers for up to `rows` rows (in place): the page table padded to the whole
        pool's width (the block mask's kv_indices) and each row's physical-to-logical block map (-1: not the
        row's). Allocated once: CUDA graphs captured on them keep their addresses."""
        if rows > self.rows:
            if self.rows:
                raise RuntimeError("decode buffers are allocated once, at the largest batch")
            self.rows = rows
            self.page_table = torch.zeros(rows, self.n_blocks, dtype=torch.int32, device=self.device)
            self.logical = torch.full((rows, self.n_blocks), -1, dtype=torch.int32, device=self.device)

    def set_pages(self, pages: Sequence[Sequence[int]]) -> None:
        """Fill the in-place decode buffers' first len(pages) rows with these block lists. Built from flat
        arrays, not a padded nested list: at 256 rows of ~50 blocks the host does this once per round of
        decode steps while the device waits."""
        n = len(pages)
        count = np.fromiter(map(len, pages), dtype=np.int64, count=n)
        block = np.fromiter(itertools.chain.from_iterable(pages), dtype=np.int64, count=int(count.sum()))
        row = np.repeat(np.arange(n), count)  # (blocks,) each block's row
        col = np.arange(len(block)) - np.repeat(np.cumsum(count) - count, count)  # (blocks,) its logical index
        row, col, block = (torch.from_numpy(x).to(self.device, non_blocking=True) for x in (row, col, block))
        self.page_table[:n].zero_()
        self.page_table[row, col] = block.int()
        self.logical[:n].fill_(-1)
        self.logical[row, block] = col.int()

    # the model's cache protocol: begin runs once per forward, then update once per layer (write_target and read
    # instead where compiled_regions is true: model.decode_layers writes inside its compiled regions)
    @property
    def compiled_regions(self) -> bool:
        return self.compile_decoding and self._slots_written is None

    def begin(self, position_ids: Tensor) -> model_lib.AttnMask:
        if self._slots_written is not None:  # a prefill: attention within each packed prompt
            self._write = self._slots_written
            return model_lib.build_mask(position_ids, None, use_flex=position_ids.is_cuda and self.in_place)
        bs = self.block_size
        if self.in_place:
            B = position_ids.shape[0]
            pos = position_ids[:, 0]  # (B,)
            self._write = self.page_table[:B].gather(1, (pos // bs)[:, None]).long()[:, 0] * bs + pos % bs
            return model_lib.AttnMask(block=self._block_mask(pos + 1))
        self._write = (self.table.gather(1, position_ids // bs) * bs + position_ids % bs).flatten()  # (B*T,)
        self._read = self.pool_rows(self.table[:, :math.ceil(self.attend / bs)]).flatten(1)[:, :self.attend]  # (B, S)
        slots = torch.arange(self.attend, device=position_ids.device)
        return model_lib.AttnMask(dense=(slots <= position_ids[:, :, None])[:, None])  # (B, 1, T, S)

    def _block_mask(self, lengths: Tensor) -> BlockMask:
        """Row b attends to its lengths[b] cached positions: its blocks, in order, with the mask keeping the
        positions below its length. The queries of a row are the query heads of one KV head
        (model._flex_decode), so the mask ignores the query index.

        Every block is listed as partial (mask evaluated: one compare per key), none as full. flex_attention's
        decoding kernel splits a row's partial blocks over SPLIT_KV thread blocks, but splits its full blocks
        over the whole pool's length (torch 2.11's template), so with full blocks one thread block streamed each
        row's entire context: at batch 64 x 8k, 128 thread blocks on 132 SMs. Measured on an H100, one layer's
        attention at 64 x 8k took 533 us with full blocks, 368 with partial ones and 347 with our SPLIT_KV
        (BENCHMARKS.md)."""
        B, bs = lengths.shape[0], self.block_size
        n_blocks = (lengths + bs - 1) // bs  # (B,)
        logical, lens = self.logical[:B], lengths

        def mask_mod(b, h, q_idx, kv_idx):
            page = logical[b, kv_idx // bs]
            return (page >= 0) & (page * bs + kv_idx % bs < lens[b])
        return BlockMask.from_kv_blocks(n_blocks.int()[:, None, None], self.page_table[:B, None, None],
                                        BLOCK_SIZE=bs, mask_mod=mask_mod,
                                        seq_lengths=(self.group, self.n_blocks * bs), compute_q_blocks=False)

    def advance(self, position_ids: Tensor) -> None:
        pass

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, hd) at their pool rows; return what this forward's mask indexes: the new keys
        themselves (prefill), else what `read` returns."""
        model_lib.write_rows(*self.write_target(layer), k, v)
        return (k, v) if self._slots_written is not None else self.read(layer)

    def write_target(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's key and value pools (Hkv, S_pool, hd) and the pool rows (B * T,) this forward writes."""
        return self.k[layer], self.v[layer], self._write

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """What a decoding forward's mask indexes, once the layer's keys are written: the whole pool
        (1, Hkv, S_pool, hd) (in place) or each row's gathered positions (B, Hkv, S, hd)."""
        if self.in_place:
            return self.k[layer][None], self.v[layer][None]
        B, Hkv, hd = self._read.shape[0], self.k.shape[1], self.k.shape[3]
        read = self._read.flatten()
        return (self.k[layer].index_select(1, read).view(Hkv, B, -1, hd).transpose(0, 1),
                self.v[layer].index_select(1, read).view(Hkv, B, -1, hd).transpose(0, 1))  # (B, Hkv, S, hd)


# -----------------------------------------------------------------------------
# Continuous batching


@dataclasses.dataclass
class _Seq:
    prompt: int
    sample: int
    blocks: list[int]
    length: int  # tokens in the cache (the last generated token is not yet in it)
    tokens: list[int]  # generated so far
    admitted: int  # admission order, for preemption


@dataclasses.dataclass
class _Prefix:
    """A prefilled prompt whose samples are still being admitted: it holds a reference to its blocks."""

    prompt: int
    blocks: list[int]
    length: int
    logits: Tensor  # (V,) of the last prompt position
    samples: deque[int]


class Sampler:
    """Continuous-batching generation over a paged KV cache.

    kv_gib: memory for the KV pool (default: 70% of free GPU memory; 2 GiB on CPU). max_slots: sequences
    decoded together. block_size: positions per KV block (default 128 on GPU, the block size of the in-place
    attention's mask; 32 on CPU). sync_every: decode steps between host synchronizations (finished sequences
    are only noticed, and replaced, at these points; on GPU this keeps the device busy). prefill_tokens: most
    prompt tokens prefilled together in one packed forward. cuda_graphs: capture the decode step (all layers,
    the head and the draw) in CUDA graphs, one per batch-size bucket, with the draw compiled (default on
    GPU: its ~70 passes over (B, vocab) fuse into a few). compile: run each decoding step's layers compiled
    between attentions (model.decode_layers; default: with cuda_graphs), and on GPU the draw. in_place: decode
    attention reads the KV pool in place (default on GPU; on CPU it is exact too, but flex_attention runs
    uncompiled there and is slower than gathering). With cuda_graphs, compile and in_place all False, nothing
    is compiled, on GPU too: prefill then gathers each prompt's tokens for SDPA as on CPU.

    Each layer's q, k and v projections run as one matmul, on a copy of their weights stacked
    (model.Qwen2Attention.fused_qkv: 176 MB at Qwen2.5-1.5B's size, 0.9 GB at 7B's), taken from the model at
    the start of every stream: weights changed between two streams are sampled with.
    """

    def __init__(self, model: model_lib.Qwen2ForCausalLM, *, kv_gib: float | None = None, max_slots: int = 256,
                 block_size: int | None = None, sync_every: int | None = None, prefill_tokens: int | None = None,
                 cuda_graphs: bool | None = None, in_place: bool | None = None, compile: bool | None = None) -> None:
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cuda = self.device.type == "cuda"
        if kv_gib is None:
            kv_gib = 0.7 * free_device_memory(self.device) / 2**30 if cuda else 2.0
        block_size = block_size or (128 if cuda else 32)
        n_blocks = int(kv_gib * 2**30 // (PagedKVCache.bytes_per_token(self.config, self.dtype) * block_size))
        if n_blocks < 2:
            raise ValueError(f"kv_gib={kv_gib} holds no KV block of {block_size} tokens for this model")
        self.cache = PagedKVCache(self.config, n_blocks, block_size, device=self.device, dtype=self.dtype,
                                  in_place=in_place)
        self.max_slots = max_slots
        self.sync_every = sync_every or (16 if cuda else 1)
        self.prefill_tokens = prefill_tokens or (16384 if cuda else 2048)
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (cuda and self.cache.in_place):
            raise ValueError("cuda_graphs needs a CUDA model and the in-place paged attention")
        self.cache.compile_decoding = self.cuda_graphs if compile is None else compile
        self._draw = _compiled_draw() if self.cuda_graphs or (cuda and self.cache.compile_decoding) else draw
        if self.cache.in_place:  # at the largest bucket's size once: captured graphs keep their addresses
            self.cache.decode_buffers(_bucket(max_slots, max_slots))
        self.preemptions = 0
        self.generated, self.decode_s = 0, 0.0  # tokens decoded and seconds spent decoding, for throughput
        self.steps_decoded, self.rows_decoded = 0, 0  # decode steps run, and rows they decoded: the mean batch
        self.capture_s = 0.0  # of decode_s, seconds spent compiling and capturing a new bucket's graph
        self._graphs: dict = {}

    def _blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.cache.block_size)

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1,
               keys: Sequence[int] | None = None) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (prompt index, sample index, new tokens) for every sample of every prompt, as each finishes.
        The tokens end with the stop token that ended them, if any. keys: a stable id per prompt for the
        randomness (default: its index), so a prompt draws the same samples in any batch or shard."""
        if not prompts or n < 1:
            return
        self._load_qkv()
        self.keys = list(keys) if keys is not None else list(range(len(prompts)))
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if self._blocks_for(len(p)) + self._own_blocks(len(p)) > len(self.cache.refs) - 1:  # block 0 is scratch
                raise ValueError(f"prompt {i} ({len(p)} tokens) does not fit in the KV memory; raise kv_gib")
        waiting = deque((i, deque(range(n))) for i in range(len(prompts)))  # prompts still to prefill
        prefixes: deque[_Prefix] = deque()  # prefilled prompts with samples not yet admitted
        active: list[_Seq] = []
        admitted = 0
        while waiting or prefixes or active:
            # 1. admit: free slots take the next samples, prefilling prompts once for all of their samples,
            # several prompts in one packed forward
            while len(active) < self.max_slots and (prefixes or waiting):
                if not prefixes:
                    wanted = math.ceil((self.max_slots - len(active)) / n)
                    batch = self._prefill_batch(waiting, prompts, wanted)
                    if not batch:
                        break
                    prefixes.extend(self._prefill([(i, prompts[i], samples) for i, samples in batch]))
                prefix = prefixes[0]
                if self._own_blocks(prefix.length) > len(self.cache.free):
                    break
                seq = self._fork(prefix, prefix.samples.popleft(), params, admitted)
                admitted += 1
                if not prefix.samples:
                    self.cache.release(prefix.blocks)
                    prefixes.popleft()
                if self._done(seq, params):
                    self.cache.release(seq.blocks)
                    yield seq.prompt, seq.sample, seq.tokens
                else:
                    active.append(seq)
            if not active:
                if waiting or prefixes:
                    raise RuntimeError("the KV memory cannot hold a single sequence; raise kv_gib")
                break
            # 2. room for the next tokens of every active sequence: drop waiting prefixes, then preempt the
            # newest sequences (they restart later and, the randomness being counter-based, redo the same tokens)
            steps = min(self.sync_every, min(params.max_new_tokens - len(s.tokens) for s in active))
            while not self._grow(active, steps):
                if prefixes:
                    prefix = prefixes.pop()
                    self.cache.release(prefix.blocks)
                    waiting.appendleft((prefix.prompt, prefix.samples))
                    continue
                if len(active) == 1:
                    raise RuntimeError(f"the KV memory cannot hold one sequence of {active[0].length + steps} "
                                       f"tokens; raise kv_gib")
                victim = max(active, key=lambda s: s.admitted)
                active.remove(victim)
                self.preemptions += 1
                self.cache.release(victim.blocks)
                waiting.appendleft((victim.prompt, deque([victim.sample])))
            # 3. decode `steps` tokens for every active sequence without looking at them
            new = self._decode(active, steps, params)  # (steps, B) on the host
            # 4. harvest finished sequences
            still = []
            for b, seq in enumerate(active):
                before = len(seq.tokens)
                for t in new[:, b].tolist():
                    seq.tokens.append(t)
                    if self._done(seq, params):
                        break
                self.generated += len(seq.tokens) - before
                seq.length += steps
                if self._done(seq, params):
                    self.cache.release(seq.blocks)
                    yield seq.prompt, seq.sample, seq.tokens
                else:
                    still.append(seq)
            active = still

    def _load_qkv(self) -> None:
        """The model's q/k/v weights as they are now, fused: made at the first stream, copied into the same
        tensors at the next ones (captured graphs read them there), so a model updated between two streams
        samples with its new weights."""
        fused = (layer.self_attn.fused_qkv() for layer in self.model.model.layers)  # one layer's at a time
        if self.cache.qkv_weights is None:
            self.cache.qkv_weights = list(fused)
            return
        for (weight, bias), (new_weight, new_bias) in zip(self.cache.qkv_weights, fused):
            weight.copy_(new_weight)
            if bias is not None:
                bias.copy_(new_bias)

    def _own_blocks(self, prompt_len: int) -> int:
        """Blocks a new sample of a prompt needs for itself: its copy of the partial last prompt block and
        growth until the next synchronization."""
        return self._blocks_for(prompt_len + self.sync_every + 1) - prompt_len // self.cache.block_size

    def _done(self, seq: _Seq, params: SamplingParams) -> bool:
        return len(seq.tokens) >= params.max_new_tokens or (bool(seq.tokens) and seq.tokens[-1] in params.stop_ids)

    def _prefill_batch(self, waiting: deque, prompts: Sequence[Sequence[int]], wanted: int) -> list:
        """Take from `waiting` up to `wanted` prompts (at least one) that fit in the free KV blocks together
        with their first sample and in prefill_tokens tokens together (a longer single prompt goes alone)."""
        batch, tokens, blocks = [], 0, 0
        while waiting and len(batch) < wanted:
            i, samples = waiting[0]
            need = self._blocks_for(len(prompts[i])) + self._own_blocks(len(prompts[i]))
            if blocks + need > len(self.cache.free) or (batch and tokens + len(prompts[i]) > self.prefill_tokens):
                break
            batch.append(waiting.popleft())
            tokens += len(prompts[i])
            blocks += need
        return batch

    def _prefill(self, items: list[tuple[int, Sequence[int], deque[int]]]) -> list[_Prefix]:
        """Prefill prompts in one forward: packed into one row, each attending only to itself, each token's
        keys and values written straight to its prompt's blocks."""
        blocks = [[self.cache.allocate() for _ in range(self._blocks_for(len(p)))] for _, p, _ in items]
        slots = torch.cat([self.cache.pool_rows(torch.tensor(b)).flatten()[:len(p)] for b, (_, p, _) in zip(blocks, items)])
        ids = torch.tensor([[t for _, p, _ in items for t in p]], device=self.device)  # (1, T)
        pos = torch.cat([torch.arange(len(p)) for _, p, _ in items])[None].to(self.device)  # (1, T)
        ends = torch.tensor([len(p) for _, p, _ in items]).cumsum(0) - 1  # (D,) each prompt's last token
        self.cache.zero_fresh()
        self.cache.prefill(slots.to(self.device))
        hidden = self.model(ids, position_ids=pos, cache=self.cache, return_hidden=True)  # (1, T, H)
        logits = self.model.lm_head(hidden[0, ends.to(self.device)]).float()  # (D, V)
        return [_Prefix(i, b, len(p), logits[d], samples) for d, ((i, p, samples), b) in enumerate(zip(items, blocks))]

    def _fork(self, prefix: _Prefix, sample: int, params: SamplingParams, admitted: int) -> _Seq:
        """A new sequence on a prefilled prompt: full blocks shared, the partial last one copied; its first
        token drawn from the prompt's last logits."""
        full = prefix.length // self.cache.block_size
        blocks = list(prefix.blocks[:full])
        for b in blocks:
            self.cache.refs[b] += 1
        if full < len(prefix.blocks):
            blocks.append(self.cache.copy_block(prefix.blocks[full]))
        as_tensor = lambda x: torch.tensor([x], device=self.device)  # noqa: E731
        first = int(self._draw(prefix.logits[None], params, as_tensor(self.keys[prefix.prompt]), as_tensor(sample),
                               as_tensor(0))[0])
        return _Seq(prefix.prompt, sample, blocks, prefix.length, [first], admitted)


    def _grow(self, active: list[_Seq], steps: int) -> bool:
        """Give every sequence blocks for `steps` more tokens; False (allocating nothing) if the pool is short."""
        need = [self._blocks_for(s.length + steps) - len(s.blocks) for s in active]
        if sum(need) > len(self.cache.free):
            return False
        for s, k in zip(active, need):
            s.blocks += [self.cache.allocate() for _ in range(k)]
        return True

    def _decode(self, active: list[_Seq], steps: int, params: SamplingParams) -> Tensor:
        """`steps` tokens for every active sequence: (steps, B) on the host."""
        start = time.perf_counter()
        try:
            return self._decode_steps(active, steps, params)
        finally:
            self.decode_s += time.perf_counter() - start
            self.steps_decoded += steps
            self.rows_decoded += steps * len(active)

    def _decode_steps(self, active: list[_Seq], steps: int, params: SamplingParams) -> Tensor:
        B = len(active)
        self.cache.zero_fresh()
        rows = _bucket(B, self.max_slots) if self.cuda_graphs else B
        state = DecodeState.empty(rows, self.sync_every, self.device)
        state.fill([s.tokens[-1] for s in active], [s.length for s in active],
                   [self.keys[s.prompt] for s in active], [s.sample for s in active], [len(s.tokens) for s in active])
        if self.cache.in_place:
            self.cache.decode(self.cache.page_table[:rows])
            graph, static = self._graph(rows, params) if self.cuda_graphs else (None, state)
            self.cache.set_pages([s.blocks for s in active] + [[0]] * (rows - B))  # padding rows: scratch
        else:
            width = max(len(s.blocks) for s in active)
            self.cache.decode(torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in active],
                                           device=self.device), max(s.length for s in active) + 1)
        if self.cuda_graphs:
            static.copy_from(state)
            for _ in range(steps):
                graph.replay()
            return static.out[:steps, :B].cpu()
        for _ in range(steps):
            self._step(state, params)
            self.cache.attend += 1
        return state.out[:steps].cpu()

    def _step(self, state: DecodeState, params: SamplingParams) -> None:
        """One decode step on fixed buffers: feed each row's last token, draw the next, advance."""
        hidden = self.model(state.tokens[:, None], position_ids=state.pos[:, None], cache=self.cache,
                            return_hidden=True)  # (B, 1, H)
        logits = self.model.lm_head(hidden[:, -1])  # (B, V)
        new = self._draw(logits, params, state.keys, state.samples, state.steps)
        state.out.index_copy_(0, state.t, new[None])
        state.tokens.copy_(new)
        state.pos.add_(1)
        state.steps.add_(1)
        state.t.add_(1)

    def _warm_up(self, static: DecodeState, params: SamplingParams) -> None:
        """Two decode steps on a graph's buffers before its capture (they compile the attention kernel for this
        shape), each written to the round's first output row: with sync_every=1 the buffers hold one."""
        for _ in range(2):
            static.t.zero_()
            self._step(static, params)

    def _graph(self, rows: int, params: SamplingParams) -> tuple[torch.cuda.CUDAGraph, DecodeState]:
        """The decode step for `rows` rows captured in a CUDA graph (once per bucket and draw settings: a
        new max_new_tokens or stop list reuses it). Captured on padding rows (scratch block 0, position 0), so
        capturing changes no sequence's state."""
        key = (rows, draw_settings(params))
        if key not in self._graphs:
            start = time.perf_counter()
            static = DecodeState.empty(rows, self.sync_every, self.device)
            self.cache.set_pages([[0]] * rows)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._warm_up(static, params)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graphs.get("pool")):
                self._step(static, params)
            self._graphs.setdefault("pool", graph.pool())
            self._graphs[key] = (graph, static)
            self.capture_s += time.perf_counter() - start
        return self._graphs[key]


def draw_settings(params: SamplingParams) -> SamplingParams:
    """What of `params` a decode step's draw depends on (temperature, top-p, top-k, seed): the step's
    captured graph is shared by every run with the same settings, whatever its length limit or stop tokens."""
    return dataclasses.replace(params, max_new_tokens=1, stop_ids=())


def free_device_memory(device: torch.device) -> int:
    """Bytes of device memory free for a new allocation. PyTorch's caching allocator keeps what freed tensors
    held, and the driver (mem_get_info) counts that as taken: without emptying it first, a sampler made after
    another one, or after a large forward, would size its KV pool from a fraction of the memory really free."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


@functools.cache
def _compiled_draw():
    return torch.compile(draw, dynamic=True)


def _bucket(n: int, most: int) -> int:
    """The batch-size bucket of n active rows: the next power of two, at most `most` rounded up likewise."""
    return min(1 << (n - 1).bit_length(), 1 << (most - 1).bit_length())


@dataclasses.dataclass
class DecodeState:
    """A decode step's inputs and outputs, on the device: each row's last token, its position, its
    randomness key (prompt key, sample index, step) and the tokens drawn so far this round (out[t])."""

    tokens: Tensor  # (B,)
    pos: Tensor  # (B,)
    keys: Tensor  # (B,)
    samples: Tensor  # (B,)
    steps: Tensor  # (B,)
    t: Tensor  # (1,) the step within this round
    out: Tensor  # (sync_every, B)

    @classmethod
    def empty(cls, rows: int, steps: int, device: torch.device) -> DecodeState:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        return cls(z(rows), z(rows), z(rows), z(rows), z(rows), z(1), z(steps, rows))

    def fill(self, tokens, pos, keys, samples, steps) -> None:
        """Rows 0 .. len(tokens)-1 from host lists; the rest stay padding (zeros)."""
        host = torch.tensor([tokens, pos, keys, samples, steps])  # (5, n)
        n = host.shape[1]
        for buf, row in zip((self.tokens, self.pos, self.keys, self.samples, self.steps), host.to(self.tokens.device)):
            buf[:n] = row

    def copy_from(self, other: DecodeState) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))


def generate(model: model_lib.Qwen2ForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (), n: int = 1,
             seed: int = 0, kv_gib: float | None = None, max_slots: int = 256) -> list[list[int]]:
    """The new tokens of every (prompt, sample), prompt-major: out[i * n + j] is sample j of prompt i."""
    params = SamplingParams(max_new_tokens, temperature, top_p, top_k, tuple(stop_ids), seed)
    out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    for i, j, tokens in Sampler(model, kv_gib=kv_gib, max_slots=max_slots).stream(prompts, params, n):
        out[i * n + j] = tokens
    return out


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--think", action="store_true", help="force thinking: the evaluation prompt ending in <think>")
    p.add_argument("--n", type=int, default=1, help="samples")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-gib", type=float, help="KV cache memory (default: 70%% of free GPU memory, 2 GiB on CPU)")
    args = p.parse_args(argv)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        config = model_lib.Qwen2Config.from_pretrained(args.model)
        family = data_lib.chat_family(config.model_type)
        tok = data_lib.load_tokenizer(args.model, config.vocab_size, family)  # before the weights: it fails fast
        model = model_lib.load_pretrained(args.model, device=device,
                                          dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    except (data_lib.DataError, model_lib.ConfigError, model_lib.CheckpointError) as e:
        sys.exit(f"error: {e}")
    if not args.raw and (note := data_lib.template_note(args.model, family)):
        print(note)
    text = args.prompt if args.raw else (data_lib.eval_prompt_text(args.prompt, family=family) if args.think
                                         else data_lib.prompt_text(args.prompt, family))
    prompt = tok.encode(text, add_special_tokens=False).ids
    stops = data_lib.stop_ids(tok, family)
    outs = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, stop_ids=stops, n=args.n, seed=args.seed, kv_gib=args.kv_gib)
    for j, tokens in enumerate(outs):
        print(f"--- sample {j} ({len(tokens)} tokens)")
        print(tok.decode(tokens, skip_special_tokens=True))


if __name__ == "__main__":
    main()
