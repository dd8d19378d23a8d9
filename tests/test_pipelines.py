"""pipelines/: our adapters in the SDXL and LLaVA pipelines, and batched multi-adapter generation.

Adapters are saved with random non-zero factors (``init_weights=False``) so every adapter changes
the output; the batched call must reproduce K separate single-adapter runs with the same seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mm_subspace as mms
from mm_subspace.pipelines import LlavaAdapters, SDXLAdapters, check_llava_request, check_sdxl_request, find_adapters
from mm_subspace.presets import LLAVA_LM_TARGETS as LANGUAGE_TARGETS
from mm_subspace.training.demo_adapters import demo_examples, make_demo_llava_adapter, make_demo_sdxl_adapter, train_visual_instruction

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of sks cat"
GEN = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=5.0)
ATOL = 1e-5  # float rounding of a different batch size; adapters move pixels by ~5e-2


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Tiny SDXL with a UNet-only lora and a UNet + both-text-encoder moslora, plus the base image."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sdxl_adapters")
    from mm_subspace.tiny_models import tiny_sdxl_path

    sd = SDXLAdapters.from_pretrained(tiny_sdxl_path(pretrained=False))  # structure only: random weights
    base = sd.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    make_demo_sdxl_adapter(sd, root / "dreambooth-sdxl-lora", "lora", steps=0, init_weights=False)
    make_demo_sdxl_adapter(sd, root / "dreambooth-sdxl-moslora", "moslora", steps=0, init_weights=False,
                           train_text_encoder=True, seed=1)
    # SuLoRA: input-routed sub-spaces, cannot be folded into plain LoRA, still loads and batches
    make_demo_sdxl_adapter(sd, root / "dreambooth-sdxl-sulora", "sulora", steps=0, init_weights=False, seed=2)
    infos = sd.load_adapters(find_adapters([root]))
    assert [i.name for i in infos] == ["lora", "moslora", "sulora"] and all(i.compatible for i in infos)
    return sd, base, root


def test_find_adapters_layouts(sdxl, tmp_path):
    _, _, root = sdxl
    infos = {i.name: i for i in find_adapters([root])}
    assert set(infos["moslora"].parts) == {"unet", "text_encoder", "text_encoder_2"}
    assert set(infos["lora"].parts) == {"unet"} and infos["lora"].method == "lora" and infos["lora"].rank == 4
    # params = every tensor of every part (lora: A and B per adapted UNet module)
    sd = sdxl[0]
    expected = sum(p.numel() for n, p in sd.pipe.unet.named_parameters() if ".adapters.lora." in n)
    assert infos["lora"].params == expected
    # a flat folder is found too, and the training state of a run is not taken for an adapter
    (root / "dreambooth-sdxl-lora" / "training_state" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
    assert len(find_adapters([root])) == 3
    # nor the checkpoints of a run that has no final adapter yet (diffusers' <output_dir>/checkpoint-<step>)
    import shutil
    shutil.copytree(infos["lora"].path / "unet", root / "killed-run" / "checkpoint-1" / "unet")
    assert len(find_adapters([root])) == 3 and not find_adapters([root / "killed-run"])


def test_base_row_equals_the_pipeline_alone(sdxl):
    sd, base, _ = sdxl
    single = sd.generate(PROMPT, None, seed=7, **GEN).image
    np.testing.assert_array_equal(single, base)  # same call, same seed: bit-identical
    batched = sd.generate_batch(PROMPT, [None], seed=7, **GEN)[0].image
    np.testing.assert_allclose(batched, base, atol=ATOL)


def test_sdxl_batched_equals_single_runs(sdxl):
    sd, base, _ = sdxl
    rows = ["lora", "moslora", None, "sulora", "lora"]
    batched = sd.generate_batch(PROMPT, rows, seed=7, **GEN)
    single = sd.generate_sequential(PROMPT, rows, seed=7, **GEN)
    assert [g.label for g in batched] == ["lora", "moslora", "base", "sulora", "lora"]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.image, s.image, atol=ATOL)
    np.testing.assert_allclose(batched[2].image, base, atol=ATOL)
    # every adapter really changes the image, and differently
    assert np.abs(batched[0].image - base).max() > 1e-3
    assert np.abs(batched[1].image - batched[0].image).max() > 1e-3
    assert np.abs(batched[3].image - base).max() > 1e-3
    # the single run is the stock pipeline with that adapter active on every component
    sd.set_adapter("moslora")
    stock = sd.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    sd.set_adapter([])
    np.testing.assert_array_equal(stock, single[1].image)


def test_sdxl_switch_scale_disable_merge(sdxl):
    sd, base, _ = sdxl
    run = lambda: sd.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]  # noqa: E731
    sd.set_adapter("moslora")
    adapted = run()
    assert mms.active_adapters(sd.pipe.text_encoder) == ["moslora"] and mms.active_adapters(sd.pipe.unet) == ["moslora"]
    with sd.disable_adapters():
        np.testing.assert_array_equal(run(), base)
    np.testing.assert_array_equal(run(), adapted)
    sd.set_scale("moslora", 0.0)
    np.testing.assert_allclose(run(), base, atol=ATOL)
    sd.set_scale("moslora", 1.0)
    sd.merge()
    assert sd.is_merged()
    np.testing.assert_allclose(run(), adapted, atol=1e-4)
    # a batched call on a merged pipeline unmerges first, and still matches
    np.testing.assert_allclose(sd.generate_batch(PROMPT, ["moslora"], seed=7, **GEN)[0].image, adapted, atol=ATOL)
    assert not sd.is_merged()
    with pytest.raises(mms.MergeError, match="sulora"):
        sd.merge(["sulora"])
    assert not sd.is_merged()
    sd.set_adapter("lora")  # UNet-only adapter: text encoders run their base weights
    assert mms.active_adapters(sd.pipe.text_encoder) == [] and mms.active_adapters(sd.pipe.unet) == ["lora"]
    sd.set_adapter(None)
    np.testing.assert_allclose(run(), base, atol=ATOL)  # unmerge restores W up to float rounding
    with pytest.raises(mms.AdapterStateError, match="unknown adapter"):
        sd.set_adapter("nope")


def test_incompatible_adapter_is_reported(sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    sd, _, _ = sdxl
    other = UNet2DConditionModel(  # another base: other widths than the tiny SDXL UNet
        sample_size=8, block_out_channels=(32, 48), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=16,
    )
    mms.inject(other, mms.LoraConfig(rank=2, targets="sdxl_unet"), "other")
    mms.save_adapter(other, tmp_path / "dreambooth-sdxl-other" / "unet", "other")
    # a LLaVA adapter offered to the SDXL pipeline, and an unreadable folder
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    infos = {i.name: i for i in sd.load_adapters(find_adapters([tmp_path]))}
    assert not infos["other"].compatible and "different base model" in infos["other"].reason
    assert "other" not in sd.adapters and "other" in sd.incompatible
    assert not infos["broken"].compatible and "not valid JSON" in infos["broken"].reason
    with pytest.raises(mms.IncompatibleAdapterError, match="different base model"):
        sd.load_adapter(tmp_path / "dreambooth-sdxl-other", name="other2")
    assert "other2" not in mms.list_adapters(sd.pipe.unet)
    meta = json.loads((tmp_path / "dreambooth-sdxl-other" / "unet" / "adapter_config.json").read_text())
    assert meta["base_model"]["class"] == "UNet2DConditionModel"


def test_request_checks():
    with pytest.raises(ValueError, match="prompt is empty"):
        check_sdxl_request("  ", 4, 64, 64, 5.0, 2)
    with pytest.raises(ValueError, match="steps"):
        check_sdxl_request("cat", 100000, 64, 64, 5.0, 2)
    with pytest.raises(ValueError, match="height"):
        check_sdxl_request("cat", 4, 99999, 64, 5.0, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_sdxl_request("cat", 4, 64, 60, 5.0, 2)
    with pytest.raises(ValueError, match="at least one adapter"):
        check_sdxl_request("cat", 4, 64, 64, 5.0, 0)
    with pytest.raises(ValueError, match="question is empty"):
        check_llava_request("", 8, 1)
    with pytest.raises(ValueError, match="max new tokens"):
        check_llava_request("what?", 0, 1)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llava_adapters")
    from mm_subspace.tiny_models import tiny_llava

    ll = LlavaAdapters(*tiny_llava(pretrained=False))  # structure-only: random weights answer distinctly
    make_demo_llava_adapter(ll, root / "llava-lora", "lora", steps=0, init_weights=False)
    make_demo_llava_adapter(ll, root / "llava-moslora", "moslora", steps=0, init_weights=False, seed=1)
    make_demo_llava_adapter(ll, root / "llava-sulora", "sulora", steps=0, init_weights=False, seed=2)
    assert [i.name for i in ll.load_adapters(find_adapters([root]))] == ["lora", "moslora", "sulora"]
    return ll


def test_llava_batched_equals_single_runs(llava):
    from mm_subspace.tiny_models import sample_photo

    image, question = sample_photo("chelsea", size=64), "what animal is in the photo?"
    rows = ["lora", None, "moslora", "sulora"]
    batched = llava.answer_batch(image, question, rows, max_new_tokens=6)
    single = [llava.answer(image, question, r, max_new_tokens=6) for r in rows]
    assert [a.label for a in batched] == ["lora", "base", "moslora", "sulora"]
    assert [a.text for a in batched] == [a.text for a in single]
    assert len({a.text for a in batched}) == 4  # the adapters answer differently from the base and each other
    # the base answer is the plain model's greedy answer
    with llava.disable_adapters():
        inputs = llava.inputs(question, image)
        out = llava.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    plain = llava.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert batched[1].text == plain


def test_visual_instruction_loop_fits_the_answers(llava):
    torch.manual_seed(0)
    mms.inject(llava.model, mms.LoraConfig(rank=4, alpha=8, targets=LANGUAGE_TARGETS), "fit")
    try:
        losses = train_visual_instruction(llava, "fit", demo_examples(), steps=5)
        assert losses[-1] < losses[0] - 0.3 and losses[-1] == min(losses)  # held-out digits tasks: the loss falls
        # only the adapter trained: the base weights are untouched and frozen
        assert all(not p.requires_grad for n, p in llava.model.named_parameters() if ".adapters." not in n)
    finally:
        mms.remove_adapter(llava.model, "fit")
        llava._apply()


# -- requests: prompt length, budget, timeout, NaN --------------------------------------------------
def test_prompts_are_capped_and_nan_is_refused(sdxl):
    from mm_subspace.pipelines.sdxl import MAX_PROMPT_CHARS

    long = "a " * MAX_PROMPT_CHARS
    with pytest.raises(ValueError, match=f"the prompt is {len(long):,d} characters long; at most {MAX_PROMPT_CHARS:,d}"):
        check_sdxl_request(long, 4, 64, 64, 5.0, 1)
    with pytest.raises(ValueError, match="the negative prompt is .* characters long"):
        check_sdxl_request("cat", 4, 64, 64, 5.0, 1, negative_prompt=long)
    with pytest.raises(ValueError, match="the prompt is .* characters long"):  # the library call checks too
        sdxl[0].generate(long, None, **GEN)
    for field, args in (("steps", (float("nan"), 64, 64, 5.0)), ("height", (4, float("inf"), 64, 5.0)),
                        ("guidance", (4, 64, 64, float("nan")))):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            check_sdxl_request("cat", *args, 1)


def test_budget_refuses_with_the_numbers_and_timeout_stops_the_loop(sdxl):
    from mm_subspace.pipelines import RequestTimeout
    from mm_subspace.pipelines.sdxl import megapixel_steps

    sd = sdxl[0]
    rate = sd.calibrate(size=32, steps=2)
    assert rate > 0 and sd.seconds_per_megapixel_step == rate
    assert megapixel_steps(2, 150, 1024, 1024, 5.0) == 2 * 2 * 150 * 1024 * 1024 / 1e6
    estimate = sd.estimate_seconds(2, 150, 1024, 1024, 5.0)
    assert estimate == pytest.approx(megapixel_steps(2, 150, 1024, 1024, 5.0) * rate)
    with pytest.raises(ValueError, match=r"2 image\(s\) x 150 steps x 1024x1024 px = 629.1 megapixel-steps, about .* s on "
                       r"this cpu .*the budget is 1 s per request: use fewer steps, a smaller size or fewer adapters"):
        sd.check_budget(2, 150, 1024, 1024, 5.0, max_seconds=1)
    sd.check_budget(1, 2, 32, 32, 5.0, max_seconds=estimate)  # within budget: no error
    calls = []
    with pytest.raises(RequestTimeout, match="stopped after step 1 of 5: the request ran past its timeout of 0 s"):
        sd.generate_batch(PROMPT, ["lora", None], seed=0, timeout=0.0, callback=lambda i, n: calls.append(i),
                          **{**GEN, "num_inference_steps": 5})
    assert calls == [1]  # stopped between the first and the second step
    out = sd.generate_batch(PROMPT, ["lora", None], seed=0, timeout=600.0, **GEN)
    assert len(out) == 2


def test_pipeline_loads_an_adapter_by_hub_id(sdxl, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    sd, _, root = sdxl
    calls = []

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        calls.append((repo_id, list(allow_patterns)))
        target = tmp_path / "cache" / repo_id.replace("/", "--")
        shutil.copytree(root / "dreambooth-sdxl-moslora", target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    info = sd.load_adapter("someone/sdxl-moslora")
    try:
        assert info.name == "sdxl-moslora" and set(info.parts) == {"unet", "text_encoder", "text_encoder_2"}
        assert calls[0][0] == "someone/sdxl-moslora" and "unet/adapter_model.safetensors" in calls[0][1]
        one = sd.generate_batch(PROMPT, ["sdxl-moslora"], seed=3, **GEN)[0].image
        two = sd.generate_batch(PROMPT, ["moslora"], seed=3, **GEN)[0].image
        np.testing.assert_allclose(one, two, atol=ATOL)
    finally:
        for component in info.parts:
            mms.remove_adapter(sd.components[component], info.name)
        sd.adapters.pop(info.name, None)
        sd.scales.pop(info.name, None)


def test_llava_answer_of_only_special_tokens_is_empty_not_a_tokenizer_panic():
    """A greedy answer that is eos at once decodes to "" (the fast tokenizer's Strip decoder panics on empty input)."""
    import torch

    from mm_subspace.data.llava import digit_image
    from mm_subspace.pipelines import LlavaAdapters

    llava = LlavaAdapters.from_pretrained()
    eos = llava.tokenizer.eos_token_id
    real_generate = llava.model.generate

    def eos_at_once(**inputs):
        out = real_generate(**inputs)
        prompt = inputs["input_ids"].shape[1]
        out[:, prompt:] = eos
        return out

    llava.model.generate = eos_at_once
    assert llava.answer(digit_image(3), "is the digit even? answer yes or no.", max_new_tokens=3).text == ""
    llava.model.generate = real_generate
    assert llava.answer(digit_image(3), "is the digit even? answer yes or no.", max_new_tokens=3).text
    assert torch.is_tensor(llava.inputs("q", None)["input_ids"])
