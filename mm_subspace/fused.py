"""Fused q/k/v projections: one adapter per slice, on one fused weight.

Papers adapt W_Q, W_K, W_V (and W_O) as separate matrices (LoRA §4.2 adapts W_Q and W_V; the MoSLoRA
paper's LLaVA recipe adapts q, k, v, o), but two common vision towers store them fused:

* timm ``Attention.qkv``: one ``nn.Linear`` with ``out = 3·d``, rows ``[W_Q; W_K; W_V]``.
* ``nn.MultiheadAttention`` (open_clip's ``VisionTransformer``): ``in_proj_weight`` (3d, d) plus an
  ``out_proj`` whose weight the MHA reads directly (wrapping ``out_proj`` alone is silently ignored).
  We wrap the MHA as a whole and view it as one (4d, d) matrix ``[W_Q; W_K; W_V; W_O]``.

Choosing the slices: ``AdapterConfig.fused_slices = {regex: ["q", "v"]}`` (a key matches a module
whose name ends with it, like ``rank_pattern``). A Linear listed there is split into q, k, v thirds;
an ``nn.MultiheadAttention`` is always split, default slices q, k, v, o. The ``timm_vit`` preset sets
``{"qkv": ["q", "k", "v"]}``; targeting ``"qkv"`` without ``fused_slices`` adapts the fused matrix as
one (what PEFT does). Each slice gets its own adapter of the configured method (any method: the slice
looks like a Linear of ``d`` outputs to it, and ``base_weight()`` returns that slice), so rank r on
q and v is two rank-r adapters, exactly as for separate ``q_proj``/``v_proj`` layers.

Merge/unmerge act on the fused weight slice by slice; save/load keep the keys
``<module>.parts.<slice>.<tensor>`` (e.g. ``blocks.0.attn.qkv.parts.q.lora_A``). Plain-LoRA export of
a fused Linear writes one LoRA of rank Σr (down = [A_q; A_v], up = block-diagonal), exact; an MHA
adapter cannot be exported as plain LoRA (its ``o`` slice has another input) — use ``save_adapter``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bases import BaseKind
from .config import FUSED_PARTS, AdapterConfig
from .errors import MergeError, TargetError
from .layer import Adapter, AdapterLayer, ModelState


class FusedPart:
    """Rows ``start:stop`` of a module's dense weight, presented to an adapter as a Linear of its own."""

    def __init__(self, module: nn.Module, kind: BaseKind, start: int, stop: int) -> None:
        self.module, self.kind, self.start, self.stop = module, kind, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.kind.weight(self.module)[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.kind.bias(self.module) if hasattr(self.kind, "bias") else getattr(self.module, "bias", None)
        return None if bias is None else bias[self.start : self.stop]


class PartKind(BaseKind):
    """Reader for a :class:`FusedPart`: the parent kind's reader restricted to a block of rows."""

    name = "fused_part"

    def matches(self, module: Any) -> bool:
        return isinstance(module, FusedPart)

    def in_features(self, part: FusedPart) -> int:
        return part.kind.in_features(part.module)

    def out_features(self, part: FusedPart) -> int:
        return part.stop - part.start

    def weight(self, part: FusedPart) -> torch.Tensor:
        return part.weight

    def set_weight(self, part: FusedPart, weight: torch.Tensor) -> None:
        full = part.kind.weight(part.module).clone()
        full[part.start : part.stop] = weight.to(full.dtype)
        part.kind.set_weight(part.module, full)

    def device(self, part: FusedPart) -> torch.device:
        return part.kind.device(part.module)

    def float_dtype(self, part: FusedPart) -> torch.dtype:
        return part.kind.float_dtype(part.module)

    def has_bias(self, part: FusedPart) -> bool:
        return part.bias is not None


PART_KIND = PartKind()


class _PartView:
    """What a slice adapter is attached to: ``kind`` + ``base_layer``, like an AdapterLayer."""

    def __init__(self, part: FusedPart) -> None:
        self.kind, self.base_layer = PART_KIND, part


# -- the adapter ---------------------------------------------------------------------------------------
class FusedAdapter(Adapter):
    """One adapter of the configured method per slice of a fused weight (``parts[slice]``).

    ``ΔW`` is block-structured: rows of slice s carry that slice's ΔW_s, other rows are zero. For a
    fused Linear, ``forward`` adapts each slice of the base output with its own adapter; the MHA layer
    calls the slices one by one (``part="q"`` ...).
    """

    def __init__(
        self,
        adapter_cls: type[Adapter],
        kind: BaseKind,
        base: nn.Module,
        config: AdapterConfig,
        module_name: str,
        rows: dict[str, tuple[int, int]],
    ) -> None:
        super().__init__(kind, base, config, module_name)
        self.method = adapter_cls.method
        self.rows = dict(rows)
        self.exportable = getattr(kind, "fused_layout", None) is None
        self.parts = nn.ModuleDict()
        for p, (start, stop) in rows.items():
            part = FusedPart(base, kind, start, stop)
            self.parts[p] = adapter_cls(PART_KIND, part, config, module_name)
            self.parts[p].attach(_PartView(part))
        adapters = list(self.parts.values())
        self.mergeable = all(a.mergeable for a in adapters)
        self.merge_refusal = next((a.merge_refusal for a in adapters if not a.mergeable), "")
        self.merges_weight = any(a.merges_weight for a in adapters)
        if not self.exportable and any(type(a).merge_bias is not Adapter.merge_bias for a in adapters):
            self.mergeable = False
            self.merge_refusal = "it changes the bias, and the bias of an nn.MultiheadAttention is not merged by mm_subspace"
        self.frozen_parameters = tuple(f"parts.{p}.{n}" for p, a in self.parts.items() for n in a.frozen_parameters)
        self.formula, self.paper = adapter_cls.formula, adapter_cls.paper
        self.scaling = adapters[0].scaling
        self.user_scale = self._user_scale

    @property
    def user_scale(self) -> float:
        return self.__dict__.get("_user_scale", 1.0)

    @user_scale.setter
    def user_scale(self, value: float) -> None:
        self.__dict__["_user_scale"] = value
        for adapter in self.__dict__.get("_modules", {}).get("parts", {}).values():
            adapter.user_scale = value

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, part: str | None = None, **context: Any) -> torch.Tensor:
        if part is not None:
            return self.parts[part](x, base_out, **context) if part in self.parts else base_out
        pieces, at = [], 0
        for p, (start, stop) in sorted(self.rows.items(), key=lambda kv: kv[1]):
            if start > at:
                pieces.append(base_out[..., at:start])
            pieces.append(self.parts[p](x, base_out[..., start:stop], **context))
            at = stop
        if at < base_out.shape[-1]:
            pieces.append(base_out[..., at:])
        return torch.cat(pieces, dim=-1)

    def _per_slice(self, full: torch.Tensor, merging: bool) -> torch.Tensor:
        out = full.clone()
        for p, (start, stop) in self.rows.items():
            adapter = self.parts[p]
            if adapter.merges_weight:
                fn = adapter.merge_weight if merging else adapter.unmerge_weight
                out[start:stop] = fn(full[start:stop])
        return out

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._per_slice(weight, merging=True)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return self._per_slice(merged, merging=False)

    def _bias_per_slice(self, bias: torch.Tensor | None, merging: bool) -> torch.Tensor | None:
        new_full = None if bias is None else bias.clone()
        changed = False
        for p, (start, stop) in self.rows.items():
            adapter = self.parts[p]
            current = None if bias is None else bias[start:stop]
            new = (adapter.merge_bias if merging else adapter.unmerge_bias)(current)
            if new is current:
                continue
            changed = True
            if new_full is None:
                new_full = new.new_zeros(self.out_features)
            new_full[start:stop] = new
        return new_full if changed else bias

    def merge_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return self._bias_per_slice(bias, merging=True)

    def unmerge_bias(self, merged: torch.Tensor | None) -> torch.Tensor | None:
        return self._bias_per_slice(merged, merging=False)

    def delta_weight(self) -> torch.Tensor:
        deltas = {p: a.delta_weight() for p, a in self.parts.items()}
        any_delta = next(iter(deltas.values()))
        full = any_delta.new_zeros(self.out_features, self.in_features)
        for p, (start, stop) in self.rows.items():
            full[start:stop] = deltas[p]
        return full

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One plain LoRA of rank Σr_s: ``down = [A_s; ...]``, ``up`` block-diagonal (exact, fused Linear only)."""
        if not self.exportable:
            raise MergeError(
                f"cannot export the {self.method} adapter on {self.module_name!r} to plain LoRA: it wraps an "
                "nn.MultiheadAttention whose out_proj slice has a different input than in_proj; save it with "
                "mm_subspace.save_adapter (or merge it) instead"
            )
        factors = {p: a.lora_factors() for p, a in self.parts.items()}
        down = torch.cat([d for d, _ in factors.values()], dim=0)
        up = down.new_zeros(self.out_features, down.shape[0])
        col = 0
        for p, (d, u) in factors.items():
            start, stop = self.rows[p]
            up[start:stop, col : col + d.shape[0]] = u * (self.parts[p].scaling / self.scaling)
            col += d.shape[0]
        return down, up

    def pop_aux(self) -> torch.Tensor | None:
        total = None
        for adapter in self.parts.values():
            aux = adapter.pop_aux()
            if aux is not None:
                total = aux if total is None else total + aux
        return total

    def extra_repr(self) -> str:
        return f"method={self.method}, slices={list(self.rows)}"


# -- nn.MultiheadAttention -----------------------------------------------------------------------------
class MultiheadAttentionKind(BaseKind):
    """``nn.MultiheadAttention`` seen as one (4d, d) matrix ``[W_Q; W_K; W_V; W_O]`` (in_proj + out_proj).

    Only self-attention-shaped MHAs (``kdim == vdim == embed_dim``, no ``bias_k``/``add_zero_attn``)
    are supported, which covers open_clip's and torch's ViT/CLIP blocks.
    """

    name = "multihead_attention"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def check(self, module: nn.MultiheadAttention, module_name: str) -> None:
        problems = []
        if not module._qkv_same_embed_dim:
            problems.append("separate kdim/vdim projections")
        if module.bias_k is not None or module.add_zero_attn:
            problems.append("add_bias_kv/add_zero_attn")
        if problems:
            raise TargetError(
                f"{module_name!r} is an nn.MultiheadAttention with {' and '.join(problems)}, which mm_subspace does "
                "not adapt; target the model's linear layers instead"
            )

    def in_features(self, module: nn.MultiheadAttention) -> int:
        return int(module.embed_dim)

    def out_features(self, module: nn.MultiheadAttention) -> int:
        return 4 * int(module.embed_dim)

    def fused_layout(self, module: nn.MultiheadAttention) -> dict[str, tuple[int, int]]:
        d = int(module.embed_dim)
        return {p: (i * d, (i + 1) * d) for i, p in enumerate(FUSED_PARTS)}

    def weight(self, module: nn.MultiheadAttention) -> torch.Tensor:
        return torch.cat([module.in_proj_weight, module.out_proj.weight], 0).detach()

    def bias(self, module: nn.MultiheadAttention) -> torch.Tensor | None:
        if module.in_proj_bias is None:
            return None
        out_bias = module.out_proj.bias
        if out_bias is None:
            out_bias = module.in_proj_bias.new_zeros(module.embed_dim)
        return torch.cat([module.in_proj_bias, out_bias]).detach()

    def set_weight(self, module: nn.MultiheadAttention, weight: torch.Tensor) -> None:
        d = int(module.embed_dim)
        with torch.no_grad():
            module.in_proj_weight.copy_(weight[: 3 * d].to(module.in_proj_weight.dtype))
            module.out_proj.weight.copy_(weight[3 * d :].to(module.out_proj.weight.dtype))

    def device(self, module: nn.MultiheadAttention) -> torch.device:
        return module.in_proj_weight.device

    def float_dtype(self, module: nn.MultiheadAttention) -> torch.dtype:
        return module.in_proj_weight.dtype

    def has_bias(self, module: nn.MultiheadAttention) -> bool:
        return module.in_proj_bias is not None

    def wrap(self, module: nn.Module, state: ModelState, module_name: str) -> AdapterLayer:
        return MultiheadAttentionLayer(module, self, state, module_name)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch MHA masks (bool: True = masked out; float: added) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionLayer(AdapterLayer):
    """Replaces an ``nn.MultiheadAttention``: same call signature and outputs, adapters on q/k/v/o.

    Without active adapters it calls the wrapped MHA unchanged. With adapters it recomputes the
    attention (``torch.nn.functional.multi_head_attention_forward``'s math: per-head scaled dot
    product, masks, dropout, head-averaged weights) so each projection's output passes through its
    slice adapter: ``q = adapt_q(x, x W_Qᵀ + b_Q)``, ..., ``y = adapt_o(o, o W_Oᵀ + b_O)``.
    """

    #: the adapters see (batch, seq, d): forward transposes sequence-first inputs before applying them
    batch_dim = 0
    fixed_batch_dim = True

    # attributes code reads from an MHA (open_clip's init reads in_proj_weight / out_proj)
    batch_first = property(lambda self: self.base_layer.batch_first)
    embed_dim = property(lambda self: self.base_layer.embed_dim)
    num_heads = property(lambda self: self.base_layer.num_heads)
    _qkv_same_embed_dim = property(lambda self: self.base_layer._qkv_same_embed_dim)  # read by TransformerEncoderLayer
    in_proj_weight = property(lambda self: self.base_layer.in_proj_weight)
    in_proj_bias = property(lambda self: self.base_layer.in_proj_bias)
    out_proj = property(lambda self: self.base_layer.out_proj)

    def _adapters_run(self) -> bool:
        state = self.state
        if state.disabled or not state.active:
            return False
        return "adapter_rows" in state.context or any(n in self.adapters and n not in self.merged for n in state.active)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mha = self.base_layer
        if not self._adapters_run():
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        d, h = mha.embed_dim, mha.num_heads
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        proj = []
        for i, (p, x) in enumerate(zip("qkv", (query, key, value))):
            b = None if bias is None else bias[i * d : (i + 1) * d]
            proj.append(self.apply_adapters(x, F.linear(x, weight[i * d : (i + 1) * d], b), part=p))
        batch, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (t.reshape(batch, -1, h, d // h).transpose(1, 2) for t in proj)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.view(batch, h, tgt, src) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, src)
            mask = pad if mask is None else mask + pad
        causal = is_causal and mask is None
        dropout = mha.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
            if causal:
                scores = scores.masked_fill(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(-1)
            out = F.dropout(attn, dropout, training=self.training) @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, tgt, d)
        out = self.apply_adapters(out, F.linear(out, mha.out_proj.weight, mha.out_proj.bias), part="o")
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights


__all__ = [
    "FusedAdapter",
    "MultiheadAttentionKind",
    "MultiheadAttentionLayer",
    "PartKind",
    "FusedPart",
    "PART_KIND",
]
