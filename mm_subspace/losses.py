"""Auxiliary losses adapters record during a training forward: SuLoRA load balance and MPC.

Adapters call :meth:`~mm_subspace.layer.Adapter.record_aux` with an already-scaled term;
:func:`mm_subspace.aux_loss` sums and clears them once per optimisation step.

MPC orientation. The survey (Subspace Tuning, §4.1-4.2) writes ``ΔW = A·B`` with A (n×r) and
B (r×m) acting on row vectors; its constraints are on the two r×r Gram matrices AᵀA and BBᵀ
(Eq. 16-17: "AᵀA = BBᵀ = I_{r×r}", while AAᵀ and BᵀB stay arbitrary). In this package's
``nn.Linear`` shapes ``lora_A`` (r, in) is the survey's Aᵀ and ``lora_B`` (out, r) its Bᵀ, so

* survey AᵀA  ->  ``lora_A @ lora_A.T``  (r×r, the Gram matrix of A's rows)
* survey BBᵀ  ->  ``lora_B.T @ lora_B``  (r×r, the Gram matrix of B's columns)

and the penalties below are written in those terms. A mixer/core G between A and B (MoSLoRA,
FLoRA, TriLoRA) is not constrained: the survey's penalties act on the outer factors of A·G·B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: nonlinearities for MPC_n and the adapter derivatives, by config name
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity called ``name`` (one of :data:`ACTIVATIONS`)."""
    return ACTIVATIONS[name]


def training_forward(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward should compute its auxiliary losses: training mode, gradients on."""
    return module.training and torch.is_grad_enabled()


def record_once(adapter: Any, loss: torch.Tensor) -> None:
    """``adapter.record_aux(loss)``, except while the autograd engine runs a backward pass.

    Activation checkpointing re-runs the forward inside backward, after the training loop has
    already collected :func:`mm_subspace.aux_loss`; recording there would leak a stale term into
    the next step. The loss is still *computed* in the re-run (the caller does that), because
    non-reentrant checkpointing requires the re-run to save exactly the tensors the first run did.
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    if task_id is None or task_id() == -1:
        adapter.record_aux(loss)


def _grams(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = down.float(), up.float()
    return a @ a.T, b.T @ b


def mpc_orthogonal(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """MPC_o, survey Eq. (20): ``‖AᵀA − I‖²_F + ‖BBᵀ − I‖²_F``.

    Args:
        down: ``lora_A`` (r, in); its row Gram ``A Aᵀ`` (r×r) is the survey's AᵀA.
        up: ``lora_B`` (out, r) (or SuLoRA's bank (out, N)); its column Gram ``BᵀB`` is the survey's BBᵀ.
    Zero exactly when A's rows and B's columns are orthonormal.
    """
    ga, gb = _grams(down, up)
    eye_a = torch.eye(ga.shape[0], device=ga.device)
    eye_b = torch.eye(gb.shape[0], device=gb.device)
    return (ga - eye_a).square().sum() + (gb - eye_b).square().sum()


def mpc_diagonal(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """MPC_d, survey Eq. (21): ``‖AᵀA − I‖²_F + ‖BBᵀ − diag(BBᵀ)‖²_F``.

    Same shapes and mapping as :func:`mpc_orthogonal`; B's columns need only be mutually
    orthogonal (any lengths), which is the survey's "more conservative" constraint.
    """
    ga, gb = _grams(down, up)
    eye_a = torch.eye(ga.shape[0], device=ga.device)
    return (ga - eye_a).square().sum() + (gb - torch.diag_embed(gb.diagonal())).square().sum()


#: MPC modes that add a regulariser (``"nonlinear"`` changes the forward instead)
MPC_PENALTIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "orthogonal": mpc_orthogonal,
    "diagonal": mpc_diagonal,
}


def load_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """SuLoRA load balance, Appendix B.3 Eq. (6): the negative entropy ``Σ_k p_k log p_k`` of the batch's selection distribution.

    ``p`` is the router's softmax averaged over the batch rows, ``p = mean_b softmax(W_q h̄_b)``,
    so the loss is differentiable in the router. Eq. (6) is printed as ``−Σ p log p`` (= H(p), the
    entropy itself), but the text calls the loss the *negative* entropy and says minimising it
    maximises the entropy; we implement the text: ``−H(p) = Σ p log p``, minimal (= −log N) at
    uniform use of the N sub-spaces.

    Args:
        probs: (batch, N) router probabilities (rows sum to 1).
    """
    p = probs.float().mean(0)
    return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()


__all__ = ["ACTIVATIONS", "MPC_PENALTIES", "activation", "load_balance_loss", "mpc_diagonal", "mpc_orthogonal", "record_once",
           "training_forward"]
