"""Stage 1 (SFT) and stage 2 (REDI, and the DPO / SimPO baselines) of the REDI recipe, on FSDP2.

    python train.py --stage sft --model toy/model --data toy/data --out runs/toy-sft          # one process
    torchrun --nproc_per_node 8 train.py --stage sft --model Qwen2.5-Math-1.5B --data data/openr1 \\
        --out runs/sft --rope-theta 300000 --max-position-embeddings 32768
    torchrun --nproc_per_node 8 train.py --stage redi --model runs/sft/final --data data/openr1 --out runs/redi
    torchrun --nproc_per_node 8 train.py --stage dpo ...      # or --stage simpo, or --stage redi --alpha 1
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc_per_node 8 train.py ...  # multi-node

Every flag defaults to the paper's value for the stage (`python train.py --help`). The run writes
`<out>/metrics.jsonl` (one line per optimizer step), `<out>/step-NNNNNN/` checkpoints (`model/` in Hugging
Face layout, `state/` resumable through torch.distributed.checkpoint, `args.json`) and `<out>/final/`. It
writes only into a new or empty --out or one of its own runs (marked by `<out>/RUN`), and stops on a diverging
step (non-finite or exploding loss, gradient or update) before that step's checkpoint is saved, naming the last
healthy one. Ctrl-C ends with one line saying how to continue (`--resume`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import resource
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import data as data_lib
import losses
import model as model_lib

# The paper's settings for each stage (RECIPE.md; Appendix C.3, C.4). lr for REDI depends on alpha: 1e-6 for
# the asymmetric objective, 2e-7 for the symmetric one (alpha = 1), which collapses at 1e-6.
STAGE_DEFAULTS = {
    "sft": dict(lr=5e-5, batch_size=128, epochs=5, max_len=32768),
    "redi": dict(lr=1e-6, batch_size=32, epochs=1, max_len=19800, alpha=0.8),
    "dpo": dict(lr=2e-7, batch_size=32, epochs=1, max_len=19800, beta=0.001),
    "simpo": dict(lr=5e-7, batch_size=32, epochs=1, max_len=19800, beta=2.0, gamma=1.0),
}
# The stages whose loss is linear in the log-probs (Eq. 1, Eq. 5): the head takes their gradient in its forward.
LINEAR = ("sft", "redi")
# Dense bf16 peak FLOP/s by device name (the first match wins), for MFU.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]
# Arguments a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("stage", "data", "alpha", "beta", "gamma", "lr", "betas", "eps", "weight_decay", "warmup_ratio",
               "grad_clip", "batch_size", "max_len", "truncate", "epochs", "max_steps", "seed")
# The file that marks --out as a train.py run: it writes only into a new or empty directory, or one holding this.
RUN_MARKER = "RUN"
# Divergence, judged before a step's checkpoint is saved. An update larger than the weights themselves: AdamW
# moves each weight by about lr, so a healthy step moves the whole by ~lr / (typical weight size), far below 1.
MAX_UPDATE_RATIO = 1.0
# A loss or gradient norm this many times the largest the run has seen (the loss's floor of 1: losses near zero
# move by more than any factor): orders of magnitude beyond the loss rises that REDI's collapse shows.
MAX_GROWTH = 1000.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=list(STAGE_DEFAULTS), required=True,
                   help="sft (stage 1) or the stage-2 objective: redi, dpo or simpo")
    g.add_argument("--model", required=True, help="starting checkpoint directory (Hugging Face layout)")
    g.add_argument("--data", required=True, help="directory written by `python data.py prepare`")
    g.add_argument("--out", required=True, help="run directory: metrics, checkpoints, final model")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--seed", type=int, default=42, help="data order (default 42, as the authors)")
    g = p.add_argument_group("objective")
    g.add_argument("--alpha", type=float, help="REDI weight of the negative trace, Eq. 5 (default 0.8)")
    g.add_argument("--beta", type=float, help="DPO beta, Eq. 2 (default 0.001) or SimPO beta, Eq. 3 (default 2)")
    g.add_argument("--gamma", type=float, help="SimPO margin gamma, Eq. 3 (default 1)")
    g.add_argument("--ref-model", help="DPO reference model (default: --model, the SFT start)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, help="peak learning rate (sft 5e-5, redi 1e-6 or 2e-7 at alpha 1, "
                                            "dpo 2e-7, simpo 5e-7)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="linear warmup over this fraction of the steps, then linear decay to zero")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g = p.add_argument_group("batches")
    g.add_argument("--batch-size", type=int, help="global batch: sequences for sft (128), triplets otherwise (32)")
    g.add_argument("--micro-tokens", type=int,
                   help="token budget of a packed micro-batch per GPU (default: one longest example)")
    g.add_argument("--max-len", type=int, help="longest prompt+response in tokens (sft 32768, others 19800); "
                                               "longer examples are dropped")
    g.add_argument("--truncate", action="store_true", help="truncate responses to --max-len instead of dropping")
    g.add_argument("--epochs", type=int, help="passes over the data (sft 5, others 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--stop-at", type=int, help="checkpoint and exit at this step without changing the schedule "
                                               "(split a run into jobs; continue with --resume)")
    g = p.add_argument_group("model")
    g.add_argument("--rope-theta", type=float, help="override rope_theta (the recipe sets 300000 before SFT)")
    g.add_argument("--max-position-embeddings", type=int, help="override it (the recipe sets 32768)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (bf16 on GPU, fp32 on CPU); "
                                                             "master weights and optimizer state are fp32")
    g.add_argument("--no-ac", action="store_true", help="disable activation checkpointing (on by default on GPU)")
    g.add_argument("--ac", action="store_true", help="enable activation checkpointing on CPU")
    g.add_argument("--ac-scope", choices=("block", "mlp", "ops"),
                   help="what activation checkpointing recomputes in backward (implies it): each decoder block "
                        "(the default: least memory); only each block's MLP (attention's forward runs once); or "
                        "only the elementwise work (every matmul's and attention's output is kept: nearly no "
                        "recompute, more memory; needs --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    g.add_argument("--attention", choices=("mask", "per-document"), default="mask",
                   help="how the documents packed in a micro-batch attend: one call with a document mask "
                        "(flex_attention on GPU), or one call per document (cuDNN on GPU, documents padded to a "
                        "multiple of 128 tokens; faster in isolation on an H100, not yet measured in training; "
                        "PyTorch counts cuDNN attention as not deterministic, so --resume may not give the same bits)")
    g.add_argument("--no-reshard", action="store_true",
                   help="keep the bf16 parameters gathered from a step's first micro-batch to its last, and reduce "
                        "gradients once per step (accumulated unsharded in fp32) instead of after each micro-batch: "
                        "fewer casts, copies and collectives; costs 6 bytes per parameter of memory on each GPU")
    g.add_argument("--eager-head", action="store_true",
                   help="do not compile the chunked head's softmax (compiled by default on GPU), where compiling it "
                        "fails; flex_attention, which packed rows use on GPU, is compiled in any case")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=1, help="print a log line every N steps (all go to JSONL)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-state", type=int, default=1,
                   help="keep the resumable state of this many newest checkpoints (models are all kept)")
    args = p.parse_args(argv)
    if args.no_ac and (args.ac or args.ac_scope):
        p.error("--no-ac contradicts --ac and --ac-scope")
    if args.ac_scope == "ops" and not args.compile:
        # uncompiled, its policy runs as a dispatch mode, under which torch.compile leaves flex_attention to run
        # eagerly: with the (T, T) scores of every packed row materialized
        p.error("--ac-scope ops needs --compile")

    defaults = STAGE_DEFAULTS[args.stage]
    for key, value in defaults.items():
        if getattr(args, key, None) is None and key != "lr":
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 2e-7 if args.stage == "redi" and args.alpha == 1.0 else defaults["lr"]
    args.micro_tokens = args.micro_tokens or args.max_len * (1 if args.stage == "sft" else 2)
    args.betas = tuple(args.betas)
    return args


# -----------------------------------------------------------------------------
# Distributed setup and the model on FSDP2


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's process group (NCCL on GPU, gloo on CPU); a one-process group when run without torchrun, so
    a single process goes through the same FSDP2 code path. On GPU the group is bound to the rank's device
    (device_id): unbound, NCCL guesses a collective's device from the global rank, which it warns can hang
    where ranks do not map to devices that way."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend, timeout = "nccl" if cuda else "gloo", datetime.timedelta(minutes=30)
    bound = {"device_id": device} if cuda else {}
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout, **bound)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timeout, **bound)
    return dist.get_rank(), dist.get_world_size(), device


def load_model(path: str, args) -> model_lib.Qwen2ForCausalLM:
    """A checkpoint in fp32 on the CPU (fully_shard then moves each rank's shard to its device), with the
    recipe's config edits applied."""
    model = model_lib.load_pretrained(path, device="cpu", dtype=torch.float32)
    if args.rope_theta is not None:
        model.config.rope_theta = args.rope_theta
    if args.max_position_embeddings is not None:
        model.config.max_position_embeddings = args.max_position_embeddings
    if args.max_len > model.config.max_position_embeddings:
        raise model_lib.ConfigError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings "
                                    f"{model.config.max_position_embeddings}; pass --max-position-embeddings")
    return model


