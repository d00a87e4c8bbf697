"""sample.py: greedy parity with transformers' generate, the paged cache, exact sampling distributions,
continuous batching, preemption and reproducibility."""

import dataclasses
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


def test_compiled_decoding_equals_the_eager_path(models):
    """Sampler(compile=True), the GPU default: each decoding step's layers run compiled between attentions, one
    graph for all layers, with batch sizes changing as sequences finish and are preempted. Greedy output is
    still transformers' token for token, and sampled output the uncompiled sampler's, on both attention paths."""
    ours, hf = models
    batch = prompts([3, 17, 5, 29, 11, 8])
    stops = (0, 1)
    with torch.no_grad():
        expected = [hf_greedy(hf, p, 24, stops) for p in batch]
    sampled = S.SamplingParams(24, 1.0, 0.9, seed=3)
    calls = M._compiled_regions.cache_info().hits + M._compiled_regions.cache_info().misses
    for in_place in (False, True):
        run = lambda params, compile: sorted(S.Sampler(  # noqa: E731
            ours, kv_gib=pool_gib(ours, 30), max_slots=16, block_size=4, in_place=in_place,
            compile=compile).stream(batch, params, n=2))
        assert [t for i, j, t in run(S.SamplingParams(24, stop_ids=stops), True) if j == 0] == expected
        assert run(sampled, True) == run(sampled, False)
    info = M._compiled_regions.cache_info()
    assert info.hits + info.misses > calls  # the compiled regions ran


@pytest.mark.parametrize("arch", [dict(model_type="llama", attention_bias=True, num_key_value_heads=1),
                                  dict(model_type="qwen3", head_dim=24)])
def test_compiled_decoding_of_other_architectures(arch):
    """The compiled layers of a Llama-3 (biased o_proj, GQA 4) and a Qwen3 (per-head q/k norms, head_dim apart
    from the hidden size) decode as the uncompiled ones, greedy and sampled."""
    config = M.Qwen2Config(**(dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, tie_word_embeddings=False) | arch))
    model = M.build_model(config, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3, generator=g)
    model.eval()
    for params in (S.SamplingParams(16), S.SamplingParams(16, 1.0, 0.9, seed=2)):
        runs = [sorted(S.Sampler(model, kv_gib=pool_gib(model, 200), max_slots=4, block_size=4,
                                 compile=compile).stream(prompts([5, 12, 3]), params, n=2)) for compile in (False, True)]
        assert runs[0] == runs[1]


def test_compiled_decoding_compiles_once_for_every_depth():
    """The compiled regions take the layers as arguments: a model of the same shapes but three times deeper
    compiles nothing new, and decodes as its uncompiled self (the cache writes happen inside the regions)."""
    from torch._dynamo.utils import counters
    runs, compiled = [], []
    for depth in (2, 6):
        config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=depth,
                               num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True)
        model = M.build_model(config, seed=depth)
        frames = counters["frames"]["total"]
        params = S.SamplingParams(12, 1.0, 0.8, seed=1)
        runs.append([sorted(S.Sampler(model, kv_gib=pool_gib(model, 100), max_slots=4, block_size=4, in_place=True,
                                      compile=compile).stream(prompts([4, 9, 2]), params, n=2))
                     for compile in (True, False)])
        compiled.append(counters["frames"]["total"] - frames)
    assert compiled[0] > 0 and compiled[1] == 0  # (the first: not past dynamo's recompile limit, so compiled)
    assert all(r[0] == r[1] for r in runs)


@pytest.mark.parametrize("arch", [dict(model_type="qwen2"), dict(model_type="llama", num_key_value_heads=1),
                                  dict(model_type="qwen3", head_dim=24)])
