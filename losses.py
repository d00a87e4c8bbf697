"""The training objectives of the REDI paper (arXiv 2505.24850) as pure functions, and the log-probs they use.

Every loss takes per-sequence summed log-probs log pi(y|x) and token counts |y| of the sequences in one
micro-batch, and a normalizer: the size of the whole global batch (tokens for SFT, triplets otherwise). Each
returns that micro-batch's share of the global-batch mean, so the shares of all micro-batches on all ranks
add up to exactly the paper's loss, whatever the micro-batch size or world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sft_loss(logps: Tensor, n_tokens: float) -> Tensor:
    """Eq. (1): -log pi(y_w|x), as trained: negative log-likelihood averaged over every trace token of the
    global batch. logps (S,) summed log-probs of this micro-batch's traces; n_tokens: trace tokens in the
    global batch."""
    return -logps.sum() / n_tokens


def redi_loss(chosen_logps: Tensor, chosen_lengths: Tensor, rejected_logps: Tensor, rejected_lengths: Tensor,
              alpha: float, n_pairs: float) -> Tensor:
    """Eq. (5): -log pi(y_w|x)/|y_w| + alpha * log pi(y_l|x)/|y_l|, averaged over the pairs of the batch.

    alpha = 1 is the symmetric objective (Eq. 4); alpha = 0 is length-normalized SFT on the positives.
    Its gradient w.r.t. log pi(y_w|x) is -1/(|y_w| n_pairs) and w.r.t. log pi(y_l|x) is +alpha/(|y_l| n_pairs).
    """
    per_pair = -chosen_logps / chosen_lengths + alpha * rejected_logps / rejected_lengths  # (P,)
    return per_pair.sum() / n_pairs


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float, n_pairs: float) -> Tensor:
    """Eq. (2): -log sigmoid(beta ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), with summed
    (not length-normalized) log-probs and a frozen reference model, averaged over the pairs of the batch."""
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))  # (P,)
    return -F.logsigmoid(margin).sum() / n_pairs


def simpo_loss(chosen_logps: Tensor, chosen_lengths: Tensor, rejected_logps: Tensor, rejected_lengths: Tensor,
               beta: float, gamma: float, n_pairs: float) -> Tensor:
    """Eq. (3): -log sigmoid(beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma), averaged over the pairs.

    As beta -> 0 its gradient divided by beta tends to sigmoid(gamma) times the gradient of Eq. (4)
    (Appendix B, Proposition B.3)."""
    margin = beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - gamma  # (P,)
    return -F.logsigmoid(margin).sum() / n_pairs


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
                grad_w += dlogits.T @ h  # (V, H), added into fp32 without an fp32 copy of the product
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """log pi(targets[i] | prefix) for every row of `hidden`: (N, H) hidden states, (V, H) lm_head weight and
    (N,) target ids -> (N,) fp32 log-probs. Targets must be valid ids; mask unwanted positions afterwards."""
    return _ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk)