# What activation checkpointing of scope "ops" keeps: the outputs of the matmuls and of attention, the work
# that costs FLOPs to redo (torchtitan's selective op checkpointing, without its every-other-matmul thinning).
_KEPT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default, torch.ops.higher_order.flex_attention,
             torch.ops.redi.doc_attention.default}


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(model: model_lib.Qwen2ForCausalLM, scope: str) -> None:
    """Recompute in backward, rather than keep, the activations of each decoder block (scope "block"), only
    of each block's MLP (scope "mlp": its SwiGLU intermediates are most of a block's activations, while
    attention's forward, the slowest part to run again, is kept), or only each block's elementwise work
    (scope "ops": norms, RoPE, residuals and SwiGLU's activation are redone, _KEPT_OPS' outputs kept)."""
    for i, block in enumerate(model.model.layers):
        if scope == "block":
            model.model.layers[i] = checkpoint_wrapper(block)
        elif scope == "ops":
            model.model.layers[i] = checkpoint_wrapper(block, context_fn=functools.partial(
                create_selective_checkpoint_contexts, _keep_matmuls_and_attention))
        elif scope == "mlp":
            block.mlp = checkpoint_wrapper(block.mlp)
        else:
            raise ValueError(f"unknown activation checkpointing scope {scope!r}")