def test_fused_qkv_projections_equal_the_separate_ones(arch):
    """The sampler's one matmul on the stacked q/k/v weights (with Qwen2's biases, without Llama's, before
    Qwen3's per-head norms) gives each layer's queries, keys and values as the three projections do."""
    config = M.Qwen2Config(**(dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2) | arch))
    attn = M.build_model(config, seed=0).model.layers[0].self_attn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
        x = torch.randn(3, 5, 64)
        cos, sin = M.rope_cos_sin(torch.arange(5)[None].expand(3, 5), config.head_dim, config.rope_theta)
        for got, want in zip(attn.qkv(x, cos, sin, attn.fused_qkv()), attn.qkv(x, cos, sin)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_changed_between_streams_samples_with_its_new_weights(models):
    """The fused q/k/v weights are the sampler's own copy: it takes them from the model again at each stream,
    so weights changed in place (an optimizer step, a loaded state) or through .data are sampled with."""
    ours, _ = models
    model = M.build_model(ours.config, seed=0)
    model.load_state_dict(ours.state_dict())
    batch, params = prompts([4, 9]), S.SamplingParams(12, 1.0, seed=5)
    sampler = S.Sampler(model, kv_gib=1.0)
    before = sorted(sampler.stream(batch, params, n=2))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1)
    model.model.layers[1].self_attn.q_proj.bias.data = torch.randn_like(model.model.layers[1].self_attn.q_proj.bias)
    after = sorted(sampler.stream(batch, params, n=2))
    assert after != before and after == sorted(S.Sampler(model, kv_gib=1.0).stream(batch, params, n=2))


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
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()  # no decoder layers (no q/k/v weights for the sampler to fuse)

    def forward(self, input_ids, position_ids=None, cache=None, return_hidden=False):
        return torch.ones(*input_ids.shape, 1)


def truncated(logits, temperature, top_k, top_p):
    """The exact distribution the sampler must draw from, in float64: softmax(logits / temperature)
    restricted to the tokens scoring at least the k-th largest, then to those whose strictly more probable
    tokens hold less than top_p of the mass, renormalized."""
    s = torch.tensor(logits, dtype=torch.float64) / temperature
    if top_k:
        s = s.masked_fill(s < s.sort(descending=True).values[top_k - 1], -math.inf)
    q = s.softmax(0)
    if top_p < 1:
        above = ((q[None, :] > q[:, None]) * q[None, :]).sum(1)  # mass of the strictly more probable tokens
        q = q.masked_fill(above >= top_p, 0.0)
    return (q / q.sum()).numpy()


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


def rows(n):
    """Keys of n rows: prompt 0, sample i, step 0."""
    return torch.zeros(n, dtype=torch.long), torch.arange(n), torch.zeros(n, dtype=torch.long)


def test_top_p_boundary_is_exact():
    """probs 0.4, 0.3, 0.2, 0.1: top-p 0.7 keeps the first two (their mass before the third is 0.7);
    top-p 0.71 keeps three."""
    logits = torch.tensor([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]]).repeat(4000, 1)
    for top_p, allowed in ((0.7, {0, 1}), (0.71, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})):
        drawn = set(S.draw(logits, S.SamplingParams(1, 1.0, top_p), *rows(4000)).tolist())
        assert drawn == allowed, top_p


def reference_kept(scores, top_k, top_p):
    """S.kept_tokens' definition computed the straightforward way, with a full sort of the vocabulary."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if 0 < top_k < scores.shape[-1]:
        keep = scores >= scores.sort(dim=-1, descending=True).values[:, top_k - 1:top_k]
    if top_p < 1:
        q = scores.masked_fill(~keep, -math.inf).softmax(dim=-1)  # the probabilities sample.py computes
        mass = (q.double() * 2**52).long()  # and its fixed point
        ascending, order = q.sort(dim=-1)
        upto = mass.gather(1, order).cumsum(dim=-1)  # mass of the tokens up to each, least probable first
        last = torch.searchsorted(ascending, q, right=True) - 1  # the last position of each token's value
        keep &= upto[:, -1:] - upto.gather(1, last) < math.ceil(top_p * 2**52)  # mass strictly above < top_p
    return keep


def reference_draw(logits, params, prompt, sample, step):
    """The race over the reference's kept tokens, with sample.py's noise."""
    scores = logits.float() / params.temperature
    race = scores.double() - S.exponentials(params.seed, prompt, sample, step, scores.shape[-1]).log()
    return race.masked_fill(~reference_kept(scores, params.top_k, params.top_p), -math.inf).argmax(dim=-1)


def keys(n, step=0):
    return torch.arange(n) % 7, torch.arange(n), torch.full((n,), step)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.95), (0, 0.6), (0, 0.05), (1, 1.0), (40, 0.9), (3, 0.5),
                                          (200, 1.0), (0, 1.0)])
def test_fast_truncation_equals_the_full_sort_statistically(top_k, top_p):
    """1,000 rows of logits from nearly flat to peaked, a third with many exact ties, four draws each: the
    radix-select nucleus and top-k keep exactly the reference's tokens, and the draws are the same."""
    g = torch.Generator().manual_seed(top_k * 100 + int(100 * top_p))
    logits = torch.randn(1000, 700, generator=g) * torch.logspace(-3, 1, 1000)[:, None]  # (B, V)
    logits[::3] = (logits[::3] * 4).round()
    params = S.SamplingParams(1, 0.8, top_p, top_k, seed=3)
    assert torch.equal(S.kept_tokens(logits / 0.8, top_k, top_p), reference_kept(logits / 0.8, top_k, top_p))
    for step in range(4):
        assert torch.equal(S.draw(logits, params, *keys(1000, step)), reference_draw(logits, params, *keys(1000, step)))


