"""What the training scripts need on GPUs and across processes (accelerate): loss scaling, sharding, timeouts.

* :class:`SkippedSteps`: under fp16, accelerate's ``GradScaler`` skips the optimizer steps whose gradients
  overflow while it calibrates the loss scale (halving the scale each time; PyTorch documents this as
  expected). Those steps are counted and logged, not treated as divergence; only
  ``--max_skipped_steps`` *consecutive* skips stop the run.
* :func:`check_setup`: the distributed setups the scripts support — one process, DDP (``multi_gpu``) and
  FSDP2 (``fsdp_version: 2``) — and a start-up refusal naming them for the others (FSDP1, DeepSpeed, FSDP
  with several trained models or a 4-bit base).
* FSDP2 shards the frozen base only: :func:`replicate_trainable` keeps every trainable parameter out of
  the shards (FSDP's ``ignored_params``), so the adapters stay ordinary replicated tensors that save,
  export and hash as on one process; :func:`sync_replicated_grads` averages their gradients across ranks
  (what DDP does). :func:`data_parallel_state` makes ``accelerator.save_state``/``load_state`` write and
  read a checkpoint as under DDP (adapters through the save hooks, no sharded frozen base).
* :func:`process_group_kwargs`: the process-group timeout (``--ddp_timeout``) for long rank-0-only work.
* :func:`apply_test_overrides`: two switches for the CPU tests only (environment variables, never set by a
  user): a ``GradScaler`` forced on CPU with a huge initial scale (the first steps overflow, as on a GPU
  while the scaler calibrates) and FSDP2 forced on ``MULTI_CPU`` (accelerate uses FSDP only on accelerators).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

#: stop after this many consecutive steps skipped by the fp16 loss scaler (``--max_skipped_steps``)
DEFAULT_MAX_SKIPPED_STEPS = 20
#: process-group timeout in seconds (``--ddp_timeout``; transformers' default): rank-0-only work (final
#: evaluation, ``--save_merged``) may take longer than NCCL's 10 minutes while the other ranks wait
DEFAULT_DDP_TIMEOUT = 1800
#: tests only: a CPU ``GradScaler`` with this initial scale is given to accelerate before ``prepare``
TEST_GRADSCALER_ENV = "MM_SUBSPACE_TEST_CPU_GRADSCALER_INIT_SCALE"
#: tests only: run FSDP2 on CPU processes (gloo), which accelerate itself never selects
TEST_FSDP2_ENV = "MM_SUBSPACE_TEST_CPU_FSDP2"
SUPPORTED = ("one process", "DDP (training/accelerate_configs/multi_gpu.yaml)",
             "FSDP2 (training/accelerate_configs/fsdp2.yaml)")


def process_group_kwargs(timeout_seconds: int) -> Any:
    """accelerate's ``InitProcessGroupKwargs`` with ``timeout_seconds`` (passed in ``kwargs_handlers``)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds))


# -- test switches -----------------------------------------------------------------------------------
def apply_test_overrides(accelerator: Accelerator) -> None:
    """The CPU simulations of the GPU path, switched on by :data:`TEST_GRADSCALER_ENV` / :data:`TEST_FSDP2_ENV`.

    For tests only (see docs/gpu.md): call right after creating the accelerator, before ``prepare``.
    """
    scale = os.environ.get(TEST_GRADSCALER_ENV)
    if scale:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float(scale))
        accelerator.native_amp = True
        logger.warning("test switch %s: GradScaler on CPU with init scale %s", TEST_GRADSCALER_ENV, scale)
    if os.environ.get(TEST_FSDP2_ENV) == "1" and accelerator.num_processes > 1:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # prepare() re-reads the partial state
        logger.warning("test switch %s: FSDP2 on %d CPU processes", TEST_FSDP2_ENV, accelerator.num_processes)


