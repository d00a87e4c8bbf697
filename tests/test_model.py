"""model.py against Hugging Face transformers' Qwen2ForCausalLM, LlamaForCausalLM and Qwen3ForCausalLM, fp32 on
CPU, on random tiny configs."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import model as M
from conftest import FIXTURES

# Tied and untied heads, GQA ratios 1, 2 and 6, rope_theta 1e4 and 3e5, an explicit head_dim.
CONFIGS = [
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, tie_word_embeddings=True),
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rope_theta=3e5, tie_word_embeddings=False),
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, rope_theta=3e5, tie_word_embeddings=True),
    dict(hidden_size=48, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=False),
    dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
         tie_word_embeddings=False, rms_norm_eps=1e-5),
]
# Llama-3: llama3 RoPE scaling on and off, tied and untied, GQA 1 and 4, and attention_bias (which biases o_proj
# too). With head_dim 8 and an original context of 512, the four frequencies fall in all three llama3 bands.
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512)
CONFIGS += [
    dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4, rope_theta=5e5,
         rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5),
    dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
         rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, rms_norm_eps=1e-5),
    dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4, rope_theta=5e5,
         tie_word_embeddings=False),
    dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e4,
         tie_word_embeddings=True, attention_bias=True),
    # Qwen3: per-head q/k RMSNorm, no biases, head_dim independent of hidden_size
    dict(model_type="qwen3", hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
         rope_theta=1e6, tie_word_embeddings=False),
]
VOCAB = 101


def hf_config(cfg: dict, **kwargs) -> transformers.PreTrainedConfig:
    """One of CONFIGS (written in our Qwen2Config's terms) as a transformers config of its model_type."""
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", "qwen2")
    rope = {"rope_type": "llama3", **cfg.pop("rope_scaling")} if "rope_scaling" in cfg else {"rope_type": "default"}
    rope["rope_theta"] = cfg.pop("rope_theta")
    if model_type == "qwen3":
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])  # Qwen3's default is 128
    return transformers.AutoConfig.for_model(model_type, rope_parameters=rope, **cfg, **kwargs)


def hf_model(cfg: dict) -> transformers.PreTrainedModel:
    """A random HF model with every parameter perturbed: non-zero biases, non-unit norm weights."""
    config = hf_config(cfg, vocab_size=VOCAB, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=range(len(CONFIGS)), ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def pair(request, tmp_path):
    """(hf model, our model loaded from the HF model's save_pretrained)."""
    hf = hf_model(CONFIGS[request.param])
    hf.save_pretrained(tmp_path / "hf")
    ours = M.load_pretrained(tmp_path / "hf")
    return hf, ours


# -----------------------------------------------------------------------------
# Parity


def test_hf_checkpoint_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits)


def test_padded_batch_matches(pair):
    """Left- and right-padded rows give the same logits at real tokens as transformers with the same mask."""
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate() passes for padded rows
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(out[real], ref[real])
    assert torch.isfinite(out).all()  # padding queries are not empty softmax rows


