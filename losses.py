"""The training objectives of the REDI paper as pure functions, and the log-probabilities they consume."""

from __future__ import annotations

import torch
from torch import Tensor


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[target] computed `chunk` rows at a time, forward and backward.

    At 32k tokens the full (T, 151936) fp32 logits take 19 GB; here at most (chunk, V) exist at once, and the
    backward recomputes each chunk's logits from the saved hidden states and per-token logsumexp.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(logp)  # (N,)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.T).float()  # (c, V)
            lse[s:s + chunk] = logits.logsumexp(dim=-1)
            logp[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t, g = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk], grad[s:s + ctx.chunk]
            probs = ((h @ weight.T).float() - lse[s:s + ctx.chunk, None]).exp_()  # (c, V) softmax
            # d logp_t / d logits = onehot(t) - softmax
            dlogits = probs.mul_(-g[:, None])
            dlogits[torch.arange(len(t), device=t.device), t] += g
            dlogits = dlogits.to(hidden.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = dlogits @ weight  # (c, H)
            if need_w:
                grad_w += (dlogits.T @ h).float()  # (V, H)
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """log pi(targets[i] | prefix) for every row of `hidden`: (N, H) hidden states, (V, H) lm_head weight and
    (N,) target ids -> (N,) fp32 log-probs. Targets must be valid ids; mask unwanted positions afterwards."""
    return _ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk)
