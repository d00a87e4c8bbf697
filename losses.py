"""The training objectives of the REDI paper (arXiv 2505.24850) as pure functions, and the log-probs they use.

Every loss takes per-sequence summed log-probs log pi(y|x) and token counts |y| of the sequences in one
micro-batch, and a normalizer: the size of the whole global batch (tokens for SFT, triplets otherwise). Each
returns that micro-batch's share of the global-batch mean, so the shares of all micro-batches on all ranks
add up to exactly the paper's loss, whatever the micro-batch size or world size.
"""

from __future__ import annotations

import functools

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


def _logsumexp_and_pick(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(c, V) logits in the model's dtype, (c,) targets -> fp32 logsumexp and log-prob of each target, (c,) each."""
    x = logits.float()
    lse = x.logsumexp(dim=-1)
    return lse, x.gather(1, targets[:, None])[:, 0] - lse


def _dlogits(logits: Tensor, lse: Tensor, targets: Tensor, grad: Tensor) -> Tensor:
    """grad * d logp_t / d logits = grad (onehot(t) - softmax), (c, V) in the logits' dtype, rounded as
    -grad * softmax, then + grad at the target (a change of one rounding here changes the demo's outcome)."""
    onehot = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]  # (c, V)
    d = (logits.float() - lse[:, None]).exp() * -grad[:, None]
    return torch.where(onehot, d + grad[:, None], d).to(logits.dtype)


@functools.cache
def _addmm_into_fp32(device: torch.device) -> bool:
    """Whether addmm adds a bf16 product straight into an fp32 matrix on this device (its out_dtype: CUDA
    only). The head's weight gradient then takes one GEMM per chunk instead of a bf16 product and an fp32 add
    over all (V, H) entries: ~1 ms per chunk on an H100 at Qwen2's vocabulary (bench/gpu.py's profile), and
    no rounding of the product to bf16. Checked once by running it: torch 2.11's own decomposition of this
    overload (used on the meta device) takes out_dtype for beta and fails."""
    if device.type != "cuda":
        return False
    ones = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    acc = torch.ones(16, 16, device=device)
    try:
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 17).all())


@functools.cache
def _compiled(fn):
    # Uncompiled, each chunk's fp32 logits are written, read and rewritten by ~6 elementwise passes (~5 GB
    # of traffic per 1,024 tokens at Qwen2's 151,936-token vocabulary); compiled, one pass reads the bf16
    # logits and, in backward, writes the bf16 gradient. The last chunk is shorter: dynamic shapes.
    return torch.compile(fn, dynamic=True)


def _head_grads(hidden: Tensor, weight: Tensor, need_h: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """Buffers for the head's gradients: (N, H) for the hidden states, each row written once by its chunk, and
    (V, H) fp32 for the weight, zeroed, every chunk adding to it."""
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros_like(weight, dtype=torch.float32) if need_w else None)


def _add_chunk_grads(c: slice, logits: Tensor, lse: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                     grad: Tensor, dlogits_of, grad_h: Tensor | None, grad_w: Tensor | None) -> None:
    """Writes chunk c's rows of grad_h and adds its share to grad_w, from its logits (c, V) and logsumexp (c,),
    for the upstream gradient `grad` (N,) of the log-probs."""
    h = hidden[c]
    dlogits = dlogits_of(logits, lse, targets[c], grad[c])  # (c, V)
    if grad_h is not None:
        grad_h[c] = dlogits @ weight  # (c, H)
    if grad_w is not None and _addmm_into_fp32(hidden.device):  # (V, H): one GEMM accumulating in fp32
        torch.addmm(grad_w, dlogits.T, h, out_dtype=torch.float32, out=grad_w)
    elif grad_w is not None:
        grad_w += dlogits.T @ h  # (V, H), the product rounded to the weight's dtype, then added


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[target] computed `chunk` rows at a time, forward and backward.

    At 32k tokens the full (T, 151936) fp32 logits take 19 GB; here at most (chunk, V) exist at once, and the
    backward recomputes each chunk's logits from the saved hidden states and per-token logsumexp.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, compile: bool) -> Tensor:
        pick = _compiled(_logsumexp_and_pick) if compile else _logsumexp_and_pick
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(logp)  # (N,)
        for s in range(0, hidden.shape[0], chunk):
            lse[s:s + chunk], logp[s:s + chunk] = pick(hidden[s:s + chunk] @ weight.T, targets[s:s + chunk])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.compile = chunk, compile
        return logp

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        dlogits_of = _compiled(_dlogits) if ctx.compile else _dlogits
        grad_h, grad_w = _head_grads(hidden, weight, *ctx.needs_input_grad[:2])
        for s in range(0, hidden.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            _add_chunk_grads(c, hidden[c] @ weight.T, lse[c], hidden, weight, targets, grad, dlogits_of,
                             grad_h, grad_w)  # recomputed logits
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None


class _LinearLossHead(torch.autograd.Function):
    """The chunked head for a loss linear in the token log-probs, with the token weights `grad` (its gradient)
    known before the forward: each chunk's gradients are taken from its logits while they exist, so nothing
    is recomputed. Outputs the log-probs (N,), not differentiable, and a zero scalar that carries the loss's
    gradient: the backward scales the gradients computed in the forward by the zero's upstream gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, grad: Tensor, chunk: int,
                compile: bool) -> tuple[Tensor, Tensor]:
        pick = _compiled(_logsumexp_and_pick) if compile else _logsumexp_and_pick
        dlogits_of = _compiled(_dlogits) if compile else _dlogits
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        grad_h, grad_w = _head_grads(hidden, weight, *ctx.needs_input_grad[:2])
        for s in range(0, hidden.shape[0], chunk):
            c = slice(s, s + chunk)
            logits = hidden[c] @ weight.T  # (c, V)
            lse, logp[c] = pick(logits, targets[c])
            _add_chunk_grads(c, logits, lse, hidden, weight, targets, grad, dlogits_of, grad_h, grad_w)
        ctx.mark_non_differentiable(logp)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return logp, logp.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor, scale: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * scale if grad_h is not None else None, grad_w * scale if grad_w is not None else None,
                None, None, None, None)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024,
                   compile: bool | None = None) -> Tensor:
    """log pi(targets[i] | prefix) for every row of `hidden`: (N, H) hidden states, (V, H) lm_head weight and
    (N,) target ids -> (N,) fp32 log-probs. Targets must be valid ids; mask unwanted positions afterwards.
    compile: fuse each chunk's softmax work with torch.compile (default: on CUDA)."""
    return _ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk, hidden.is_cuda if compile is None else compile)


def token_logprobs_linear_loss(hidden: Tensor, weight: Tensor, targets: Tensor, loss_of, chunk: int = 1024,
                               compile: bool | None = None) -> tuple[Tensor, Tensor]:
    """token_logprobs followed by loss_of, for a loss linear (affine) in the token log-probs, as SFT's Eq. (1)
    and REDI's Eq. (5) are: (N,) log-probs (not differentiable) and the loss, whose backward gives the same
    gradients, bit for bit, without recomputing the logits: a third of the head's GEMMs.

    loss_of: (N,) fp32 token log-probs -> scalar. Its gradient, the weight of each token in the loss, does not
    depend on the log-probs; autograd reads it once, at zero, before the head runs."""
    probe = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device, requires_grad=True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(loss_of(probe), probe, allow_unused=True, materialize_grads=True)
    logp, zero = _LinearLossHead.apply(hidden, weight, targets, grad, chunk,
                                       hidden.is_cuda if compile is None else compile)
    return logp, loss_of(logp) + zero