# -- setups ------------------------------------------------------------------------------------------
def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the models are sharded (FSDP): forward passes then need every rank (validation, evaluation)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_setup(accelerator: Accelerator, trained_models: int, quantized: bool = False) -> str:
    """Refuse a setup the scripts do not support, naming the ones they do; returns ``"fsdp2"``, ``"ddp"`` or ``"single"``.

    Raises:
        ConfigError: DeepSpeed, FSDP1, or FSDP2 with several trained models (``--train_text_encoder``) or a 4-bit base.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    supported = "; supported: " + ", ".join(SUPPORTED) + " (docs/gpu.md)"
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed is not supported by this script: its engine checkpoints the whole model (the frozen "
                          "base too) and ZeRO-3 partitions the adapters; use FSDP2 to shard the frozen base" + supported)
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(f"FSDP{version} cannot wrap a half-precision frozen base with fp32 adapters ('Must flatten "
                              "tensors with uniform dtype'); set fsdp_version: 2 in the accelerate config" + supported)
        if trained_models > 1:
            raise ConfigError(f"FSDP2 through accelerate shards one trained model, this run trains {trained_models} "
                              "(--train_text_encoder, on by default for the embedded digit subject): train the UNet only with FSDP2 "
                              "(--no-train_text_encoder), or use DDP" + supported)
        if quantized:
            raise ConfigError("FSDP2 with a 4-bit (bitsandbytes) base is not supported: use DDP with --load_in_4bit, "
                              "or FSDP2 with a bf16 base" + supported)
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _trainable_owners(model: nn.Module) -> list[nn.Module]:
    """The modules that own the trainable parameters of ``model``; each holds trainable parameters only."""
    owners: dict[int, nn.Module] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        frozen = [n for n, p in owner.named_parameters() if not p.requires_grad]
        if frozen:
            raise ConfigError(f"FSDP2: module {name.rpartition('.')[0]!r} mixes trainable and frozen parameters "
                              f"({frozen[:2]}); only adapters and fully trained modules can be kept out of the shards")
        owners[id(owner)] = owner
    return list(owners.values())


def replicate_trainable(accelerator: Accelerator, models: Iterable[nn.Module]) -> None:
    """FSDP2: keep every trainable parameter out of the shards (call before ``prepare``; no-op otherwise).

    The frozen base — nearly all the memory — is sharded; the adapters stay whole on every rank, so
    saving, exporting and hashing them need no gather, and their gradients are averaged by
    :func:`sync_replicated_grads`.
    """
    if not is_sharded(accelerator):
        return
    owners = [m for model in models for m in _trainable_owners(model)]
    accelerator.state.fsdp_plugin.ignored_modules = owners


def log_sharding(accelerator: Accelerator, models: Iterable[nn.Module]) -> tuple[int, int]:
    """FSDP2 (after ``prepare``): log and return how many frozen tensors are sharded and trainable ones replicated."""
    if not is_sharded(accelerator):
        return 0, 0
    from torch.distributed.tensor import DTensor

    params = [p for model in models for p in model.parameters()]
    sharded = sum(isinstance(p, DTensor) for p in params)
    replicated = sum(p.requires_grad and not isinstance(p, DTensor) for p in params)
    logger.info("FSDP2: %d frozen tensors sharded across %d ranks, %d trainable tensors replicated", sharded,
                accelerator.num_processes, replicated)
    return sharded, replicated


def sync_replicated_grads(accelerator: Accelerator, params: Iterable[torch.Tensor]) -> None:
    """FSDP2: average the gradients of the replicated (unsharded) trainable parameters across ranks, as DDP does.

    Call on the step that syncs (``accelerator.sync_gradients``), before clipping; no-op unless sharded.
    """
    if not is_sharded(accelerator) or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


@contextlib.contextmanager
def data_parallel_state(accelerator: Accelerator) -> Iterator[None]:
    """Under FSDP, let ``save_state``/``load_state`` run their DDP path for the duration (no-op otherwise).

    accelerate's FSDP path writes the whole sharded model (the frozen base included) and a sharded
    optimizer; the trainable parameters here are replicated plain tensors, so the DDP path — adapters
    through the registered save/load hooks, one optimizer file — is the right one.
    """
    if not is_sharded(accelerator):
        yield
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    dp = DistributedType.MULTI_GPU if accelerator.device.type == "cuda" else DistributedType.MULTI_CPU
    partial = PartialState()
    accelerator.state.distributed_type = partial.distributed_type = dp
    try:
        yield
    finally:
        accelerator.state.distributed_type = partial.distributed_type = DistributedType.FSDP


# -- loss scaling --------------------------------------------------------------------------------------
class SkippedSteps:
    """Optimizer steps skipped by the fp16 loss scaler: counted, and an error only after ``limit`` in a row.

    Without a scaler (fp32, bf16) nothing is skipped and a non-finite loss or gradient norm is divergence
    (:func:`mm_subspace.training_utils.check_finite` stops the run); with one, those values are what the
    scaler reacts to, so they are tolerated and the step is counted here instead.
    """

    def __init__(self, accelerator: Accelerator, limit: int = DEFAULT_MAX_SKIPPED_STEPS) -> None:
        self.accelerator = accelerator
        self.limit = limit
        self.total = 0
        self.consecutive = 0

    @property
    def scaling(self) -> bool:
        """Whether a loss scaler runs (fp16), i.e. non-finite values skip a step instead of stopping the run."""
        return self.accelerator.scaler is not None

    def update(self, step: int, last_checkpoint: Any = None) -> bool:
        """Record whether optimizer step ``step`` (1-based) was skipped; returns it.

        Raises:
            NonFiniteError: the ``limit``-th consecutive skipped step.
        """
        skipped = bool(self.scaling and self.accelerator.optimizer_step_was_skipped)
        if not skipped:
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        scale = self.accelerator.scaler.get_scale()
        logger.info("step %d skipped by the fp16 loss scaler (gradients overflowed; scale now %g)", step, scale)
        if self.consecutive >= self.limit:
            keep = (f" The last good checkpoint {last_checkpoint} is kept." if last_checkpoint is not None else "")
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {self.consecutive} steps in a row up to step {step} (scale now {scale:g}): "
                "the gradients overflow at every scale, so training has diverged. Lower --learning_rate, use "
                f"--mixed_precision bf16, or raise --max_skipped_steps.{keep}"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])

