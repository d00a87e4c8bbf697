import pytest
import torch
import torch.nn.functional as F

import losses as L


@pytest.mark.parametrize("chunk, compile", [(1, False), (7, False), (64, False), (1000, False), (7, True),
                                            (1000, True)])
def test_chunked_token_logprobs_match_log_softmax(chunk, compile):
    """Against log_softmax in fp64, with each chunk's softmax work eager or compiled (the default on CUDA)."""
    N, H, V = 50, 16, 37
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N, dtype=torch.float64)

    ref = F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]
    ref_gh, ref_gw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    out = L.token_logprobs(hidden, weight, targets, chunk=chunk, compile=compile)
    gh, gw = torch.autograd.grad((out * upstream).sum(), (hidden, weight))

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float())
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True])
def test_chunked_token_logprobs_bf16_inputs_only_weight_grad(compile):
    hidden = torch.randn(20, 8, dtype=torch.bfloat16)
    weight = torch.randn(13, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 13, (20,))
    out = L.token_logprobs(hidden, weight, targets, chunk=6, compile=compile)
    out.sum().backward()
    logits = (hidden @ weight.T).float()
    ref = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(out, ref)
    ref_grad = (F.one_hot(targets, 13) - logits.softmax(-1)).to(torch.bfloat16).T.float() @ hidden.float()
    assert weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad.float(), ref_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile", [False, True])
def test_linear_loss_head_equals_token_logprobs_then_the_loss(dtype, compile):
    """token_logprobs_linear_loss, which takes the head's gradients in its forward, against token_logprobs
    followed by the same loss: REDI's Eq. (5) over sequences of ragged lengths, scaled as train.py scales it,
    chunks that do not divide the tokens. Log-probs, loss and both gradients: the same bits."""
    N, H, V, S = 37, 16, 50, 6
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    seq = torch.randint(0, S, (N,))
    lengths = torch.zeros(S).index_add_(0, seq, torch.ones(N)).clamp(min=1)

    def loss_of(tok):
        logps = torch.zeros(S).index_add(0, seq, tok)
        return 3 * L.redi_loss(logps[0::2], lengths[0::2], logps[1::2], lengths[1::2], alpha=0.8, n_pairs=7)

    tok = L.token_logprobs(hidden, weight, targets, chunk=8, compile=compile)
    loss = loss_of(tok)
    fused_tok, fused_loss = L.token_logprobs_linear_loss(hidden, weight, targets, loss_of, chunk=8, compile=compile)
    assert not fused_tok.requires_grad
    assert torch.equal(fused_tok, tok) and torch.equal(fused_loss, loss)
    for got, expected in zip(torch.autograd.grad(fused_loss, (hidden, weight)),
                             torch.autograd.grad(loss, (hidden, weight))):
        assert got.dtype == dtype and torch.equal(got, expected)


def test_linear_loss_head_scales_by_its_upstream_gradient_and_takes_no_tokens():
    """Only the weight needing a gradient, the loss scaled after the fact, and a micro-batch without loss tokens."""
    hidden, targets = torch.randn(20, 8), torch.randint(0, 13, (20,))
    weight = torch.randn(13, 8, requires_grad=True)
    _, loss = L.token_logprobs_linear_loss(hidden, weight, targets, lambda tok: -tok.sum() / 20, chunk=6)
    (2.5 * loss).backward()
    expected = torch.autograd.grad(-2.5 * L.token_logprobs(hidden, weight, targets, chunk=6).sum() / 20, weight)[0]
    torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=1e-7)
    tok, loss = L.token_logprobs_linear_loss(hidden[:0], weight, targets[:0], lambda tok: -tok.sum())
    loss.backward()
    assert tok.shape == (0,) and loss.item() == 0