@pytest.mark.parametrize("rows, vocab", [(64, 8192), (8, 151936)])
def test_the_nucleus_of_a_large_vocabulary_equals_the_full_sort(rows, vocab, monkeypatch):
    """At 8k and at Qwen2's 151,936 tokens the histograms are built in several copies (sample.NUCLEUS_COPIES,
    one per 1,024 tokens at most), which smaller vocabularies never use: the kept tokens are still the
    reference's, and the same as with one copy, from flat rows (with exact ties) to peaked ones."""
    assert vocab // 1024 >= 2  # several copies
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=g) * torch.logspace(-3, 1, rows)[:, None]
    logits[::3] = (logits[::3] * 4).round()
    for top_k, top_p in ((0, 0.95), (0, 0.3), (50, 0.9)):
        keep = S.kept_tokens(logits, top_k, top_p)
        assert torch.equal(keep, reference_kept(logits, top_k, top_p))
        monkeypatch.setattr(S, "NUCLEUS_COPIES", 1)
        assert torch.equal(S.kept_tokens(logits, top_k, top_p), keep)
        monkeypatch.undo()


def adversarial_logits():
    """Rows the nucleus could get wrong, named."""
    V = 64
    g = torch.Generator().manual_seed(5)
    rows = {
        "all tied": torch.zeros(V),
        "flat tail": torch.cat([torch.tensor([4.0, 3.0]), 1e-6 * torch.randn(V - 2, generator=g)]),
        "exact tail ties": torch.cat([torch.tensor([2.0, 1.0]), torch.zeros(V - 2)]),
        "many ties": torch.randint(0, 3, (V,), generator=g).float(),
        # probabilities 1/2, 1/8 x 4 (and nothing else): top-p 0.5 falls exactly between the head and the tie
        "tie at the boundary": torch.tensor([math.log(0.5)] + [math.log(0.125)] * 4 + [-math.inf] * (V - 5)),
        "tied head": torch.tensor([3.0, 3.0, 3.0] + [0.0] * (V - 3)),
        "dominant": torch.tensor([40.0] + [0.0] * (V - 1)),
        "-inf": torch.where(torch.arange(V) % 2 == 0, torch.randn(V, generator=g), -math.inf),
        "one finite": torch.tensor([-math.inf] * 7 + [0.0] + [-math.inf] * (V - 8)),
    }
    return rows


@pytest.mark.parametrize("name", list(adversarial_logits()))
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.5), (0, 0.95), (0, 1e-9), (1, 1.0), (2, 0.9),
                                          (5, 0.5), (64, 0.9), (1000, 0.95)])
