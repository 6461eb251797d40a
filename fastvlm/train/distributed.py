"""Training on several processes: torchrun, DDP, FSDP2 and DCP checkpoints.

``fastvlm train`` under ``torchrun`` reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment (``init``), joins a process group (NCCL on GPUs, gloo on CPU) and,
per stage, wraps the model (``Distributed.wrap``):

- ``ddp``: ``DistributedDataParallel`` over a module that computes the stage's
  micro-batch loss (so every stage type's forward, LLM-only or contrastive, goes
  through DDP). ``find_unused_parameters=True``: an lm stage leaves the tower and
  connector unused (a micro-batch without images does not: it runs them on a blank
  image, see ``VLM.blank_image_term``, so that every rank runs the same collectives
  whatever its micro-batches hold). Frozen parameters have no gradient and are never
  all-reduced.
- ``fsdp``: ``fully_shard`` on each of the model's ``fsdp_units()`` (every decoder
  block and vision encoder block: ``VLM.fsdp_units``, ``HFVLM.fsdp_units``), then on
  the micro-batch-loss module as the root (embeddings, norms, connector, heads), with a ``MixedPrecisionPolicy`` that
  gathers parameters in the dtypes the stage's precision policy stores them in (frozen
  ones in the compute dtype, trainable ones and norms in fp32; autocast computes in the
  stage's dtype, as in one process) and reduces gradients in fp32. The optimizer
  must be built right after wrapping (an optimizer built after a ``no_grad``
  forward would hold unsharded parameters and not train).

The global batch does not depend on the world size: the stage's data stream is
one global sequence of micro-batches, a step is ``grad_accum`` consecutive ones,
and rank r takes those of index ≡ r (mod W) (``grad_accum`` must be a multiple of
W). Each micro-batch's loss is weighted by its supervised tokens over the step's
global count (all-reduced) times W (DDP / FSDP average gradients over ranks), so
the gradient equals the one-process gradient of the same global batch.
Gradients synchronise on a step's last micro-batch only.

Checkpoints of a distributed recipe hold model + optimizer as a DCP directory
(``dcp/``, each rank writes its shards), the rest (scheduler, scaler, sampler
position, counters) in ``state.pt`` from rank 0 and each rank's RNG state in
``rng-<rank>.pt``. DCP reshards on load, so a checkpoint of W ranks resumes on
any other number (one process loads it without a process group). The sampler's
position is global, so the resumed run continues with the same global batches.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from fastvlm.train.quant import quantized_state_keys

MODES = ("none", "ddp", "fsdp")


@dataclass
class Distributed:
    """This process's place in the job; with ``world == 1`` every collective is a no-op."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_dcp(self) -> bool:
        """Checkpoints in DCP format: every run of a distributed recipe, whatever its world size."""
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce(self, values, op: str = "sum") -> list[float]:
        """Element-wise sum (or max) over ranks of a list of floats, in float64."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
        return t.tolist()

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")

    def check_stage(self, stage) -> None:
        if self.active and stage.grad_accum % self.world:
            raise ValueError(f"stages.{stage.name}.grad_accum: {stage.grad_accum} micro-batches per step cannot be "
                             f"split over {self.world} ranks; use a multiple of the world size (the global batch "
                             f"is batch_size x grad_accum, whatever the number of processes)")
        if self.mode == "fsdp" and stage.precision == "fp16":
            raise ValueError(f"stages.{stage.name}.precision: 'fp16' (a loss scaler per shard) is not supported "
                             "with run.distributed = 'fsdp'; use 'bf16' or 'fp32'")

    def wrap(self, model: nn.Module, forward: nn.Module) -> nn.Module:
        """What the training step calls: `forward` (a module holding `model`) wrapped for the mode."""
        if not self.active:
            return forward
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if torch.cuda.is_available() and tdist.get_backend() == "nccl" else None
            return DistributedDataParallel(forward, device_ids=ids, find_unused_parameters=True)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.comm_device.type, (self.world,))
        # Parameters gathered as stored: the precision policy already keeps frozen weights in
        # the compute dtype and trainable ones and norms in fp32, and autocast computes in the
        # stage's dtype, so a sharded step is the one-process step (a bf16 param_dtype would
        # also round the norms' and adapters' weights, which one process never does).
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for part in model.fsdp_units():  # the model's own (fastvlm.train.losses.TrainableModel)
            fully_shard(part, mesh=mesh, mp_policy=policy)
        fully_shard(forward, mesh=mesh, mp_policy=policy)
        self.root = forward
        return forward

    @contextlib.contextmanager
    def gathered(self):
        """The root unit's parameters gathered (evaluation calls the model outside the wrapper)."""
        root = getattr(self, "root", None)
        if root is None or not self.active:
            yield
            return
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def sync_context(self, wrapped: nn.Module, sync: bool):
        """Gradient synchronisation on (a step's last micro-batch) or off (the others)."""
        if not self.active or sync:
            if self.mode == "fsdp" and self.active:
                wrapped.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return wrapped.no_sync()
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def pick_device(name: str) -> torch.device:
    """run.device: 'auto' (CUDA when there is one), 'cpu', 'cuda', ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def init(mode: str, device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (or none); (dist, this rank's device)."""
    if mode not in MODES:
        raise ValueError(f"run.distributed: expected one of {', '.join(MODES)}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and mode == "none":
        raise ValueError(f"run.distributed: 'none', but torchrun started {world} processes; set "
                         "run.distributed = 'ddp' or 'fsdp' (e.g. --set run.distributed=ddp)")
    dist = Distributed(mode, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if not dist.active:
        return dist, device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def finish(dist: Distributed) -> None:
    """Leave the process group after a finished run (every rank passed the last barrier)."""
    if dist.active and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


# ---- DCP checkpoints -----------------------------------------------------------------------

@contextlib.contextmanager
def _one_process_ok():
    # DCP warns when no process group exists; one process reading / writing is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def _without_nf4(model: nn.Module, state: dict):
    """(state without NF4 weights, the options that load it): FSDP drops the NF4 weights'
    quantisation state, and the run re-quantizes them from their source anyway
    (fastvlm.train.quant), so a checkpoint holds everything else and loads non-strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    nf4 = quantized_state_keys(model, state)
    return {k: v for k, v in state.items() if k not in nf4}, StateDictOptions(strict=not nf4)


def save_state(path: Path, model: nn.Module, optimizer) -> None:
    """Model (NF4 weights aside) + optimizer of every rank into the DCP directory `path`
    (each rank its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process_ok():
        dcp.save({"model": _without_nf4(model, model_sd)[0], "optim": optim_sd}, checkpoint_id=str(path))


def load_state(path: Path, model: nn.Module, optimizer) -> None:
    """Model + optimizer from a DCP directory of any world size, resharded to this one (the
    model's NF4 weights are its own, re-quantized from their source)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_sd, options = _without_nf4(model, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)


def full_model_state(model: nn.Module) -> dict:
    """The whole (unsharded) state dict on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_model_from_dcp(path: Path, model: nn.Module) -> None:
    """Only the weights of a DCP checkpoint, into an unsharded model (inference, export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd, options = _without_nf4(model, get_model_state_dict(model))
    state = {"model": model_sd}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=options)
