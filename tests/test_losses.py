import pytest
import torch
import torch.nn.functional as F

import losses as L


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_token_logprobs_match_log_softmax(chunk):
    N, H, V = 50, 16, 37
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N, dtype=torch.float64)

    ref = F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]
    ref_gh, ref_gw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    out = L.token_logprobs(hidden, weight, targets, chunk=chunk)
    gh, gw = torch.autograd.grad((out * upstream).sum(), (hidden, weight))

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float())
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_chunked_token_logprobs_bf16_inputs_only_weight_grad():
    hidden = torch.randn(20, 8, dtype=torch.bfloat16)
    weight = torch.randn(13, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 13, (20,))
    out = L.token_logprobs(hidden, weight, targets, chunk=6)
    out.sum().backward()
    ref = F.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(out, ref)
    assert weight.grad.dtype == torch.bfloat16 and torch.isfinite(weight.grad).all()