def parallelize(model: model_lib.Qwen2ForCausalLM, device: torch.device, *, ac: str | None, compile: bool,
                bf16: bool, reshard: bool = True) -> None:
    """Activation checkpointing (ac: None, "block", "mlp" or "ops", see --ac-scope), then torch.compile, per
    decoder block; then FSDP2 per block and at the root.

    fully_shard keeps fp32 master weights sharded across ranks; MixedPrecisionPolicy all-gathers them as bf16
    for compute and reduces gradients in fp32. The embedding, final norm and (tied) head live in the root
    group, so a tied weight stays one parameter. Forward inputs are not cast: the hidden states are already
    bf16 (the embedding's output), and the RoPE cos/sin that every block receives stay fp32, as in sampling.
    reshard=False keeps each block's gathered parameters after its forward, for its backward (see
    --no-reshard and micro_batch_sync).
    """
    if ac is not None:
        checkpoint_activations(model, ac)
    if compile:
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(block)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:  # (the root keeps its parameters after forward either way)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=None if reshard else False)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def micro_batch_sync(model, last: bool) -> None:
    """With --no-reshard, before each micro-batch: only the step's last one reduces the gradients (until then
    FSDP2 accumulates them unsharded, in the fp32 of its reduce dtype) and gives the gathered parameters back,
    so a step gathers each parameter once and reduces it once, whatever its number of micro-batches."""
    model.set_requires_gradient_sync(last)
    model.set_reshard_after_backward(last)