def test_packed_rows_match_separate_forwards(pair):
    """Packing [A, B, C] in one row with restarting positions equals running A, B and C on their own."""
    hf, ours = pair
    lengths = [[5, 1, 9], [7, 8]]  # two rows with different document layouts, 15 tokens each
    docs = [[torch.randint(0, VOCAB, (n,)) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = ours(ids, position_ids=pos)
        ref = torch.stack([torch.cat([hf(d[None]).logits[0] for d in row]) for row in docs])
        own = torch.stack([torch.cat([ours(d[None])[0] for d in row]) for row in docs])
    assert_close(packed, ref)
    assert_close(packed, own)
    hidden = ours(ids, position_ids=pos, return_hidden=True)
    assert hidden.shape == (2, 15, ours.config.hidden_size)
    assert_close(ours.lm_head(hidden), packed)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    for i, cfg in enumerate(CONFIGS):
        config = M.Qwen2Config(vocab_size=VOCAB, intermediate_size=72, num_hidden_layers=2, **cfg)
        ours = M.build_model(config, seed=i)
        with torch.no_grad():  # non-trivial biases and norms
            for p in ours.parameters():
                p.add_(0.1 * torch.randn_like(p))
        M.save_pretrained(ours, tmp_path / f"ours{i}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"ours{i}", dtype=torch.float32).eval()
        assert type(hf).__name__ == M.FAMILIES[config.model_type][0]  # saved as its own family
        ids = torch.randint(0, VOCAB, (2, 13))
        with torch.no_grad():
            assert_close(hf(ids).logits, ours(ids))
        keys = load_file(tmp_path / f"ours{i}" / "model.safetensors").keys()
        assert ("lm_head.weight" in keys) != cfg["tie_word_embeddings"]  # tied heads are stored the HF way
        assert hf.config.tie_word_embeddings == cfg["tie_word_embeddings"]
        assert hf.config.rope_parameters["rope_theta"] == cfg["rope_theta"]
        assert hf.config.rope_parameters["rope_type"] == ("llama3" if "rope_scaling" in cfg else "default")
        back = M.load_pretrained(tmp_path / f"ours{i}")  # and back into ours from the same files
        assert back.config == config


def test_kv_cache_decoding_matches_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = ours(ids)
        cache = M.KVCache(ours.config, batch_size=2, max_len=32)
        steps = [ours(ids[:, :6], cache=cache)]  # prefill 6 tokens, then one token at a time
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(6, 14)]
    assert_close(torch.cat(steps, dim=1), full)
    assert cache.lengths.tolist() == [14, 14]


def test_kv_cache_rows_at_different_lengths(pair):
    """Continuous batching: each slot is prefilled on its own, then all slots decode together."""
    _, ours = pair
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (11, 7, 10)]
    prompt_len = [5, 2, 6]
    cache = M.KVCache(ours.config, batch_size=3, max_len=16)
    outs = [[] for _ in seqs]
    with torch.no_grad():
        for i, (s, n) in enumerate(zip(seqs, prompt_len)):
            outs[i].append(ours(s[None, :n], cache=cache.slot(i))[0])
        for t in range(4):
            step = torch.stack([s[n + t] for s, n in zip(seqs, prompt_len)])[:, None]
            logits = ours(step, cache=cache)
            for i in range(3):
                outs[i].append(logits[i])
        for i, (s, n) in enumerate(zip(seqs, prompt_len)):
            assert_close(torch.cat(outs[i]), ours(s[None, :n + 4])[0])
    assert cache.lengths.tolist() == [9, 6, 10]
    with pytest.raises(ValueError, match="KV cache overflow"):
        ours(torch.zeros(3, 8, dtype=torch.long), cache=cache)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_attention_paths_agree():
    """The GPU packed path (flex_attention BlockMask), the CPU one (documents gathered into a padded batch)
    and an explicit block-diagonal causal mask compute the same attention."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 6, 7], list(range(16))])
    flex = M.build_mask(pos, None, use_flex=True)
    gather = M.build_mask(pos, None, use_flex=False)
    assert flex.block is not None
    assert gather.doc_valid.sum(1).tolist() == [3, 4, 1, 8, 16]  # four documents in row 0, one in row 1
    assert gather.doc_index[0, :3].tolist() == [0, 1, 2] and gather.doc_index[4, :2].tolist() == [16, 17]
    docs = M.document_ids(pos)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    dense = M.AttnMask(dense=(causal & (docs[:, :, None] == docs[:, None, :]))[:, None])
    q, k, v = torch.randn(2, 6, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    assert_close(M.attend(q, k, v, flex), M.attend(q, k, v, dense))
    assert_close(M.attend(q, k, v, gather), M.attend(q, k, v, dense))
    assert M.build_mask(torch.arange(16).expand(2, 16), None, use_flex=True) == M.AttnMask()  # one doc: causal


def test_per_document_attention_equals_the_document_mask_forward_and_backward():
    """model.doc_attention (train.py --attention per-document): one causal call per document, here on its CPU
    path (the reference equations, also the GPU path's check), gives the block-diagonal causal mask's output
    and gradients, including one-token documents; it passes torch.library's checks of a custom op (schema,
    autograd registration, fake tensors, compiled dispatch); and a model forward with doc_lengths equals the
    packed forward through position_ids."""
    lengths = [3, 1, 17, 9, 1, 33]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    N = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, h, 8, generator=g, requires_grad=True) for h in (6, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    docs = M.document_ids(pos)[0]
    dense = M.AttnMask(dense=(torch.ones(N, N, dtype=torch.bool).tril() & (docs[:, None] == docs[None, :]))[None, None])
    heads = lambda x: x.transpose(0, 1)[None]  # noqa: E731  (N, h, hd) -> (1, h, N, hd)
    want = M.attend(heads(q), heads(k), heads(v), dense)[0].transpose(0, 1)
    got, lse = M.doc_attention(q, k, v, bounds)
    assert_close(got, want)
    assert lse.shape == (6, N) and torch.isfinite(lse).all()
    grad = torch.randn(N, 6, 8, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert_close(a, b)
    torch.library.opcheck(M.doc_attention, (q, k, v, bounds))
    # the CUDA path's calls to torch's private cuDNN attention ops, bound on the meta device (arguments in
    # order, outputs unpadded to the document's length), at the real head counts
    meta = [torch.empty(100, h, 128, device="meta", dtype=torch.bfloat16) for h in (12, 2, 2)]
    o, l = M._cudnn_document(*meta, 10, 90, 128)
    assert o.shape == (80, 12, 128) and l.shape == (12, 80) and l.dtype == torch.float32
    grads = M._cudnn_document_grads(meta[0], *meta, meta[0], torch.empty(12, 100, device="meta"), 10, 90, 128)
    assert [g.shape for g in grads] == [(80, 12, 128), (80, 2, 128), (80, 2, 128)]
    for bad in ([0, 5], [0, 40, 30, N], [1, N]):
        with pytest.raises(ValueError, match="document bounds must rise"):
            M.doc_attention(q, k, v, torch.tensor(bad))
    config = M.Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2)
    model = M.build_model(config, seed=0)
    ids = torch.randint(0, 64, (1, N), generator=g)
    assert_close(model(ids, position_ids=pos, doc_lengths=lengths), model(ids, position_ids=pos))
    for bad in ([3, 1, 17], [0, *lengths]):
        with pytest.raises(ValueError, match="doc_lengths must be"):
            model(ids, position_ids=pos, doc_lengths=bad)


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]])
    assert M.document_ids(pos).tolist() == [[1, 1, 1, 2, 3, 3, 4, 4]]


# -----------------------------------------------------------------------------
# Checkpoints: layout, sharding, tokenizer files, atomic writes


def test_sharded_save_roundtrip(tmp_path):
    config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, torch_dtype="bfloat16")
    ours = M.build_model(config)
    M.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=8_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(M.checkpoint_keys(ours))
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in ours.parameters())
    back = M.load_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), k
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert hf.dtype == torch.bfloat16  # config.json records the dtype on disk
    for (k, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_bf16_rope_is_more_accurate_than_transformers():
    """We rotate in fp32 and cast once; transformers casts cos/sin to bf16 first. At real positions (up to 32k)
    our bf16 result is closer to the exact fp32 rotation."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    pos = torch.randint(0, 32768, (1, 512))
    q = torch.randn(1, 4, 512, 128)
    cos, sin = M.rope_cos_sin(pos, 128, 3e5)
    exact = M.apply_rope(q, cos, sin)
    ours = M.apply_rope(q.bfloat16(), cos, sin).float()
    theirs, _ = apply_rotary_pos_emb(q.bfloat16(), q.bfloat16(), cos[:, 0].bfloat16(), sin[:, 0].bfloat16())
    assert (ours - exact).abs().mean() < 0.85 * (theirs.float() - exact).abs().mean()


def test_bf16_forward_tracks_transformers(pair):
    """bf16 logits: our error against the fp32 forward is of the same size as transformers' bf16 error."""
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        exact = hf(ids).logits
        ours_err = (ours.to(torch.bfloat16)(ids).float() - exact).abs().mean()
        hf_err = (hf.to(torch.bfloat16)(ids).logits.float() - exact).abs().mean()
    assert ours_err <= 1.25 * hf_err, (ours_err, hf_err)


def test_load_casts_dtype_and_ties(tmp_path):
    ours = M.build_model(M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True))
    M.save_pretrained(ours, tmp_path / "c")  # stored as float32 (the config's dtype)
    back = M.load_pretrained(tmp_path / "c", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))


