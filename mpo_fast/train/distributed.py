"""One process or many (torchrun): process group, DDP / FSDP2 wrapping, per-step agreement.

    ctx = setup("auto")            RANK/WORLD_SIZE from torchrun -> init_process_group (nccl on
                                   GPU, gloo on CPU); one process otherwise
    policy = wrap(MPOModel, ctx)   DDP, or FSDP2 (`fully_shard` on every decoder layer, then on
                                   the root) — the root's forward holds the LM head and the
                                   fused loss, so its gradients are reduced like any other
    with sync_grads(policy, ctx, last_micro_batch): ...   no reduction until the last one
    agree(ctx, ...)                the step's micro-batch count (max) and pair / chosen-token
                                   totals (sum) across ranks, and whether any rank was told
                                   to stop (one small all-reduce per step)
    any_true(ctx, flag)            a stop request between micro-batches, agreed by all ranks

Every rank runs the same number of micro-batches per step: `MPOLoss` all-reduces the BCO mean
inside each call, so the calls must pair up across ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Context", "agree", "all_sum", "any_true", "barrier", "broadcast", "setup", "sync_grads", "teardown",
           "unwrap", "wrap"]


@dataclass(frozen=True)
class Context:
    mode: str  # "none", "ddp" or "fsdp"
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # setup() made the process group (teardown() ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(mode: str = "auto") -> Context:
    """Join the process group torchrun (or the caller) describes in the environment: WORLD_SIZE
    > 1 means several processes ("auto" picks DDP); one process runs unwrapped."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    cuda = torch.cuda.is_available()
    if mode == "none" or (world == 1 and not dist.is_initialized()):
        if world > 1:
            raise ValueError(f"distributed='none' but WORLD_SIZE={world}: pick ddp or fsdp")
        return Context("none", 0, 1, torch.device("cuda" if cuda else "cpu"))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Context(mode, rank, world, device, owns)


def teardown(ctx: Context) -> None:
    """End the process group if `setup` started it (a caller's own group stays)."""
    if ctx.mode != "none" and dist.is_initialized():
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """``module`` wrapped for ``ctx.mode`` (as is for one process)."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if ctx.mode == "fsdp":
        shard(module)
    return module


def shard(module: nn.Module) -> nn.Module:
    """FSDP2: every decoder / vision layer its own group, then the root (embeddings, final
    norm, LM head and the loss live in the root group)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(module):
        fully_shard(layer)
    fully_shard(module)
    return module


def _layers(module: nn.Module) -> list[nn.Module]:
    names = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:  # no hint: the entries of every ModuleList named "layers"
        layers = [m for name, lst in module.named_modules() if name.endswith("layers")
                  and isinstance(lst, nn.ModuleList) for m in lst]
    return layers


def unwrap(module: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 wraps in place)."""
    return getattr(module, "module", module) if _is_ddp(module) else module


def _is_ddp(module: nn.Module) -> bool:
    return type(module).__name__ == "DistributedDataParallel"


@contextlib.contextmanager
def sync_grads(module: nn.Module, ctx: Context, sync: bool):
    """Reduce gradients in this backward only if ``sync`` (the step's last micro-batch)."""
    if ctx.mode == "ddp" and not sync:
        with module.no_sync():
            yield
        return
    if ctx.mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    yield


def agree(ctx: Context, micro_batches: int, pairs: int, chosen_tokens: int,
          stop: bool) -> tuple[int, int, int, bool]:
    """(max micro-batches, total pairs, total chosen tokens, any stop) over the ranks."""
    if ctx.mode == "none":
        return micro_batches, pairs, chosen_tokens, stop
    mine = torch.tensor([micro_batches, pairs, chosen_tokens, int(stop)], device=ctx.device)
    every = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(every, mine)
    g = torch.stack(every).cpu()
    return int(g[:, 0].max()), int(g[:, 1].sum()), int(g[:, 2].sum()), bool(g[:, 3].max())


def any_true(ctx: Context, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (one tiny all-reduce; none for one process): a stop
    request is honoured at the same micro-batch on every rank."""
    if ctx.mode == "none":
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The sum over ranks (a copy; the input is unchanged)."""
    values = values.clone()
    if ctx.mode != "none":
        dist.all_reduce(values)
    return values


def barrier(ctx: Context) -> None:
    if ctx.mode != "none":
        dist.barrier()


def broadcast(obj, ctx: Context):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if ctx.mode == "none":
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