def sequence_logps(model: model_lib.Qwen2ForCausalLM, mb: data_lib.MicroBatch, compile_head: bool | None = None,
                   per_document: bool = False, loss_of=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed log-probs (S,) and token counts (S,) of the micro-batch's sequences, from one packed forward, and
    loss_of(log-probs, counts) ready for backward if given (else None): a loss linear in the log-probs (SFT,
    REDI), whose gradient the head then takes in its forward, with no recompute (token_logprobs_linear_loss).
    The head runs only on loss tokens, in chunks (losses.token_logprobs; compile_head: its `compile`).
    per_document: attention one document at a time (--attention per-document) instead of a document mask."""
    docs = (mb.doc_lengths or [mb.input_ids.shape[1]]) if per_document else None  # an empty batch: one pad token
    hidden = model(mb.input_ids, position_ids=mb.position_ids, doc_lengths=docs, return_hidden=True)[0]  # (T, H)
    per_seq = lambda tok: torch.zeros(mb.n_seqs, device=tok.device).index_add(0, mb.loss_seq, tok)  # noqa: E731  (S,)
    # (S,) counted on the device: torch.bincount on CUDA waits for the device to size its output
    lengths = per_seq(torch.ones(mb.loss_seq.shape[0], device=hidden.device))
    args = hidden[mb.loss_index], model.lm_head.weight, mb.loss_target
    if loss_of is None:
        return per_seq(losses.token_logprobs(*args, compile=compile_head)), lengths, None
    tok, loss = losses.token_logprobs_linear_loss(*args, lambda tok: loss_of(per_seq(tok), lengths),
                                                  compile=compile_head)
    return per_seq(tok), lengths, loss


def flops(config: model_lib.Qwen2Config, n_params: int, doc_lengths: list[int]) -> float:
    """Training FLOPs as in PaLM's MFU: 6N + 12 L d T per token, T the token's document length (attention is
    within a document). N counts the head but not the input embedding lookup; recompute is not counted."""
    n = n_params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    L, d = config.num_hidden_layers, config.num_attention_heads * config.head_dim
    return sum(t * (6 * n + 12 * L * d * t) for t in doc_lengths)


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then linear decay to zero: Hugging Face's
    get_linear_schedule_with_warmup, which the authors trained with (step 0 has lr 0 when warming up)."""
    warmup = math.ceil(total * args.warmup_ratio)
    if step < warmup:
        return args.lr * step / warmup
    return args.lr * max(0.0, (total - step) / max(1, total - warmup))


def adamw_update_sq(optimizer: torch.optim.AdamW) -> torch.Tensor:
    """||theta_t - theta_(t-1)||^2 over this rank's shards, right after AdamW's step, without a copy of the
    parameters (at 7B on 8 ranks a copy is 3.5 GB per rank). AdamW's step is
    theta_t = theta_(t-1) (1 - lr wd) - a_t, with a_t = lr m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps),
    so theta_(t-1) = (theta_t + a_t) / (1 - lr wd) comes back from the new state one tensor at a time.
    Exact up to rounding; a parameter without a gradient was not stepped and adds nothing."""
    device = next(p for group in optimizer.param_groups for p in group["params"]).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in optimizer.param_groups:
        lr, wd, eps, (b1, b2) = float(group["lr"]), group["weight_decay"], group["eps"], group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            t = state["step"]  # a tensor, on the GPU for fused AdamW: used as one, so there is no host sync
            m, v, theta = (x.to_local() if isinstance(x, DTensor) else x
                           for x in (state["exp_avg"], state["exp_avg_sq"], p.detach()))
            a = lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
            total += torch.linalg.vector_norm(theta - (theta + a) / (1 - lr * wd), dtype=torch.float64) ** 2
    return total


# -----------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints that finished writing: step-NNNNNN directories (a write in progress is .step-NNNNNN.tmp)."""
    return sorted(p for p in out.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def resumable_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints that still hold their training state (--keep-state prunes the older ones')."""
    return [c for c in complete_checkpoints(out) if (c / "state").is_dir()]


def _dcp(op, state: dict, path: Path) -> None:
    """dcp.save or dcp.load. One process needs no coordination: gloo's object gather would also leave an
    OpenMP team in its worker thread, and libgomp, then oversubscribed, stops spin-waiting, so small CPU ops
    get ~10x slower for the rest of the run."""
    with warnings.catch_warnings():  # no_dist warns that it assumes a single process, which it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        op(state, checkpoint_id=path, no_dist=dist.get_world_size() == 1)


def resume_point(out: Path) -> str:
    """Where --resume would continue from, in words, for an error message."""
    resumable = resumable_checkpoints(out)
    if not resumable:
        return "There is no resumable checkpoint yet."
    return f"The last complete checkpoint is {resumable[-1]} (--resume continues from it)."


def save_checkpoint(out: Path, step: int, model, optimizer, args, config, rank: int) -> Path:
    """Write <out>/step-NNNNNN atomically: everything goes to a hidden temporary directory, renamed into place
    by rank 0 only after every rank has finished, so a killed save never looks complete. A write that fails
    (a full disk) ends the run with the checkpoint to resume from, its partial copy removed."""
    final, tmp = out / f"step-{step:06d}", out / f".step-{step:06d}.tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model_lib.save_state_dict(full, config, tmp / "model", tokenizer_from=args.model)
        del full
        _dcp(dcp.save, {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             tmp / "state")
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                    if torch.cuda.is_available() else None}, tmp / "state" / f"rng-{rank}.pt")
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
            (tmp / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    except (OSError, SafetensorError, CheckpointException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # dcp.save reports each rank's error inside its own exception: {rank: (error, traceback)}
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        raise SystemExit(f"error: could not write the checkpoint of step {step} ({cause}); its partial copy is "
                         f"removed. {resume_point(out)}") from e
    dist.barrier()
    if rank == 0:
        tmp.rename(final)
        for old in complete_checkpoints(out)[:-args.keep_state] if args.keep_state > 0 else []:
            shutil.rmtree(old / "state", ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(ckpt: Path, model, optimizer, args, rank: int) -> int:
    saved = json.loads((ckpt / "args.json").read_text())
    changed = [k for k in RESUME_KEYS if json.dumps(saved.get(k)) != json.dumps(getattr(args, k))]
    if changed:
        raise SystemExit(f"error: {ckpt} was written with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with the same arguments")
    if not (ckpt / "state").is_dir():
        raise SystemExit(f"error: {ckpt} has no resumable state (pruned by --keep-state)")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    _dcp(dcp.load, state, ckpt / "state")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = ckpt / "state" / f"rng-{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


# -----------------------------------------------------------------------------
# DPO reference log-probs


@torch.no_grad()
def reference_logps(model, data: data_lib.TokenData, args, device: torch.device, rank: int, world: int) -> torch.Tensor:
    """Summed log-probs of every triplet's chosen and rejected response under the reference model: (n, 2),
    NaN for examples the loader drops. Computed once before training (the policy is still the reference then)
    and cached in <out>/ref_logps.pt, so DPO needs no second model in memory."""
    path = Path(args.out) / "ref_logps.pt"
    key = {"data": data.manifest["inputs"] + data.manifest["tokenizer"], "ref": str(args.ref_model or args.model),
           "max_len": args.max_len, "truncate": args.truncate, "rope_theta": args.rope_theta, "dtype": args.dtype}
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached["key"] == key:
            return cached["logps"].to(device)
    loader = data_lib.Loader(data, batch_size=max(world, 64), max_tokens=args.micro_tokens, max_len=args.max_len,
                             world_size=world, rank=rank, truncate=args.truncate)
    found = []
    for step in range(len(loader)):
        for mb in loader.micro_batches(0, step):
            logps, _, _ = sequence_logps(model, mb.to(device), False if args.eager_head else None,
                                         args.attention == "per-document")
            found += [(int(e), float(c), float(r)) for e, c, r in
                      zip(mb.example_ids[0::2], logps[0::2].tolist(), logps[1::2].tolist())]
    gathered = [found]
    if world > 1:  # (one process skips the object gather: see _dcp)
        gathered = [None] * world
        dist.all_gather_object(gathered, found)
    table = torch.full((len(data), 2), float("nan"), dtype=torch.float64)
    for part in gathered:
        for e, c, r in part:
            table[e] = torch.tensor([c, r], dtype=torch.float64)
    if rank == 0:
        torch.save({"key": key, "logps": table}, path)
    return table.to(device)


# -----------------------------------------------------------------------------
# Training


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    created = not out.exists()
    rank, world, device = setup_distributed()
    try:
        train(args, rank, world, device)
    except BaseException as e:
        if rank == 0 and created and out.is_dir() and all(p.name == RUN_MARKER or (p.is_file() and not p.stat().st_size)
                                                          for p in out.iterdir()):
            shutil.rmtree(out)  # a failed run leaves no empty --out behind
        if isinstance(e, KeyboardInterrupt):
            if rank == 0:
                print(f"\n{interrupted(out)}", flush=True)
            raise SystemExit(130) from None
        raise
    finally:
        dist.destroy_process_group()


def logged_step(line: str) -> int:
    """The step of a metrics.jsonl line; -1 for a line torn by a killed run (dropped on resume)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return -1


def interrupted(out: Path) -> str:
    """One line for Ctrl-C: where the run stands and how to continue it."""
    if not out.is_dir():
        return f"interrupted before training started; nothing was written to {out}"
    metrics = out / "metrics.jsonl"
    steps = [s for line in metrics.read_text().splitlines() if (s := logged_step(line)) > 0] \
        if metrics.is_file() else []
    done = f"interrupted after step {steps[-1]}" if steps else "interrupted before the first step finished"
    ckpts = resumable_checkpoints(out)
    if ckpts:
        return (f"{done}; the newest checkpoint is {ckpts[-1]}: rerun the same command with --resume to continue "
                f"from it")
    return f"{done}; no checkpoint yet (see --save-every): rerun the same command with --resume to start again"


def train(args, rank: int, world: int, device: torch.device) -> None:
    out = Path(args.out)
    log = print if rank == 0 else (lambda *a, **k: None)
    pref = args.stage != "sft"
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    if args.attention == "per-document" and device.type == "cuda" and not bf16:
        raise SystemExit("error: --attention per-document runs cuDNN on GPU, which has no fp32 kernels: "
                         "use --dtype bf16 or the default --attention mask")
    ac_on = (device.type == "cuda" and not args.no_ac) or args.ac or args.ac_scope is not None
    ac = (args.ac_scope or "block") if ac_on else None

    existing = complete_checkpoints(out) if out.is_dir() else []
    # runs written before the marker existed are recognized by their checkpoints
    ours = bool(existing) and all((c / "trainer_state.json").is_file() for c in existing)
    try:
        if not ours:
            model_lib.check_replaceable(out, RUN_MARKER, "choose another --out (train.py writes only into a new "
                                                         "or empty directory, or one of its own runs)")
        if existing and not args.resume:
            raise SystemExit(f"error: {out} already holds checkpoints; pass --resume to continue, or another --out")
        for path in (args.model, args.ref_model):  # the checkpoint paths first: the other checks read them
            if path is not None:
                config = model_lib.Qwen2Config.from_pretrained(path)
                data_lib.load_tokenizer(path, config.vocab_size, data_lib.chat_family(config.model_type))
        data = data_lib.TokenData(args.data, "pref" if pref else "sft")
        data.check_tokenizer(args.model)
        loader = data_lib.Loader(data, batch_size=args.batch_size, max_tokens=args.micro_tokens,
                                 max_len=args.max_len, world_size=world, rank=rank, seed=args.seed,
                                 truncate=args.truncate)
        if rank == 0:  # only now: a run refused for its inputs leaves no directory behind
            model_lib.claim_dir(out, RUN_MARKER, "written by train.py; continue the run with --resume")
        dist.barrier()
        ref = None
        if args.stage == "dpo":  # the reference's log-probs, once, before the policy is even loaded
            ref_model = load_model(args.ref_model or args.model, args)
            parallelize(ref_model, device, ac=None, compile=False, bf16=bf16)
            ref = reference_logps(ref_model, data, args, device, rank, world)
            del ref_model
        model = load_model(args.model, args)
    except (data_lib.DataError, model_lib.ConfigError, model_lib.CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    config = model.config
    n_params = model.num_parameters()

    parallelize(model, device, ac=ac, compile=args.compile, bf16=bf16, reshard=not args.no_reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=args.betas, eps=args.eps,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")

    steps_per_epoch = len(loader)
    total = args.max_steps or args.epochs * steps_per_epoch
    start = 0
    if args.resume and existing:
        start = load_checkpoint(existing[-1], model, optimizer, args, rank)
        log(f"resumed from {existing[-1]} at step {start}")
    elif args.resume:
        log(f"no complete checkpoint in {out}; starting from scratch")
    if rank == 0:  # drop metrics of steps the resumed run will redo
        metrics_path = out / "metrics.jsonl"
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if 0 < logged_step(line) <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    log(f"{args.stage}: {n_params:,} parameters, {len(loader.examples):,} examples ({loader.dropped:,} longer "
        f"than {args.max_len} tokens dropped, {loader.truncated:,} truncated), {total} steps of "
        f"{args.batch_size}, {world} rank(s) on {device.type}, {'bf16' if bf16 else 'fp32'}, "
        f"activation checkpointing {ac or 'off'}")
    if args.compile:  # the first step waits for it, silently (an H100 took 260 s for "ops" from cold caches)
        log("compiling the decoder blocks during the first step: it can take minutes")
    peak_flops = next((f for name, f in PEAK_FLOPS if device.type == "cuda" and
                       name in torch.cuda.get_device_name(device)), None)
    params = [p for p in model.parameters()]
    t_start = time.time()
    step_times, history = [], {"loss": [], "grad_norm": []}

    for step in range(start, total):
        t0 = time.time()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        lr = lr_at(step, total, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_examples, n_loss_tokens = loader.step_counts(epoch, in_epoch)
        # sums over this rank's micro-batches, kept on the device until the step ends: the loss, then the pair
        # statistics of stage_loss; and on the host: tokens, FLOPs
        stats = torch.zeros(6, dtype=torch.float64, device=device)
        host_stats = np.zeros(2)
        try:
            mbs = loader.micro_batches(epoch, in_epoch)
            for k, mb in enumerate(mbs):
                if args.no_reshard:
                    micro_batch_sync(model, last=k == len(mbs) - 1)
                mb = mb.to(device)
                # what is backpropagated: the loss times world (FSDP averages gradients over ranks; the loss is
                # already a share of the global mean), through the head's forward if linear in the log-probs
                linear = (lambda logps, lengths: world * stage_loss(args, logps, lengths, mb, ref, n_examples,
                                                                    n_loss_tokens)[0]) if args.stage in LINEAR else None
                logps, lengths, linear_loss = sequence_logps(model, mb, False if args.eager_head else None,
                                                             args.attention == "per-document", linear)
                loss, pair_stats = stage_loss(args, logps, lengths, mb, ref, n_examples, n_loss_tokens)
                (world * loss if linear_loss is None else linear_loss).backward()
                stats += torch.stack([x.double() for x in (loss.detach(), *pair_stats)])  # no host sync
                host_stats += (sum(mb.doc_lengths), flops(config, n_params, mb.doc_lengths))
        except torch.cuda.OutOfMemoryError:
            less = {None: " or enable activation checkpointing (drop --no-ac)", "mlp": " or pass --ac-scope block",
                    "ops": " or pass --ac-scope block"}
            raise SystemExit(f"error: out of memory at step {step + 1} (rank {rank}, micro-batches of up to "
                             f"{args.micro_tokens} tokens): lower --micro-tokens{less.get(ac, '')}") from None
        except torch._dynamo.exc.TorchDynamoException as e:
            raise SystemExit(f"error: torch.compile failed at step {step + 1} ({type(e).__name__}: {str(e)[:500]}); "
                             f"rerun without --compile, or with --eager-head if it failed in the head") from e
        stats = torch.cat([stats, torch.tensor(host_stats, device=device)])
        dist.all_reduce(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        loss_value = float(stats[0])
        bad = diverged_values(loss_value, grad_norm, history)
        if bad:  # the weights of step `step` gave these values: its checkpoint is not healthy either
            stop_diverged(out, step + 1, f"{bad}; stopped before the optimizer step", step, rank)
        history["loss"].append(loss_value)
        history["grad_norm"].append(grad_norm)
        weight_sq = (torch.stack(torch._foreach_norm([p.detach().to_local() for p in params])).double() ** 2).sum()
        optimizer.step()
        norms_sq = torch.stack([adamw_update_sq(optimizer), weight_sq])  # (update, weights before), this rank's
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(norms_sq)
        update_norm, weight_norm = norms_sq.sqrt().tolist()

        dt = time.time() - t0
        step_times.append(dt)
        record = metrics_record(args, step + 1, epoch, lr, loss_value, grad_norm, update_norm, stats,
                                dt, world, peak_flops, device)
        record["eta_s"] = round(float(np.mean(step_times[-20:])) * (total - step - 1))
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                # non-finite values as null: strict JSON (the divergence check below stops the run on them)
                f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                    for k, v in record.items()}, allow_nan=False) + "\n")
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                log(format_record(record, total))
        if not update_norm <= MAX_UPDATE_RATIO * weight_norm:  # before this step's checkpoint is saved
            stop_diverged(out, step + 1, f"the update norm {update_norm:.3g} exceeds the norm of the weights it "
                                         f"updated, {weight_norm:.3g}", step + 1, rank)
        done = step + 1 == total
        if (args.save_every and (step + 1) % args.save_every == 0) or done or step + 1 == args.stop_at:
            path = save_checkpoint(out, step + 1, model, optimizer, args, config, rank)
            log(f"saved {path}")
        if step + 1 == args.stop_at and not done:
            log(f"stopped at step {step + 1} as asked; continue with --resume")
            return
    if rank == 0:  # the last step always checkpoints: final/ is a copy of its model, not a second gather
        tmp, last = out / f".final.tmp-{os.getpid()}", complete_checkpoints(out)[-1]
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last / "model", tmp)
            model_lib.replace_dir(tmp, out / "final")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"error: trained, but could not copy {last / 'model'} to {out / 'final'} ({e}); "
                             f"the trained model is {last / 'model'}") from e
        log(f"done: {total} steps in {time.time() - t_start:.0f}s; model in {out / 'final'}")
    dist.barrier()


def diverged_values(loss: float, grad_norm: float, history: dict[str, list[float]]) -> str | None:
    """What is wrong with a step's loss and gradient norm, if anything: non-finite, or exploding against the
    largest values seen so far (MAX_GROWTH; since this process started, so a resumed run rebuilds its history)."""
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            return f"non-finite {name} ({value})"
    past_loss, past_grad = max(map(abs, history["loss"]), default=None), max(history["grad_norm"], default=None)
    if past_loss is not None and abs(loss) > MAX_GROWTH * max(past_loss, 1.0):
        return f"the loss exploded to {loss:.3g} (the run's largest so far: {past_loss:.3g})"
    if past_grad and grad_norm > MAX_GROWTH * past_grad:
        return f"the gradient norm exploded to {grad_norm:.3g} (the run's largest so far: {past_grad:.3g})"
    return None


def stop_diverged(out: Path, step: int, what: str, healthy_before: int, rank: int) -> None:
    """Stop a diverging run, naming the last healthy checkpoint. Checkpoints from step `healthy_before` on hold
    weights that diverged: they are moved aside (diverged-step-NNNNNN) so that --resume cannot pick them."""
    moved = []
    for ckpt in complete_checkpoints(out):
        if int(ckpt.name[5:]) >= healthy_before:
            aside = out / f"diverged-{ckpt.name}"
            if rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                ckpt.rename(aside)
            moved.append(aside.name)
    healthy = [c for c in complete_checkpoints(out) if int(c.name[5:]) < healthy_before]
    msg = f"error: training diverged at step {step}: {what}."
    if moved:
        msg += f" Its weights came from {', '.join(moved)} (moved aside; --resume will not use it)."
    if not healthy:
        msg += " There is no healthy checkpoint."
    elif (healthy[-1] / "state").is_dir():
        msg += f" The last healthy checkpoint is {healthy[-1]} (--resume continues from it)."
    else:
        msg += (f" The last healthy checkpoint is {healthy[-1]} (its model/; its resumable state was pruned, "
                f"see --keep-state).")
    raise SystemExit(msg + " Lower --lr or check the data." if rank == 0 else 1)  # one message, not one per rank


def stage_loss(args, logps, lengths, mb, ref, n_examples: int, n_loss_tokens: int):
    """This micro-batch's share of the stage's loss, and sums for the log (zero for SFT): chosen and rejected
    mean per-token log-prob (the paper's LogPS), reward margin, correctly ordered pairs, pairs."""
    if args.stage == "sft":
        return losses.sft_loss(logps, n_loss_tokens), [logps.new_zeros(())] * 5
    c, r = logps[0::2], logps[1::2]  # (P,) chosen and rejected of each triplet
    lc, lr_ = lengths[0::2], lengths[1::2]
    if args.stage == "redi":
        loss = losses.redi_loss(c, lc, r, lr_, args.alpha, n_examples)
        margin = c / lc - r / lr_
    elif args.stage == "simpo":
        loss = losses.simpo_loss(c, lc, r, lr_, args.beta, args.gamma, n_examples)
        margin = args.beta * (c / lc - r / lr_)
    else:
        ids = mb.example_ids[0::2]
        ref_c, ref_r = ref[ids, 0].float(), ref[ids, 1].float()
        loss = losses.dpo_loss(c, r, ref_c, ref_r, args.beta, n_examples)
        margin = args.beta * ((c - ref_c) - (r - ref_r))
    with torch.no_grad():  # tensors, summed on the device: no host sync per micro-batch
        return loss, [(c / lc).sum(), (r / lr_).sum(), margin.sum(), (margin > 0).sum(), c.new_full((), len(c))]


def metrics_record(args, step, epoch, lr, loss, grad_norm, update_norm, stats, dt, world, peak_flops, device) -> dict:
    _, logp_c, logp_r, margin, correct, pairs, tokens, n_flops = stats.tolist()
    rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "update_norm": update_norm,
           "tokens": int(tokens), "tokens_per_s": tokens / dt, "step_s": dt,
           # MFU: model FLOPs of the step over what the devices could have done meanwhile
           "mfu": n_flops / (dt * world * peak_flops) if peak_flops else None}
    if args.stage != "sft":
        rec |= {"logps_chosen": logp_c / pairs, "logps_rejected": logp_r / pairs, "margin": margin / pairs,
                "accuracy": correct / pairs}
    rec["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return rec


def format_record(r: dict, total: int) -> str:
    """One fixed-format line per step."""
    eta = str(datetime.timedelta(seconds=r["eta_s"]))
    parts = [f"step {r['step']:>6}/{total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"gnorm {r['grad_norm']:.3f}", f"upd {r['update_norm']:.2e}"]
    if "logps_chosen" in r:
        parts += [f"logps {r['logps_chosen']:.3f}/{r['logps_rejected']:.3f}", f"margin {r['margin']:.4f}",
                  f"acc {r['accuracy']:.2f}"]
    mfu = f"mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "mfu n/a"
    parts += [f"{r['tokens_per_s']:,.0f} tok/s", mfu, f"mem {r['peak_mem_gib']:.1f}GiB", f"{r['step_s']:.2f}s",
              f"eta {eta}"]
    return " | ".join(parts)


if __name__ == "__main__":
    main()