def test_losses_against_hand_computed_values():
    # SFT (Eq. 1): -(sum of log-probs) / tokens in the global batch
    assert L.sft_loss(torch.tensor([-2.0, -3.0]), n_tokens=10).item() == pytest.approx(0.5)
    c, lc = torch.tensor([-4.0, -1.0]), torch.tensor([2.0, 4.0])
    r, lr = torch.tensor([-9.0, -6.0]), torch.tensor([3.0, 2.0])
    # REDI (Eq. 5): pair 1: 4/2 + 0.8 * (-9/3) = -0.4; pair 2: 1/4 + 0.8 * (-6/2) = -2.15; mean over 2 pairs
    assert L.redi_loss(c, lc, r, lr, alpha=0.8, n_pairs=2).item() == pytest.approx((-0.4 - 2.15) / 2)
    assert L.redi_loss(c, lc, r, lr, alpha=0.0, n_pairs=2).item() == pytest.approx((2.0 + 0.25) / 2)
    # DPO (Eq. 2): margin 0.1 * ((-5 + 6) - (-7 + 6)) = 0.2 -> log(1 + e^-0.2)
    dpo = L.dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0]),
                     beta=0.1, n_pairs=1)
    assert dpo.item() == pytest.approx(0.5981388693)
    # SimPO (Eq. 3): margin 2 * (-4/2 - (-9/3)) - 1 = 1 -> log(1 + e^-1)
    simpo = L.simpo_loss(c[:1], lc[:1], r[:1], lr[:1], beta=2.0, gamma=1.0, n_pairs=1)
    assert simpo.item() == pytest.approx(0.3132616875)
    # a micro-batch's share: two halves of the batch add up to the whole-batch loss
    whole = L.redi_loss(c, lc, r, lr, 0.8, n_pairs=2)
    halves = L.redi_loss(c[:1], lc[:1], r[:1], lr[:1], 0.8, 2) + L.redi_loss(c[1:], lc[1:], r[1:], lr[1:], 0.8, 2)
    assert halves.item() == pytest.approx(whole.item())


def test_redi_gradient_is_minus_one_over_length_and_alpha_over_length():
    c = torch.tensor([-40.0, -10.0, -7.0], requires_grad=True)
    r = torch.tensor([-90.0, -60.0, -3.0], requires_grad=True)
    lc, lr = torch.tensor([20.0, 40.0, 7.0]), torch.tensor([30.0, 20.0, 1.0])
    L.redi_loss(c, lc, r, lr, alpha=0.8, n_pairs=3).backward()
    torch.testing.assert_close(c.grad, -1.0 / (lc * 3))
    torch.testing.assert_close(r.grad, 0.8 / (lr * 3))


def test_simpo_gradient_tends_to_sigmoid_gamma_times_symmetric_redi():
    """Appendix B, Proposition B.3: grad L_SimPO / beta -> sigmoid(gamma) grad L_symm as beta -> 0."""
    c, r = torch.tensor([-40.0, -12.0]), torch.tensor([-90.0, -20.0])
    lc, lr = torch.tensor([20.0, 6.0]), torch.tensor([30.0, 4.0])
    gamma = 1.0

    def grads(loss_fn):
        ci, ri = c.clone().requires_grad_(), r.clone().requires_grad_()
        loss_fn(ci, ri).backward()
        return torch.cat([ci.grad, ri.grad])

    symm = grads(lambda ci, ri: L.redi_loss(ci, lc, ri, lr, alpha=1.0, n_pairs=2))
    target = torch.sigmoid(torch.tensor(gamma)) * symm
    errors = []
    for beta in (1e-1, 1e-2, 1e-3, 1e-4):
        simpo = grads(lambda ci, ri: L.simpo_loss(ci, lc, ri, lr, beta=beta, gamma=gamma, n_pairs=2)) / beta
        errors.append(((simpo - target).norm() / target.norm()).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4, errors
    assert errors[0] > 1e-3  # at a large beta the two really differ


def test_dpo_gradient_weights_summed_logprobs_by_beta_sigmoid():
    c, r = torch.tensor([-50.0], requires_grad=True), torch.tensor([-55.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-52.0]), torch.tensor([-52.0])
    beta = 0.1
    L.dpo_loss(c, r, ref_c, ref_r, beta=beta, n_pairs=1).backward()
    weight = beta * torch.sigmoid(-beta * torch.tensor(2.0 + 3.0))  # -beta * margin where margin = 5
    torch.testing.assert_close(c.grad, -weight.reshape(1))
    torch.testing.assert_close(r.grad, weight.reshape(1))


def test_the_head_gradient_keeps_its_rounding():
    """The demo's outcome turns on single roundings (BENCHMARKS.md, "Rounding"): uncompiled, the head's
    gradient is -grad * softmax, then + grad at the target, bit for bit as before its rewrite."""
    g = torch.Generator().manual_seed(0)
    logits, grad = torch.randn(64, 37, generator=g), torch.randn(64, generator=g)
    targets = torch.randint(0, 37, (64,), generator=g)
    lse = logits.logsumexp(dim=-1)
    expected = (logits - lse[:, None]).exp().mul_(-grad[:, None])
    expected[torch.arange(64), targets] += grad
    assert torch.equal(L._dlogits(logits, lse, targets, grad), expected)
