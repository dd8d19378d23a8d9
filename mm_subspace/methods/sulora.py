"""SuLoRA (Ding et al., Findings of ACL 2025): B split into N column sub-spaces, r of them routed per instance.

No public implementation exists; this file is written from the paper (Eq. 4-6, §3.3-3.4,
Appendix B.3-B.4) and is meant to be the reference one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bases import BaseKind
from ..config import LowRankConfig, check_choice
from ..errors import ConfigError
from ..layer import LowRankAdapter
from ..losses import load_balance_loss, record_once, training_forward
from ..registry import register_method
from .asylora import A_INITS, check_a_init, orthonormal_rows_

logger = logging.getLogger(__name__)

ORDERS = ("index", "score")
#: how a selected column b_i meets A: ``"paired"``: with its own row a_i (A is N×in); ``"index"``: the j-th
#: selected column with row j of an r×in A, Eq. (4) read literally
PAIRINGS = ("paired", "index")
#: ``"alpha/r"``: ΔW scaled by alpha/r like every other method here (and PEFT); ``"alpha"``: by alpha, SuLoRA Eq. (2)/(4)
SCALING_MODES = ("alpha/r", "alpha")

#: forward-context keys of the routing rule (see :func:`mm_subspace.inject.routing`)
ROUTE_MASK = "route_mask"
ROUTE_CACHE = "sulora_route_cache"
_warned_single_token = False


def prompt_route_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The tokens SuLoRA's router averages: the prompt, i.e. non-padding tokens before the first supervised one.

    With ``labels`` (training), a row's prompt ends at its first label that is not ``ignore_index``; without
    (generation), every non-padding token of the prompt counts. A row with no prompt token (plain text
    trained on every token) falls back to all its non-padding tokens.
    """
    mask = attention_mask.bool()
    if labels is not None:
        supervised = labels != ignore_index
        none = torch.full_like(supervised[:, 0], labels.shape[1], dtype=torch.long)  # no supervised token: the whole row
        first = torch.where(supervised.any(1), supervised.float().argmax(1), none)
        positions = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0)
        prompt = mask & (positions < first.unsqueeze(1))
        mask = torch.where(prompt.any(1, keepdim=True), prompt, mask)
    return mask.long()


