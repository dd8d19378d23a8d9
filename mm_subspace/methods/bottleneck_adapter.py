"""Bottleneck adapter (Houlsby et al., 2019; Pfeiffer et al., 2020): ``y ← y + s · B · σ(A y)`` on a layer's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import register_method
from .parallel_adapter import ParallelAdapter, ParallelAdapterConfig


@dataclass
class BottleneckAdapterConfig(ParallelAdapterConfig):
    """Sequential bottleneck adapter; same fields as :class:`ParallelAdapterConfig` (``alpha = rank`` gives Houlsby's unscaled form).

    Houlsby vs Pfeiffer is a placement, chosen with ``targets``: Houlsby puts one adapter after the
    attention output projection and one after the feed-forward output of every block (e.g.
    ``targets=["o_proj", "down_proj"]`` on LLaMA, ``["attn.proj", "mlp.fc2"]`` on a timm ViT);
    Pfeiffer keeps only the feed-forward one (``["down_proj"]`` / ``["mlp.fc2"]``).
    """

    method = "bottleneck_adapter"


@register_method
class BottleneckAdapter(ParallelAdapter):
    """``y' = y + (alpha/r) · B · σ(A y)`` with ``y = W x + b`` the layer's output — survey Eq. (22).

    Sequential, unlike :class:`~mm_subspace.methods.parallel_adapter.ParallelAdapter`: A reads the
    output, so A is (r, out) and B (out, r). B starts at zero (step 0 equals the base; Houlsby et
    al. initialise near identity for the same reason). Not mergeable: σ acts on the output.
    """

    config_class = BottleneckAdapterConfig
    merge_refusal = "the adapter applies σ to the layer's output (survey Eq. 22), so it is not a change of W"
    formula = "y + s·B·σ(A·y), y = Wx+b"
    paper = "Houlsby et al. 2019; Pfeiffer et al. 2020; survey Eq. (22)"

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.rank, self.out_features), (self.out_features, self.rank)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        h = F.linear(self.dropout(base_out.to(self.lora_A.dtype)), self.lora_A)
        h = self.inner(h) * self.total_scale
        return base_out + F.linear(h, self.lora_B).to(base_out.dtype)