def test_tokenizer_files_and_extra_config_keys_carry_over(tmp_path):
    hf = hf_model(CONFIGS[0])
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text('{"fake": 1}')
    (tmp_path / "src" / "generation_config.json").write_text('{"eos_token_id": 7}')
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["some_future_field"] = [1, 2]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    M.save_pretrained(M.load_pretrained(tmp_path / "src"), tmp_path / "dst")
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"fake": 1}'
    assert (tmp_path / "dst" / "generation_config.json").exists()
    out = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert out["some_future_field"] == [1, 2]
    assert out["rope_theta"] == out["rope_parameters"]["rope_theta"] == 1e4


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint at the path untouched."""
    config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
    M.save_pretrained(M.build_model(config, seed=1), tmp_path / "ckpt")
    before = load_file(tmp_path / "ckpt" / "model.safetensors")

    def dying_save(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt  # killed after writing the first shard

    monkeypatch.setattr(M, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        M.save_pretrained(M.build_model(config, seed=2), tmp_path / "ckpt", max_shard_bytes=4_000)
    after = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the partial write was not left behind either
    monkeypatch.undo()
    second = M.build_model(config, seed=2)
    M.save_pretrained(second, tmp_path / "ckpt")  # overwriting works afterwards
    after = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], second.model.embed_tokens.weight)


def test_save_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    model = M.build_model(M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(M.CheckpointError, match="exists and is not a directory we wrote"):
        M.save_pretrained(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# -----------------------------------------------------------------------------
# The real Qwen2.5-Math-1.5B config


def test_real_config_builds_on_meta_with_exact_parameter_count():
    config = M.Qwen2Config.from_pretrained(FIXTURES / "qwen2.5-math-1.5b")
    model = M.build_model(config, device="meta")
    assert model.num_parameters() == 1_543_714_304
    assert config.tie_word_embeddings and config.num_key_value_heads == 2 and config.head_dim == 128
    assert all(p.is_meta for p in model.parameters())


def test_llama_3_2_3b_config_builds_with_exact_parameter_count_and_rope():
    """Llama-3.2-3B-Instruct's config.json (the paper's Appendix D.2 model): 3.21B parameters with its tied head,
    and llama3-scaled RoPE frequencies bit-identical to transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = M.Qwen2Config.from_pretrained(FIXTURES / "llama-3.2-3b-instruct")
    assert config.model_type == "llama" and not config.attention_bias and config.tie_word_embeddings
    assert M.build_model(config, device="meta").num_parameters() == 3_212_749_824
    hf = transformers.LlamaConfig.from_pretrained(FIXTURES / "llama-3.2-3b-instruct")
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    pos = torch.arange(0, 131072, 4099)[None]
    cos, sin = M.rope_cos_sin(pos, 128, config.rope_theta, config.rope_scaling)
    freqs = pos[..., None].float() * theirs
    assert torch.equal(cos[0, 0], torch.cat((freqs, freqs), -1)[0].cos())
    assert not torch.equal(theirs, 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128))  # scaling applied
    out = config.to_dict()  # saved in a layout transformers v5 and v4 (rope_scaling) both read
    assert out["rope_parameters"] == hf.rope_parameters and out["rope_scaling"]["rope_type"] == "llama3"
    assert M.Qwen2Config.from_dict(out) == config
    assert out["architectures"] == ["LlamaForCausalLM"] and out["eos_token_id"] == [128001, 128008, 128009]