@dataclass
class SuLoRAConfig(LowRankConfig):
    """SuLoRA.

    Args:
        num_subspaces: N, the number of candidate columns of B (N >= r). ``None`` = 2r per module,
            the paper's choice (§4.3, Table 7: best at N = 2r). N = r selects every column and is
            exactly AsyLoRA with A frozen (Table 7 caption), in both pairings.
        pairing: how a selected sub-space meets the frozen A. ``"paired"`` (default): sub-space i is
            the pair (a_i, b_i) — A is frozen at N×in and an instance uses ``Σ_{i∈S} b_i a_iᵀ``, so
            each column of B always trains against the same row of A. ``"index"``: Eq. (4) read
            literally — the r selected columns, in ``subspace_order``, are concatenated against the
            r rows of an r×in A, so column b_i meets row j of A where j is its rank among the chosen
            ones, which changes with the input. Trainable parameters are the same; ``"paired"``
            stores (N − r)·in more frozen values. Saved configs without the field load as
            ``"index"`` (what they were trained with). See docs/methods.md ("SuLoRA pairing").
        a_init: init of the frozen A: ``"orthonormal"`` (default; orthonormal rows as AsyLoRA's code,
            in blocks of ``in`` rows when A has more rows than ``in``) or ``"kaiming"`` (LoRA's
            Kaiming-uniform a = √5, row norm ≈ 0.58; what saved configs without the field load as).
        subspace_order: order of the r selected columns in ``pairing="index"``: ``"index"`` (default;
            sorted by sub-space index, so the pairing of B's columns with A's rows does not depend on
            the scores) or ``"score"`` (descending router probability, the order top-r returns).
            ``"paired"`` sums over the chosen pairs, so the order cannot matter: ``"score"`` is refused there.
        router_temperature: the router's softmax is taken over ``logits / router_temperature``
            (default 1.0: Eq. 5 as written). Below 1 sharpens the probabilities (and scales the
            router's straight-through gradient and the balance loss's by 1/T). Softmax is monotone,
            so at given router weights the top-r choice is the same for every T; T changes the
            probabilities the router's gradients flow through, i.e. how training moves the choice.
        balance_coef: weight of the load-balance loss (negative entropy of the batch's selection
            distribution, Eq. 6) each layer records for :func:`mm_subspace.aux_loss`; 0 (the default)
            disables it. The paper gives no value; the ``sulora_*`` recipes use 0.01, the usual MoE
            auxiliary-loss weight. Off by default because it pushes the instances of a batch onto
            different sub-spaces whatever the task — the visual-instruction benchmark measured 88.0 ± 1.0 %
            with 0.01 and 92.9 ± 1.1 % without (3 seeds; docs/methods.md, "SuLoRA at LoRA's budget").
        scaling_mode: ``"alpha/r"`` (default): the update is scaled by ``alpha / r``, the LoRA/PEFT
            convention every other method of this package uses; ``"alpha"``: scaled by ``alpha``
            itself, as SuLoRA writes Eq. (2) and (4) (``W h + α·B A h``). The two agree when
            ``alpha_paper = alpha / r``; the paper states no α value for any experiment.
    """

    method = "sulora"
    #: saved configs written before these fields existed: the literal Eq. (4) pairing, Kaiming A
    absent_field_values = {"pairing": "index", "a_init": "kaiming"}
    num_subspaces: int | None = field(default=None, metadata={"help": "N candidate columns of B (None = 2·rank)"})
    subspace_order: str = field(default="index", metadata={"help": f"order of the selected columns: one of {ORDERS}"})
    balance_coef: float = field(default=0.0, metadata={"help": "weight of the load-balance loss (Eq. 6) in aux_loss; 0 = off"})
    scaling_mode: str = field(default="alpha/r", metadata={"help": f"update scale: one of {SCALING_MODES} (alpha = Eq. 2/4)"})
    pairing: str = field(default="paired", metadata={"help": f"sub-space i = (a_i, b_i) or Eq. 4 literal: one of {PAIRINGS}"})
    a_init: str = field(default="orthonormal", metadata={"help": f"init of the frozen A: one of {A_INITS}"})
    router_temperature: float = field(default=1.0, metadata={"help": "softmax(logits / T) in the router; < 1 sharpens"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("sulora: scaling_mode", self.scaling_mode, SCALING_MODES)
        check_choice("sulora: subspace_order", self.subspace_order, ORDERS)
        check_choice("sulora: pairing", self.pairing, PAIRINGS)
        if self.pairing == "paired" and self.subspace_order == "score":
            raise ConfigError("sulora: subspace_order='score' only applies to pairing='index' (the paired update sums "
                              "over the chosen (a_i, b_i), so their order cannot matter); use pairing='index' or drop it")
        check_a_init("sulora", self.a_init)
        t = self.router_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"sulora: router_temperature must be a number > 0, got {t!r}")
        if isinstance(self.balance_coef, bool) or not isinstance(self.balance_coef, (int, float)) or self.balance_coef < 0:
            raise ConfigError(f"sulora: balance_coef must be a number >= 0, got {self.balance_coef!r}")
        n = self.num_subspaces
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise ConfigError(f"sulora: num_subspaces must be an integer or None, got {n!r}")
            too_big = max([self.rank, *self.rank_pattern.values()])
            if n < too_big:
                raise ConfigError(
                    f"sulora: num_subspaces ({n}) must be >= the rank ({too_big}): r sub-spaces are selected "
                    f"out of N. Use num_subspaces={2 * too_big} (the paper's N = 2r) or None."
                )

    @property
    def frozen_factor(self) -> str:
        return "A"  # §3.2: A frozen as in AsyLoRA; the bank B and the router train

    def subspaces_for(self, rank: int) -> int:
        """N for a module of rank ``rank``."""
        return self.num_subspaces if self.num_subspaces is not None else 2 * rank


@register_method
class SuLoRA(LowRankAdapter):
    """``ΔW x = s · Σ_{i∈S} b_i a_iᵀ · x`` (``pairing="paired"``) or ``s · [b_{i_1} … b_{i_r}] · A · x``
    (``"index"``, Eq. 4 literally), ``S = {i_j} = top_r softmax(W_q · mean(x) / T)`` — SuLoRA Eq. (4)-(5).

    ``s = alpha/r``, or ``alpha`` with ``scaling_mode="alpha"`` as in Eq. 2/4.

    Parameters: ``lora_A`` — (N, in) with ``pairing="paired"`` (row a_i belongs to sub-space i), (r,
    in) with ``"index"`` — frozen after its init (orthonormal rows or Kaiming-uniform, ``a_init``;
    frozen as in AsyLoRA, §3.2); ``lora_B`` (out, N), the bank of N column sub-spaces b_i, zero at
    init so step 0 equals the base (the paper builds on LoRA/AsyLoRA and states no other init);
    ``router`` W_q (N, in), Kaiming-uniform like an ``nn.Linear``.

    Routing (§3.4): one choice per instance, not per token. For an input (batch, seq, in) the
    router reads h̄ = the mean over the sequence (padding excluded when an ``attention_mask``
    (batch, seq) matching x is in the forward context; only the prompt under :func:`~mm_subspace.inject.routing`, which
    also caches the choice for KV-cache decode steps — use it for training and ``generate`` alike); a (batch, in) input is one token per
    instance; extra middle dims are averaged like the sequence. The router sees the input before
    dropout. With ``pairing="index"`` the r winners are placed in index order (or score order,
    ``subspace_order="score"``) against A's rows 1…r; Appendix B.4 / Table 9 finds that order barely
    matters at test time, so we default to the deterministic one. ``"paired"`` has no order: each
    winner i brings its own row a_i.

    Gradient to the router: top-r is not differentiable, so each selected column is multiplied by
    a straight-through gate ``g = (p − stopgrad(p)) + 1``: its forward value is exactly 1 (the
    subtraction is exactly 0), so Eq. (4) holds bit for bit, while ``∂g/∂p = 1`` passes the
    column's gradient ``s·⟨∂L/∂y, b_i⟩·(A x)_j`` back through the softmax to W_q. (Multiplying by
    p itself, as MoE layers do, would rescale the update and break Eq. 4.) The load-balance term
    (Eq. 6, :func:`mm_subspace.losses.load_balance_loss`) also trains the router.

    Compute, with no loop over the batch and ΔW never formed. ``"index"``: ``h = A x`` (batch, seq, r)
    is scattered into the chosen slots of a zero (batch, seq, N) tensor ``z`` and multiplied by the
    whole bank in one GEMM, ``z · Bᵀ`` — which is exactly ``Σ_j b_{i_j} h_j`` (Eq. 4). ``"paired"``:
    ``h = A x`` (batch, seq, N) for all N rows, multiplied by a (batch, 1, N) 0/gate mask of the chosen
    slots, then ``z · Bᵀ`` = ``Σ_{i∈S} b_i (a_iᵀ x)`` (A costs N·in instead of r·in per token). We prefer
    this to gathering the chosen columns into a (batch, r, out) tensor and a ``bmm``: the gather
    keeps a batch·r·out copy of B alive for backward (≈16 MB per layer at batch 16, r 64, out
    4096), while ``z`` is tokens·N; the extra (N − r)·out multiply-adds per token are < 1 % of the
    base layer's in·out at N = 2r; both measured the same speed on CPU; and with N = r the
    scatter (or the all-ones mask) is the identity, so the result is bit-identical to AsyLoRA's
    ``F.linear(h, B)`` in either pairing. An empty batch returns the base output.

    Merge and plain-LoRA export are impossible: B depends on the input.
    """

    config_class = SuLoRAConfig
    mergeable = False
    merge_refusal = (
        "SuLoRA picks B's columns per input instance with its router (Eq. 5), so ΔW is not one fixed matrix; "
        "keep it as an adapter (save_adapter/load_adapter work) or train lora/asylora to get a mergeable one"
    )
    frozen_parameters = ("lora_A",)
    formula = "s·[b_i for i in top_r softmax(W_q·mean x)]·A, A frozen"
    paper = "Ding et al. 2025 (SuLoRA) Eq. (4)-(6)"

    def __init__(self, kind: BaseKind, base: nn.Module, config: SuLoRAConfig, module_name: str) -> None:
        self.num_subspaces = config.subspaces_for(config.rank_for(module_name))
        super().__init__(kind, base, config, module_name)
        if config.scaling_mode == "alpha":  # Eq. (2)/(4): W h + α·B A h
            self.scaling = self.alpha
        self.router = nn.Parameter(torch.empty(self.num_subspaces, self.in_features, **self.factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.last_selection: torch.Tensor | None = None

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows = self.num_subspaces if self.config.pairing == "paired" else self.rank
        return (rows, self.in_features), (self.out_features, self.num_subspaces)

    def reset_factors(self) -> None:
        super().reset_factors()
        if self.config.a_init == "orthonormal":
            orthonormal_rows_(self.lora_A)

    # -- routing (Eq. 5) ------------------------------------------------------------------------
    def summarize(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h̄ (batch, in): the mean of ``x`` over its middle dims, padding excluded when the mask fits."""
        if x.dim() == 2:
            return x
        if attention_mask is not None and x.dim() == 3 and tuple(attention_mask.shape) == tuple(x.shape[:2]):
            mask = attention_mask.to(x.dtype).unsqueeze(-1)
            return (x * mask).sum(1) / mask.sum(1).clamp_min(1)
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)

    def route(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs (batch, N), selected indices (batch, r), selected probabilities (batch, r)) for input ``x``."""
        logits = F.linear(self.summarize(x.to(self.router.dtype), attention_mask), self.router)
        probs = (logits.float() / self.config.router_temperature).softmax(-1)
        top_p, idx = probs.topk(self.rank, dim=-1)
        if self.config.subspace_order == "index":
            idx, perm = idx.sort(-1)
            top_p = top_p.gather(-1, perm)
        return probs, idx, top_p

    # -- forward (Eq. 4) --------------------------------------------------------------------------
    def routed(self, x: torch.Tensor, context: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`route` under the rule of :func:`~mm_subspace.inject.routing`: the prompt's mask, and the cached choice if any."""
        global _warned_single_token
        cache = context.get(ROUTE_CACHE)
        if cache is not None and id(self) in cache and cache[id(self)][1].shape[0] == x.shape[0]:
            return cache[id(self)]
        mask = context.get(ROUTE_MASK)
        routed = self.route(x, mask if mask is not None else context.get("attention_mask"))
        if cache is not None:
            cache[id(self)] = routed
        elif x.dim() == 3 and x.shape[1] == 1 and not self.training and not _warned_single_token:
            _warned_single_token = True
            logger.warning("SuLoRA routes on a single token (a KV-cache decode step?): wrap generate() in "
                           "mm_subspace.inject.routing(model, prompt_attention_mask) so every step uses the "
                           "choice made on the prompt, as in training")
        return routed

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        batch = x.shape[0]
        if batch == 0:  # nothing to route (and the mean over no instance is undefined)
            self.last_selection = torch.empty(0, self.rank, dtype=torch.long, device=x.device)
            return base_out
        probs, idx, top_p = self.routed(x, context)
        self.last_selection = idx.detach()
        gate = ((top_p - top_p.detach()) + 1.0).to(self.lora_A.dtype)  # forward exactly 1, ∂/∂p = 1
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A).reshape(batch, -1, self.lora_A.shape[0])
        if self.config.pairing == "paired":
            # h holds a_iᵀx for all N sub-spaces: keep the chosen ones (times their gate), zero the others
            mask = h.new_zeros(batch, self.num_subspaces).scatter(-1, idx, gate.to(h.dtype))
            z = (self.inner(h) * self.total_scale) * mask.unsqueeze(1)
        else:
            h = (self.inner(h) * self.total_scale) * gate.unsqueeze(1)
            # place the r activations in their sub-spaces' slots of an N-vector (zeros elsewhere): one GEMM with the bank
            slots = idx.unsqueeze(1).expand(-1, h.shape[1], -1)
            z = h.new_zeros(batch, h.shape[1], self.num_subspaces).scatter(-1, slots, h)
        delta = F.linear(z, self.lora_B).reshape(base_out.shape)
        if self.config.balance_coef > 0 and training_forward(self):
            record_once(self, self.config.balance_coef * load_balance_loss(probs))
        self.record_mpc()
        return base_out + delta.to(base_out.dtype)

    def up_weight(self) -> torch.Tensor:
        return self.lora_B

    def extra_repr(self) -> str:
        c = self.config
        order = f", order={c.subspace_order}" if c.pairing == "index" else ""
        return f"{super().extra_repr()}, num_subspaces={self.num_subspaces}, pairing={c.pairing}{order}, a_init={c.a_init}"