def test_fast_truncation_equals_the_full_sort_on_adversarial_rows(name, top_k, top_p):
    """Flat tails, exact ties (at the top, in the tail, at the top-p boundary), one dominant token, -inf
    logits, top-k = 1 and >= V, top-p = 1: the same kept tokens and draws as the reference, over 256 draws of
    the row; exactly tied tokens are kept or dropped together, and a -inf logit is never drawn."""
    row = adversarial_logits()[name]
    logits = row.repeat(256, 1)  # (256, V): one row, 256 samples
    params = S.SamplingParams(1, 1.0, top_p, top_k, seed=1)
    keep = S.kept_tokens(logits, top_k, top_p)
    assert torch.equal(keep, reference_kept(logits, top_k, top_p))
    tied = row[:, None] == row[None, :]
    assert (keep[0][:, None] == keep[0][None, :])[tied].all()
    drawn = S.draw(logits, params, *keys(256))
    assert torch.equal(drawn, reference_draw(logits, params, *keys(256)))
    assert keep[0][drawn].all() and (row[drawn] > -math.inf).all()
    if top_k >= len(row):
        assert torch.equal(drawn, S.draw(logits, S.SamplingParams(1, 1.0, top_p, 0, seed=1), *keys(256)))


def test_exact_ties_and_the_boundary_by_hand():
    """Four tied tokens are all kept whatever top_p (none is strictly less probable than another), where a
    sorted cumulative sum would keep as many as top_p needs, in an arbitrary order; probabilities 1/2 and
    1/8 x 4 keep the head alone at top-p 0.5 and everything at top-p just above 0.5."""
    tied = torch.zeros(1, 4)
    for top_p in (0.1, 0.3, 0.6, 1.0):
        assert S.kept_tokens(tied, 0, top_p).all()
    boundary = torch.tensor([[math.log(0.5)] + [math.log(0.125)] * 4])
    assert S.kept_tokens(boundary, 0, 0.5).tolist() == [[True, False, False, False, False]]
    assert S.kept_tokens(boundary, 0, 0.5 + 1e-6).all()
    assert S.kept_tokens(boundary, 1, 1.0).tolist() == [[True, False, False, False, False]]
    assert S.kept_tokens(boundary, 2, 1.0).all()  # the 2nd largest is tied with three others: all kept


def test_draw_is_exact_in_distribution():
    """40,000 draws from a tie-heavy distribution in one call per setting: the frequencies pass a
    chi-square test against the exact truncated, renormalized softmax, and their total variation distance
    from it is at the level of sampling noise."""
    logits = [2.0, 2.0, 1.5, 1.5, 1.5, 1.0, 0.7, 0.7, 0.3, 0.0, 0.0, -0.4, -1.0, -1.0, -2.0, -math.inf]
    n = 40_000
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 0.8), (1.0, 9, 1.0), (1.3, 12, 0.9), (1.0, 0, 0.3)):
        probs = truncated(logits, temperature, top_k, top_p)
        params = S.SamplingParams(1, temperature, top_p, top_k, seed=9)
        drawn = S.draw(torch.tensor([logits]).repeat(n, 1), params, *keys(n))
        counts = np.bincount(drawn.numpy(), minlength=len(logits))
        assert (counts[probs == 0] == 0).all(), (temperature, top_k, top_p)
        stat, dof = chi2(counts, probs)
        assert stat < dof + 5 * math.sqrt(2 * dof), (counts, probs)
        assert 0.5 * np.abs(counts / n - probs).sum() < 0.02


def test_rounding_noise_moves_a_draw_only_at_near_ties():
    """Nearly flat logits perturbed by 1e-6 (another GEMM's rounding), which reorders the near-tied tokens of
    almost every row: a draw changes only in rows whose race has its top two candidates within the
    perturbation, or whose winner is a token the perturbation moved across the top-k or top-p boundary."""
    g = torch.Generator().manual_seed(0)
    logits = 1 + 1e-3 * torch.randn(4000, 500, generator=g)  # (B, V)
    noisy = logits + 1e-6 * torch.randn(logits.shape, generator=g)
    assert (logits.argsort(dim=-1) != noisy.argsort(dim=-1)).any(dim=-1).float().mean() > 0.9  # reordered
    for params in (S.SamplingParams(1, 1.0), S.SamplingParams(1, 1.0, 0.95), S.SamplingParams(1, 0.6, 0.9, 100)):
        race = (logits / params.temperature).double() - S.exponentials(params.seed, *keys(4000), 500).log()
        top2 = race.topk(2, dim=-1).values  # (B, 2)
        near = top2[:, 0] - top2[:, 1] < 1e-5  # (B,)
        a, b = S.draw(logits, params, *keys(4000)), S.draw(noisy, params, *keys(4000))
        flipped = (S.kept_tokens(logits / params.temperature, params.top_k, params.top_p)
                   != S.kept_tokens(noisy / params.temperature, params.top_k, params.top_p))  # (B, V)
        at_boundary = flipped.gather(1, a[:, None])[:, 0] | flipped.gather(1, b[:, None])[:, 0]
        moved = a != b
        assert not (moved & ~near & ~at_boundary).any(), params
        assert moved.sum() <= 20, params  # 0.5%, here from a top-k boundary among nearly equal logits


