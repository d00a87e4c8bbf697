"""sample.py: greedy parity with transformers' generate, the paged cache, exact sampling distributions,
continuous batching, preemption and reproducibility."""

import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import model as M
import sample as S

VOCAB = 96


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Ours and transformers' copy of a random model with large weights, so that logits have clear maxima
    (near-ties would make greedy decoding depend on the last bit of float rounding)."""
    config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ours = M.build_model(config, seed=0)
    g = torch.Generator().manual_seed(0)  # module fixtures run before the per-test seeding: seed explicitly
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3, generator=g)
    path = tmp_path_factory.mktemp("sample") / "m"
    M.save_pretrained(ours, path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours.eval(), hf


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new, stops):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=list(stops),
                      pad_token_id=stops[0], attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def pool_gib(model, blocks, block_size=4):
    return blocks * block_size * S.PagedKVCache.bytes_per_token(model.config, torch.float32) / 2**30


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("max_slots, blocks", [(1, 1000), (16, 1000), (16, 30)])
def test_greedy_matches_transformers(models, max_slots, blocks, in_place):
    """One slot (no continuous batching), 16 slots with mixed prompt lengths, and a KV pool so small that
    sequences get preempted and recomputed: every output is transformers' greedy output, token for token,
    with decode attention gathering each row's keys or reading the pool in place (the GPU path)."""
    ours, hf = models
    batch = prompts([3, 17, 5, 29, 11, 8])
    stops = (0, 1)
    with torch.no_grad():
        expected = [hf_greedy(hf, p, 24, stops) for p in batch]
    sampler = S.Sampler(ours, kv_gib=pool_gib(ours, blocks), max_slots=max_slots, block_size=4, in_place=in_place)
    got = [[] for _ in batch]
    for i, j, tokens in sampler.stream(batch, S.SamplingParams(24, stop_ids=stops)):
        got[i] = tokens
    assert got == expected
    assert (sampler.preemptions > 0) == (blocks == 30)
    assert sorted(sampler.cache.free) == list(range(1, len(sampler.cache.refs)))  # every block came back


def test_stop_tokens_end_generation(models):
    ours, hf = models
    batch = prompts([6, 9, 4, 12], seed=3)
    with torch.no_grad():
        free_run = [hf_greedy(hf, p, 20, (0,)) for p in batch]
    stop = free_run[0][5]  # a token the first prompt produces at step 5
    got = S.generate(ours, batch, max_new_tokens=20, stop_ids=[stop])
    for out, ref in zip(got, free_run):
        end = ref.index(stop) + 1 if stop in ref else 20
        assert out == ref[:end]  # ends with the stop token, or runs to max_new_tokens
    assert len(got[0]) <= 6


