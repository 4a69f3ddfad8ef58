"""Training on several processes: ``torchrun --nproc-per-node N -m lorakit train ... [--fsdp]``.

torchrun starts N copies of the same command and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; ``init_distributed`` reads them (gloo on CPU, NCCL on CUDA, one GPU per process). Without
them (a plain ``lorakit train``) it returns a one-process ``Dist`` whose methods do nothing.

Same global batch as one process. Every rank draws the same B indices for a step (the batch order
is a function of (seed, step), train/data.py) and keeps its own contiguous B/N of them. Each rank's
loss is the mean over its B/N rows and DDP averages the gradients over ranks, so

    (1/N) sum_k (N/B) sum_{i in rank k} g_i  =  (1/B) sum_i g_i,

the single-process gradient of the mean loss. Only the summation order differs (float rounding).

DDP: ``DistributedDataParallel`` registers only parameters with ``requires_grad``, so only adapter
(and head) gradients are all-reduced; frozen base weights get no gradient and no traffic.

FSDP2 (``fully_shard``, for a base too big for one device): every block inside an ``nn.ModuleList``
(the transformer layers) is one unit, then the root. FSDP2 shards each parameter on its own (a DTensor,
dim-0 shards), so one unit may hold frozen and trainable parameters: FSDP1's flat parameter needed a
uniform ``requires_grad`` per unit (or ``use_orig_params=True``), FSDP2 does not. Frozen parameters
get no gradient and so no reduce-scatter. Saving gathers the full tensors (``full_tensor()``) and rank 0
alone writes them; a gathered tensor must have its model shape, never a shard or an empty ``[0]``.

Rank 0 alone writes files (metrics, checkpoints, adapter, result.json); every rank evaluates the same
validation set, so early-stopping decisions agree without a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from lorakit.errors import LoraError
from lorakit.train.memory import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of one global batch of indices."""
        if not self.active:
            return index
        share = len(index) // self.world
        return index[self.rank * share:(self.rank + 1) * share]

    def check_batch(self, batch_size: int) -> None:
        if self.active and batch_size % self.world:
            raise LoraError(f"--batch-size {batch_size} does not split over {self.world} processes; "
                            f"use a multiple of {self.world} (the batch size is the global batch)")

    def mean(self, value: torch.Tensor) -> float:
        """The average of ``value`` over ranks (every rank gets it): loss logging and the NaN check
        must agree everywhere, or one rank stops while the others wait in an all-reduce forever."""
        if not self.active:
            return value.item()
        value = value.detach().float().reshape(1).clone()
        torch_dist.all_reduce(value)
        return value.item() / self.world

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in training: DDP around ``model``, or ``model`` itself (FSDP2 shards in
        place, see ``shard``; one process needs nothing)."""
        if not self.active or self.fsdp:
            return model
        from torch.nn.parallel import DistributedDataParallel     # deferred: heavy optional dependency
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 in place: each ModuleList child a unit, then the root. Call before making the
        optimizer (the parameters become DTensor shards)."""
        if not (self.active and self.fsdp):
            return model
        from torch.distributed.device_mesh import init_device_mesh     # deferred: heavy optional dependency
        from torch.distributed.fsdp import fully_shard     # deferred: heavy optional dependency
        mesh = init_device_mesh(self.device.type, (self.world,))
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    if any(True for _ in block.parameters()):
                        fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def reshard(self, model: nn.Module) -> None:
        """Put the shards back in place. FSDP2 leaves the root's parameters unsharded after a forward
        without backward (evaluation), registered as plain tensors: the optimizer's and the state-dict
        helpers' parameters would then not be the module's."""
        if self.active and self.fsdp:
            for module in model.modules():
                if hasattr(module, "reshard"):
                    module.reshard()

    def full_state(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Parameters (and, for the whole model, buffers) as complete CPU tensors. Under FSDP this
        is a collective: every rank must call it; the tensors are gathered on each rank."""
        self.reshard(model)
        names = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
        items = [(n, p) for n, p in model.named_parameters() if n in names]
        if not trainable_only:
            items += list(model.named_buffers())
        out = {}
        for name, tensor in items:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            out[name] = full.detach().contiguous().cpu()
        return check_complete(out, model)

    def checkpoint_payload(self, model: nn.Module, optimizer) -> tuple[dict | None, dict | None]:
        """(trainable weights, optimizer state), gathered in full, for a sharded model (a collective:
        every rank calls it, rank 0 gets the optimizer state); (None, None) when not sharded, and
        ``save_checkpoint`` reads the plain model and optimizer itself."""
        if not (self.active and self.fsdp):
            return None, None
        self.reshard(model)
        from torch.distributed.checkpoint.state_dict import (  # deferred: heavy optional dependency
            StateDictOptions, get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return self.full_state(model, True), get_optimizer_state_dict(model, optimizer, options=options)

    def restore(self):
        """For ``load_checkpoint``: how to put full tensors into a sharded model (None: copy them)."""
        if not (self.active and self.fsdp):
            return None
        from torch.distributed.checkpoint.state_dict import (  # deferred: heavy optional dependency
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        def restore(model, optimizer, weights, optimizer_state):
            self.reshard(model)
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, weights, options=options)        # each rank keeps its shard
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return restore

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def check_complete(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Refuse to hand back a shard or an empty tensor where the model has a full one (ZeRO-3 style
    saves write shape-[0] placeholders; such an adapter would load as garbage)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}     # DTensor: the global shape
    for name, tensor in state.items():
        if tensor.numel() == 0 and shapes.get(name, ()) != tuple(tensor.shape):
            raise LoraError(f"gathered tensor {name!r} is empty; please report this as a bug")
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise LoraError(f"gathered tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                            f"{shapes[name]}: a shard, not the full tensor; please report this as a bug")
    return state


def init_distributed(device_name: str = "auto", fsdp: bool = False) -> Dist:
    """Join the process group torchrun set up, or a one-process Dist when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if fsdp:
            raise LoraError("--fsdp shards the model over processes; launch with torchrun "
                            "--nproc-per-node N (N >= 2), or drop --fsdp")
        return Dist(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank=rank, world=world, device=device, fsdp=fsdp)
