"""Every method on a half-precision base with float32 adapters, with and without autocast.

The set-up is the one the training scripts use: the base is cast to fp16/bf16, the adapter is
injected (so its tensors start in the base dtype) and :func:`cast_trainable_params` turns the
trainable ones into float32 masters — frozen adapter tensors (SuLoRA's and AsyLoRA's frozen factor,
TS-Mixing's fixed mixer, the SVD buffers) are left in half precision. The reference is the same
model with every tensor in float32.

Expected output dtype: the base dtype, with and without ``torch.autocast(dtype=base dtype)``.
Without autocast the base layers compute in their own dtype and every adapter casts its update
back to the base output's dtype; under autocast the matmuls run in the autocast dtype, which is
the base dtype here.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import mm_subspace as mms
from conftest import single_adapter_runs
from mm_subspace.training_utils import cast_trainable_params

#: max |out − ref| / max |ref| allowed: a few ulp of the half type over two adapted layers
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
#: the same for the gradient of the trainable parameters (relative L2 error over all of them)
GRAD_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _config(method: str) -> mms.AdapterConfig:
    return mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False)


def _half_model(method: str, dtype: torch.dtype) -> nn.Module:
    """A tiny two-layer net in ``dtype`` with ``method`` injected and fp32 trainables, as the training scripts do."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10)).to(dtype)
    mms.inject(model, _config(method))
    cast_trainable_params([model], torch.float32)
    return model


def _loss(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out, out.float().pow(2).mean() + mms.aux_loss(model)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]


@pytest.mark.parametrize("use_autocast", [False, True], ids=["no_autocast", "autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", mms.list_methods())
def test_half_base_with_fp32_adapter_matches_fp32(method, dtype, use_autocast):
    model = _half_model(method, dtype)
    reference = copy.deepcopy(model).float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), method
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    model.train(), reference.train()  # aux losses (SuLoRA's balance term) are recorded in training

    context = torch.autocast("cpu", dtype=dtype) if use_autocast else contextlib.nullcontext()
    with context:
        out, loss = _loss(model, x.to(dtype))
    loss.backward()
    ref_out, ref_loss = _loss(reference, x)
    ref_loss.backward()

    assert out.dtype == dtype
    assert torch.isfinite(loss)
    grads = _grads(model)
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads), method
    scale = ref_out.abs().max()
    assert (out.float() - ref_out).abs().max() <= TOLERANCE[dtype] * scale, method
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in _grads(reference)])
    assert torch.linalg.norm(flat - ref_flat) <= GRAD_TOLERANCE[dtype] * torch.linalg.norm(ref_flat), method


@pytest.mark.parametrize("use_autocast", [False, True], ids=["no_autocast", "autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_routed_rows_on_a_half_base_equal_single_runs(dtype, use_autocast):
    """Per-row routing (stacked LoRA/AsyLoRA rows, SuLoRA's own forward) on a half base with fp32 adapters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10)).to(dtype).eval()
    for name in ("lora", "asylora", "sulora"):
        mms.inject(model, _config(name), name)
    cast_trainable_params([model], torch.float32)
    rows = ["sulora", "lora", None, "asylora"]
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    context = torch.autocast("cpu", dtype=dtype) if use_autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        expected = single_adapter_runs(model, x, rows)
        with mms.forward_context(model, adapter_rows=rows):
            routed = model(x)
    assert routed.dtype == dtype
    torch.testing.assert_close(routed, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