def test_a_row_draws_the_same_token_in_any_batch():
    """The draw of a row depends on its logits and keys alone: not on the other rows or its position."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 300, generator=g)
    params = S.SamplingParams(1, 1.0, 0.9, 50, seed=4)
    prompt, sample, step = torch.randint(0, 2**32, (3, 64), generator=g)
    full = S.draw(logits, params, prompt, sample, step)
    perm = torch.randperm(64, generator=g)
    assert torch.equal(S.draw(logits[perm], params, prompt[perm], sample[perm], step[perm]), full[perm])
    assert all(S.draw(logits[i:i + 1], params, prompt[i:i + 1], sample[i:i + 1], step[i:i + 1]) == full[i]
               for i in range(0, 64, 9))
    greedy = S.draw(logits.bfloat16(), S.SamplingParams(1), prompt, sample, step)
    assert torch.equal(greedy, logits.bfloat16().argmax(-1))


def test_a_captured_draw_serves_any_length_limit_and_stop_list():
    """A captured decode step is keyed by draw_settings(params): the draw must read nothing else of params
    (here, reading max_new_tokens or stop_ids raises), and settings that change the draw must change the key."""
    class DrawOnly:
        def __init__(self, params):
            self._params = params

        def __getattr__(self, name):
            if name in ("max_new_tokens", "stop_ids"):
                raise AssertionError(f"the draw read {name}")
            return getattr(self._params, name)

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 300, generator=g)
    prompt, sample, step = torch.randint(0, 2**32, (3, 8), generator=g)
    settings = [S.SamplingParams(5), S.SamplingParams(5, 0.6, 0.95), S.SamplingParams(5, 1.0, 1.0, 20, seed=3)]
    for params in settings:
        assert torch.equal(S.draw(logits, DrawOnly(params), prompt, sample, step),
                           S.draw(logits, params, prompt, sample, step))
        other = dataclasses.replace(params, max_new_tokens=900, stop_ids=(1, 2))
        assert S.draw_settings(other) == S.draw_settings(params)
    assert len({S.draw_settings(p) for p in settings + [dataclasses.replace(settings[1], seed=1)]}) == 4


def test_the_default_kv_pool_counts_memory_the_allocator_caches_as_free(monkeypatch):
    """mem_get_info counts what PyTorch's caching allocator holds as taken; a sampler made after another one
    must size its pool from the memory free once that cache is emptied. (A stand-in allocator: no GPU here.)"""
    state = {"cached": 40 * 2**30, "free": 10 * 2**30}

    def empty_cache():
        state["free"] += state["cached"]
        state["cached"] = 0

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * 2**30))
    assert S.free_device_memory(torch.device("cuda")) == 50 * 2**30


def test_draw_runs_on_the_meta_device():
    """Tensors on the meta device have shapes but no values, so this fails on any host synchronization
    (.item(), .tolist(), bool(tensor), a Python branch on a value), any data-dependent shape (nonzero, boolean
    indexing) and any tensor made on the CPU: what capturing the draw in a CUDA graph rules out."""
    prompt = sample = step = torch.arange(4, device="meta")
    logits = torch.empty(4, 1000, device="meta", dtype=torch.bfloat16)
    for params in (S.SamplingParams(1), S.SamplingParams(1, 0.7), S.SamplingParams(1, 0.7, 0.9),
                   S.SamplingParams(1, 0.7, 1.0, 5), S.SamplingParams(1, 0.7, 0.9, 20)):
        tokens = S.draw(logits, params, prompt, sample, step)
        assert tokens.shape == (4,) and tokens.dtype == torch.long


def test_graph_warm_up_fits_one_step_rounds(models):
    """A CUDA graph's two warm-up steps run on buffers sized for one round of sync_every steps: with
    sync_every=1 they hold one output row, and the second warm-up step once wrote past it (an H100 run's
    device-side assert, which cost the rest of that process). Run here on CPU through the in-place path."""
    ours, _ = models
    sampler = S.Sampler(ours, kv_gib=pool_gib(ours, 8), max_slots=2, block_size=4, sync_every=1, in_place=True)
    sampler.cache.decode(sampler.cache.page_table[:2])
    sampler.cache.set_pages([[0]] * 2)
    static = S.DecodeState.empty(2, sampler.sync_every, ours.lm_head.weight.device)
    with torch.inference_mode():
        sampler._warm_up(static, S.SamplingParams(4, temperature=0.7))
    assert static.out.shape == (1, 2) and static.t.item() == 1 and static.steps.tolist() == [2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_draw_replays_in_a_cuda_graph():
    """On a GPU at evaluation size: the draw never synchronizes with the host, and a captured draw replayed on
    new logits and keys gives the eager draw's tokens."""
    B, V = 256, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    params = S.SamplingParams(1, 0.6, 0.95, 20, seed=3)
    logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16, generator=g)
    prompt, sample, step = (k.cuda() for k in keys(B))
    torch.cuda.set_sync_debug_mode("error")
    try:
        S.draw(logits, params, prompt, sample, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        S.draw(logits, params, prompt, sample, step)  # warm-up off the capturing stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = S.draw(logits, params, prompt, sample, step)
    logits.copy_(torch.randn(B, V, device="cuda", dtype=torch.bfloat16, generator=g))
    step += 1
    graph.replay()
    assert torch.equal(tokens, S.draw(logits, params, prompt, sample, step))


@pytest.fixture(scope="module")
def flat_model():
    """A model whose next-token distribution is nearly flat (small weights: logits within ~0.05 of each
    other) over a vocabulary large enough that the batch changes how the logits round."""
    config = M.Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = M.build_model(config, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def test_samples_are_identical_whatever_the_batch_on_a_near_flat_model(flat_model):
    """The hard case: nearly tied logits, whose rounding depends on the batch (padding, GEMM shapes).
    Temperature 1, top-p 0.95: the same samples with 1 slot, 4 slots, the default, and a KV pool so small
    that sequences are preempted and recomputed. (Inverting the CDF over the sorted tokens failed this.)"""
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (3, 17, 5, 29, 11, 8)]
    params = S.SamplingParams(32, 1.0, 0.95, seed=5)
    kw = dict(max_new_tokens=32, temperature=1.0, top_p=0.95, n=3, seed=5)
    one = S.generate(flat_model, batch, max_slots=1, kv_gib=0.1, **kw)
    assert S.generate(flat_model, batch, max_slots=4, kv_gib=0.1, **kw) == one
    assert S.generate(flat_model, batch, kv_gib=0.1, **kw) == one
    sampler = S.Sampler(flat_model, kv_gib=pool_gib(flat_model, 40), block_size=4)
    out = [[] for _ in one]
    for i, j, tokens in sampler.stream(batch, params, n=3):
        out[i * 3 + j] = tokens
    assert sampler.preemptions > 0
    assert out == one
    assert len({tuple(x) for x in one}) == len(one)  # samples differ


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


def test_the_sampler_counts_the_rows_each_step_decoded(models):
    """What bench/bench_sample.py reports as the mean batch: 3 prompts on 2 slots, 6 new tokens each (the first
    drawn from the prefill's logits, 5 decoded): the first two decode together, then the third alone."""
    ours, _ = models
    sampler = S.Sampler(ours, max_slots=2, kv_gib=1.0)
    outs = list(sampler.stream(prompts([4, 9, 6]), S.SamplingParams(6)))
    assert [len(t) for _, _, t in outs] == [6, 6, 6]
    assert (sampler.steps_decoded, sampler.rows_decoded) == (10, 15)


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
