"""4-bit bases (bitsandbytes Linear4bit): QLoRA / QMoSLoRA on the tiny LLaMA, every method, merge, export."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import mm_subspace as mms
from conftest import checkpointing_on
from mm_subspace import quant
from mm_subspace.tiny_models import tiny_llama, tiny_llama_path

pytestmark = pytest.mark.usefixtures("one_thread")

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama4(one_thread):
    """The tiny LLaMA loaded by load_4bit (NF4, double quantisation, device_map="cpu", prepared)."""
    return quant.load_4bit(tiny_llama_path())


def _batch(seed: int = 0, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(300, 49000, (2, length), generator=gen)


def test_load_4bit_quantises_and_prepares(llama4):
    linears = [m for m in llama4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q,k,v,o,gate,up,down per layer; lm_head stays full precision
    for layer in linears:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 with double quantisation (QLoRA)
        assert layer.support_avx512bf16_for_cpu is False  # ENVIRONMENT.md pitfall
    norms = [m for m in llama4.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert checkpointing_on(llama4)
    assert not any(p.requires_grad for p in llama4.parameters())


def test_4bit_weight_memory(llama4):
    """Linear weights: < 0.35× their float16 size, by the model's own footprint and counting all statistics."""
    linears = [m for m in llama4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # what get_memory_footprint counts (parameters and buffers), restricted to the quantised weights
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    assert packed / sum(m.in_features * m.out_features * 2 for m in linears) == 0.25
    # with absmax, nested absmax and code tables (not parameters, so not in the footprint): real-width layers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    memory = quant.weight_memory(quant.quantize_model_4bit(wide))
    print(f"4-bit/fp16 weight bytes: tiny {quant.weight_memory(llama4)}, hidden-256 {memory}")
    assert memory["quantized"] / memory["float16"] < 0.35


@pytest.mark.parametrize("method", ["lora", "moslora"])
def test_qlora_and_qmoslora_train(llama4, method):
    config = mms.config_for(method, rank=8, alpha=16, targets="llama")
    fp32, _ = tiny_llama()
    mms.inject(fp32, config)
    mms.inject(llama4, config, adapter_name=method)
    try:
        mms.set_adapter(llama4, method)
        assert mms.trainable_parameters(llama4)[0] == mms.trainable_parameters(fp32)[0] == (
            2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3) + (2 * 7 * 64 if method == "moslora" else 0)
        )
        layer = llama4.model.layers[0].self_attn.q_proj
        assert type(layer.kind).__name__ == "Linear4bitKind" and layer.adapters[method].lora_A.dtype == torch.float32
        ids = _batch()
        params = [p for p in llama4.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-3)
        llama4.train()
        losses = []
        for _ in range(30):
            loss = llama4(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, losses
    finally:
        mms.remove_adapter(llama4, method)


def test_eval_forward_does_not_repack_or_break_training():
    """After a no-grad eval forward (generate), layers with in_features < 64 still run and adapters get gradients."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    layer = bnb.nn.Linear4bit(32, 64, compute_dtype=torch.float32, quant_type="nf4")  # a user's own Linear4bit
    layer.weight = bnb.nn.Params4bit(small[0].weight.detach().clone(), requires_grad=False, quant_type="nf4", module=layer)._quantize("cpu")
    layer.bias = nn.Parameter(small[0].bias.detach().clone(), requires_grad=False)
    small[0] = layer
    quant.quantize_model_4bit(small, skip=("0",))
    mms.inject(small, mms.MoSLoRAConfig(rank=4, targets=["0", "2"], init_weights=False))
    assert all(m.support_avx512bf16_for_cpu is False for m in small.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(3, 32)
    small.eval()
    with torch.no_grad():
        before = small(x)
    small.train()
    out = small(x)
    torch.testing.assert_close(out, before)
    out.square().mean().backward()
    grads = [p.grad for p in small.parameters() if p.requires_grad]
    assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in small.modules() if isinstance(m, bnb.nn.Linear4bit))


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


@pytest.mark.parametrize("method", mms.list_methods())
def test_every_method_on_4bit_equals_method_on_dequantised_weights(method):
    """Each method on a Linear4bit computes what it computes on a float Linear holding the dequantised W."""
    q = quant.quantize_model_4bit(_mlp())
    deq = _mlp()
    with torch.no_grad():
        for i in (0, 2):
            deq[i].weight.copy_(quant.dequantize(q[i]))
    kwargs = {"rank": 4, "targets": ["0", "2"], "init_weights": False}
    try:
        config = mms.config_for(method, **kwargs)
    except mms.ConfigError:
        config = mms.config_for(method, **{**kwargs, "rank": 8})
    mms.inject(q, config)
    mms.inject(deq, config)
    state = mms.adapter_state_dict(q)
    mms.io.load_tensors_into(deq, "default", state)
    x = torch.randn(4, 64)
    torch.testing.assert_close(q(x), deq(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_merge_into_4bit_requantises(caplog, monkeypatch, quant_type, double_quant):
    """Merge = dequantise, add ΔW, requantise with the same settings; unmerge restores W up to that rounding."""
    monkeypatch.setattr(quant.Linear4bitKind, "_warned", False)  # the warning is logged once per process
    q = quant.quantize_model_4bit(_mlp(), quant_type=quant_type, double_quant=double_quant)
    mms.inject(q, mms.MoSLoRAConfig(rank=4, targets=["0", "2"], init_weights=False))
    layer = q[0]
    w0 = quant.dequantize(layer.base_layer)
    expected = w0 + layer.adapters["default"].delta_weight().detach()
    packed, state = bnb.functional.quantize_4bit(expected, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    x = torch.randn(8, 64)
    with torch.no_grad():
        adapted = q(x)
        with caplog.at_level(logging.WARNING, logger="mm_subspace.quant"):
            mms.merge(q)
        merged = q(x)
    assert "requantises" in caplog.text
    assert layer.base_layer.weight.quant_type == quant_type
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)  # still 4-bit after the merge
    torch.testing.assert_close(quant.dequantize(layer.base_layer), bnb.functional.dequantize_4bit(packed, state))
    assert (merged - adapted).norm() / adapted.norm() < 0.25  # the adapted output, up to 4-bit rounding
    mms.unmerge(q)
    assert (quant.dequantize(layer.base_layer) - w0).norm() / w0.norm() < 0.25  # two roundings (FP4 is coarser)


def test_4bit_trained_adapter_exports_to_full_precision_base(llama4, tmp_path):
    mms.inject(llama4, mms.MoSLoRAConfig(rank=4, alpha=8, targets="llama_moslora", init_weights=False), adapter_name="x")
    try:
        mms.set_adapter(llama4, "x")
        mms.save_adapter(llama4, tmp_path / "ours", adapter_name="x")
        mms.export_peft(llama4, tmp_path / "peft", adapter_name="x")
        deltas = {n: a.delta_weight().detach() for n, a in mms.iter_adapters(llama4, "x")}
    finally:
        mms.remove_adapter(llama4, "x")
    ours, _ = tiny_llama()
    mms.load_adapter(ours, tmp_path / "ours")
    for name, adapter in mms.iter_adapters(ours):
        torch.testing.assert_close(adapter.delta_weight(), deltas[name])
    plain, _ = tiny_llama()
    mms.import_peft(plain, tmp_path / "peft")
    ids = _batch(1)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_llava_4bit_vision_tower_small_layers_and_fully_trained_projector():
    """4-bit LLaVA: vision layers with in_features 32 survive generate (no CPU repack); projector kept fp32 and trained."""
    from transformers import LlavaForConditionalGeneration

    from mm_subspace import presets
    from mm_subspace.tiny_models import IMAGE_TOKEN_ID, tiny_llava_path

    model = quant.load_4bit(tiny_llava_path(pretrained=False), model_class=LlavaForConditionalGeneration,
                            skip_modules=["model.multi_modal_projector", "lm_head"])
    assert isinstance(model.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    mms.inject(model, presets.llava_config("moslora", llm_rank=8, llm_alpha=16, vision_rank=4, vision_alpha=2, projector="train"))
    ids = torch.tensor([[49406] + [IMAGE_TOKEN_ID] * 16 + [320, 1929, 539]])
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        loss.backward()
        assert model.model.multi_modal_projector.linear_1.weight.grad is not None
        assert model.model.language_model.layers[0].self_attn.q_proj.adapters["default"].lora_B.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_trainable_module_must_not_be_quantised():
    q = quant.quantize_model_4bit(_mlp())
    with pytest.raises(mms.ConfigError, match="quantised"):
        mms.inject(q, mms.LoraConfig(rank=4, targets=["2"], trainable_modules=["0"]))
    assert mms.list_adapters(q) == {} and isinstance(q[2], bnb.nn.Linear4bit)  # nothing was mutated


def test_import_mm_subspace_does_not_import_bitsandbytes():
    """`import mm_subspace` (and its tiny models) leaves bitsandbytes unloaded: only a 4-bit request loads it."""
    code = ("import sys, mm_subspace, mm_subspace.tiny_models\n"
            "print('bitsandbytes' in sys.modules)\n"
            "mm_subspace.quant._bnb()\n"
            "print('bitsandbytes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "True"]


def test_kernel_hub_warning_is_silenced_other_bitsandbytes_warnings_are_not(caplog):
    """bitsandbytes' "could not fetch the CPU kernel from the hub" line is dropped; its other warnings pass."""
    hub_logger = logging.getLogger(quant.KERNEL_HUB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=quant.KERNEL_HUB_LOGGER):
        hub_logger.warning("%s: %s. Please make sure you already `pip install kernels`", quant.KERNEL_HUB_MESSAGE,
                           "no network")
        hub_logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    quant.silence_kernel_hub_warning()  # idempotent: still one filter
    assert sum(isinstance(f, quant._KernelHubFilter) for f in hub_logger.filters) == 1


def test_importing_bitsandbytes_after_mm_subspace_prints_no_kernel_hub_message():
    """The real import (peft and diffusers import bitsandbytes on every run) is silent about the kernel hub."""
    code = "import mm_subspace, bitsandbytes\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert quant.KERNEL_HUB_MESSAGE not in out.stderr + out.stdout