def test_decode_logits_from_the_paged_cache_equal_the_full_forward(models):
    ours, _ = models
    seq = prompts([23])[0]
    cache = S.PagedKVCache(ours.config, n_blocks=12, block_size=4, device="cpu", dtype=torch.float32, in_place=False)
    cache.k.fill_(float("nan"))  # unwritten memory may hold anything: it must never reach the output
    cache.v.fill_(float("nan"))
    blocks = [cache.allocate() for _ in range(6)]
    cache.zero_fresh()
    cache.table = torch.tensor([blocks[::-1]])  # blocks need not be in order
    with torch.no_grad():
        full = ours(torch.tensor([seq]))[0]  # (23, V)
        cache.attend = 9
        steps = [ours(torch.tensor([seq[:9]]), position_ids=torch.arange(9)[None], cache=cache)[0]]
        for t in range(9, 23):
            cache.attend = t + 1
            steps.append(ours(torch.tensor([[seq[t]]]), position_ids=torch.tensor([[t]]), cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_in_place_attention_equals_the_gathering_path(models):
    """Decode logits of rows at different lengths, with shared and out-of-order blocks and padding rows,
    read from the pool in place (flex_attention with a page-table block mask) and by gathering: equal to
    1e-5 in fp32. Positions past a row's length hold other values, and other blocks huge ones: neither
    reaches the output."""
    ours, _ = models
    torch.manual_seed(0)
    lengths = [1, 4, 5, 11, 16]
    out = {}
    for in_place in (False, True):
        cache = S.PagedKVCache(ours.config, n_blocks=24, block_size=4, device="cpu", dtype=torch.float32,
                               in_place=in_place)
        cache.k.fill_(1e4)
        cache.v.fill_(1e4)
        shared = [cache.allocate(), cache.allocate()]  # a prompt's first 8 positions, shared by rows 3 and 4
        pages = [[cache.allocate()] for _ in range(3)] + [shared + [cache.allocate()] for _ in range(2)]
        pages[2] = [cache.allocate()] + pages[2]
        pages[4].append(cache.allocate())
        pages = [p[::-1] if i == 2 else p for i, p in enumerate(pages)]  # blocks need not be in order
        cache.zero_fresh()
        kv = torch.randn(ours.config.num_hidden_layers, ours.config.num_key_value_heads, 24 * 4,
                         ours.config.head_dim, 2, generator=torch.Generator().manual_seed(1))
        cache.k.copy_(torch.where(cache.k == 1e4, cache.k, kv[..., 0]))  # every allocated position
        cache.v.copy_(torch.where(cache.v == 1e4, cache.v, kv[..., 1]))
        pos = torch.tensor(lengths) - 1  # each row's new token goes to its last position
        if in_place:
            cache.decode_buffers(8)
            cache.set_pages(pages + [[0]] * 3)  # 3 padding rows on the scratch block
            cache.decode(cache.page_table[:8])
            ids, pos = torch.tensor([[5]] * 8), torch.cat([pos, torch.zeros(3, dtype=torch.long)])
        else:
            width = max(map(len, pages))
            cache.decode(torch.tensor([p + [0] * (width - len(p)) for p in pages]), max(lengths))
            ids = torch.tensor([[5]] * 5)
        with torch.no_grad():
            out[in_place] = ours(ids, position_ids=pos[:, None], cache=cache)[:5, 0]
    assert out[True].abs().max() < 1e3
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)


class FixedLogits(nn.Module):
    """A mock model whose next-token logits are always `logits`."""

    def __init__(self, logits):
        super().__init__()
        self.config = M.Qwen2Config(vocab_size=len(logits), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                    num_attention_heads=2)
        self.lm_head = nn.Linear(1, len(logits), bias=False)
        self.lm_head.weight.data = torch.tensor(logits, dtype=torch.float32)[:, None]

    def forward(self, input_ids, position_ids=None, cache=None, return_hidden=False):
        return torch.ones(*input_ids.shape, 1)


def truncated(logits, temperature, top_k, top_p):
    """The exact distribution the sampler must draw from."""
    p = torch.tensor(logits, dtype=torch.float64) / temperature
    order = p.argsort(descending=True, stable=True)
    s = p[order]
    if top_k:
        s = s.masked_fill(s < s[top_k - 1], -math.inf)
    q = s.softmax(0)
    if top_p < 1:
        q = q.masked_fill(q.cumsum(0) - q >= top_p, 0.0)
    out = torch.zeros_like(q)
    out[order] = q / q.sum()
    return out.numpy()


def chi2(counts, probs):
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


LOGITS = [2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 3, 1.0),
                                                       (1.0, 0, 0.7), (0.7, 5, 0.9), (1.3, 0, 0.55)])