@pytest.mark.slow
def test_real_size_bf16_roundtrip_is_bit_exact(tmp_path):
    config = M.Qwen2Config.from_pretrained(FIXTURES / "qwen2.5-math-1.5b")
    model = M.build_model(config, dtype=torch.bfloat16, seed=0)
    M.save_pretrained(model, tmp_path / "big")
    back = M.load_pretrained(tmp_path / "big", dtype=torch.bfloat16)
    assert back.num_parameters() == 1_543_714_304
    theirs = back.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key


# -----------------------------------------------------------------------------
# Bad checkpoints: each gets an error naming the key or file


@pytest.fixture
def good_ckpt(tmp_path):
    config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    M.save_pretrained(M.build_model(config), tmp_path / "good")
    return tmp_path / "good"


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key(good_ckpt):
    _edit_tensors(good_ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(M.CheckpointError, match=r"missing keys \['model.layers.1.self_attn.k_proj.bias'\]"):
        M.load_pretrained(good_ckpt)


def test_unexpected_key(good_ckpt):
    _edit_tensors(good_ckpt, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(M.CheckpointError, match=r"unexpected keys \['model.layers.2.mlp.up_proj.weight'\]"):
        M.load_pretrained(good_ckpt)


def test_wrong_shape(good_ckpt):
    _edit_tensors(good_ckpt, lambda t: t.update({"model.norm.weight": torch.ones(33)}))
    with pytest.raises(M.CheckpointError, match=r"model.norm.weight has shape \[33\].*\[32\]"):
        M.load_pretrained(good_ckpt)


def test_nan_weight(good_ckpt):
    _edit_tensors(good_ckpt, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(M.CheckpointError, match="down_proj.weight contains NaN"):
        M.load_pretrained(good_ckpt)


def test_integer_weight(good_ckpt):
    _edit_tensors(good_ckpt, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(M.CheckpointError, match="model.norm.weight has non-float dtype"):
        M.load_pretrained(good_ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file(good_ckpt, damage):
    file = good_ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:-50], "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00not json", "empty": b""}[damage])
    with pytest.raises(M.CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        M.load_pretrained(good_ckpt)


def test_missing_shard(tmp_path):
    config = M.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
    M.save_pretrained(M.build_model(config), tmp_path / "s", max_shard_bytes=10_000)
    shard = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))[1]
    (tmp_path / "s" / shard).unlink()
    with pytest.raises(M.CheckpointError, match=f"{shard}: shard listed in .* is missing"):
        M.load_pretrained(tmp_path / "s")
    (tmp_path / "s" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(M.CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        M.load_pretrained(tmp_path / "s")


def test_missing_files(tmp_path, good_ckpt):
    with pytest.raises(M.CheckpointError, match="nowhere: not a checkpoint directory"):
        M.load_pretrained(tmp_path / "nowhere")
    (good_ckpt / "model.safetensors").unlink()
    with pytest.raises(M.CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        M.load_pretrained(good_ckpt)
    (good_ckpt / "config.json").write_text("{")
    with pytest.raises(M.CheckpointError, match="config.json: not valid JSON"):
        M.load_pretrained(good_ckpt)


def test_config_that_does_not_match_weights(good_ckpt):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (good_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.CheckpointError, match=r"k_proj.weight has shape \[16, 32\], config.json implies \[32, 32\]"):
        M.load_pretrained(good_ckpt)


# -----------------------------------------------------------------------------
# Unsupported or invalid config fields: refused, never silently different math

BASE = json.loads((FIXTURES / "qwen2.5-math-1.5b" / "config.json").read_text())


@pytest.mark.parametrize("edit, message", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, "layer_types"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 3e5}}, "disagrees"),
    ({"model_type": "llama"}, "model_type"),  # with Qwen2's architectures
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type must be one of"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192}}, "high_freq_factor > low_freq_factor"),
    ({"model_type": None}, "model_type"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"use_mrope": True}, "use_mrope"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"hidden_size": 1537}, "not divisible"),
    ({"head_dim": 127}, "even"),
    ({"num_hidden_layers": 0}, "positive integer"),
    ({"vocab_size": "151936"}, "positive integer"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
])
def test_unsupported_config_is_refused(tmp_path, edit, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **edit}))
    with pytest.raises(M.ConfigError, match=message):
        M.Qwen2Config.from_pretrained(tmp_path)


def test_v4_and_v5_config_layouts_read_the_same():
    v4 = M.Qwen2Config.from_dict({**BASE, "rope_theta": 3e5})
    v5 = {k: v for k, v in BASE.items() if k not in ("rope_theta", "torch_dtype")}
    v5 = M.Qwen2Config.from_dict({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 3e5},
                                  "dtype": "bfloat16", "layer_types": ["full_attention"] * 28})
    assert v4 == v5
    assert v4.rope_theta == 3e5 and v4.torch_dtype == "bfloat16"
    assert M.Qwen2Config.from_dict(v4.to_dict()) == v4  # to_dict round-trips