def test_sampling_frequencies_match_the_truncated_distribution(temperature, top_k, top_p):
    """20,000 first tokens through the whole sampler: tokens outside the truncation never appear and the
    frequencies pass a chi-square test against the exact distribution, and fail it against the
    distribution a top-p boundary off by one token would give."""
    n = 20000
    probs = truncated(LOGITS, temperature, top_k, top_p)
    params = S.SamplingParams(1, temperature, top_p, top_k, seed=7)
    out = S.Sampler(FixedLogits(LOGITS), kv_gib=0.01, max_slots=64).stream([[1, 2, 3]], params, n=n)
    counts = np.bincount([tokens[0] for _, _, tokens in out], minlength=len(LOGITS))
    assert counts.sum() == n and (counts[probs == 0] == 0).all()
    stat, dof = chi2(counts, probs)
    assert stat < dof + 5 * math.sqrt(2 * dof), (counts, probs)  # far below the 1e-4 tail
    kept = int((probs > 0).sum())
    if top_p < 1 and kept < len(LOGITS):
        for wrong_kept in (kept - 1, kept + 1):
            if wrong_kept >= 1:
                wrong = np.zeros(len(LOGITS))
                order = np.argsort(-np.array(LOGITS) / temperature, kind="stable")[:wrong_kept]
                wrong[order] = np.exp(np.array(LOGITS)[order] / temperature)
                wrong /= wrong.sum()
                wrong_stat = ((counts - wrong * n) ** 2 / np.maximum(wrong * n, 1e-9)).sum()
                assert wrong_stat > 100, (wrong_kept, wrong_stat)  # p < 1e-15 at these degrees of freedom


def test_top_p_boundary_is_exact():
    """probs 0.4, 0.3, 0.2, 0.1: top-p 0.7 keeps the first two (their mass before the third is 0.7);
    top-p 0.71 keeps three."""
    logits = torch.tensor([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]]).repeat(4000, 1)
    u = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for top_p, allowed in ((0.7, {0, 1}), (0.71, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})):
        drawn = set(S.sample_tokens(logits, S.SamplingParams(1, 1.0, top_p), u).tolist())
        assert drawn == allowed, top_p


def test_samples_are_reproducible_whatever_the_schedule(models):
    ours, _ = models
    batch = prompts([4, 13, 7])
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=11)
    a = S.generate(ours, batch, max_slots=16, kv_gib=1.0, **kw)
    b = S.generate(ours, batch, max_slots=2, kv_gib=pool_gib(ours, 12, block_size=32), **kw)  # other slots
    assert a == b
    c = S.generate(ours, batch[1:2], max_slots=16, **kw)  # the prompt alone, at another index
    assert c != a[3:6]  # keys default to the prompt's index ...
    d = [tok for _, _, tok in sorted(S.Sampler(ours, kv_gib=1.0).stream(
        batch[1:2], S.SamplingParams(16, 1.0, 0.9, seed=11), n=3, keys=[1]))]
    assert d == a[3:6]  # ... and a stable key gives the same samples in any batch
    assert len({tuple(x) for x in a}) > 6  # samples differ
    assert S.generate(ours, batch, max_slots=16, **(kw | {"seed": 12})) != a


def test_a_prompt_is_prefilled_once_for_its_samples_and_prompts_together(models, monkeypatch):
    ours, _ = models
    calls = []
    real = S.Sampler._prefill

    def counting(self, items):
        calls.append([i for i, _, _ in items])
        return real(self, items)

    monkeypatch.setattr(S.Sampler, "_prefill", counting)
    out = S.generate(ours, prompts([30, 9]), max_new_tokens=5, temperature=1.0, n=8)
    assert len(out) == 16 and calls == [[0, 1]]  # one packed forward for both prompts, once for all samples
    calls.clear()
    S.Sampler(ours, max_slots=4, prefill_tokens=40).stream(prompts([30, 9, 20, 3, 3]), S.SamplingParams(2)).__next__()
    assert calls[0] == [0, 1]  # a token budget of 40 stops the first packed prefill after 39 tokens


def test_bad_requests_get_clear_errors(models):
    ours, _ = models
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        S.generate(ours, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="does not fit in the KV memory"):
        S.generate(ours, [list(range(3, 90)) * 40], max_new_tokens=3, kv_gib=0.0002)
    with pytest.raises(RuntimeError, match="cannot hold one sequence"):
        list(S.Sampler(ours, kv_gib=0.0002, block_size=4).stream([[5, 6, 7]], S.SamplingParams(10_000)))
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        S.SamplingParams(10, temperature=-1)
