"""Tests for mm_subspace.tiny_models: real token ids, published param counts, disk round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_subspace import tiny_models as tm
from mm_subspace.tiny_models.cache import cached
from mm_subspace.tiny_models.tokenizers import _clip_vocab_and_merges

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "A sks dog, in the snow!", "don't 42 émigré café"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fresh cache for the module, so every build path runs once and is shared."""
    folder = tmp_path_factory.mktemp("mm_subspace_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MM_SUBSPACE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def sdxl_path() -> Path:
    return tm.tiny_sdxl_path(pretrained=False)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- cache


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MM_SUBSPACE_CACHE", str(tmp_path))
    assert tm.cache_dir() == tmp_path
    monkeypatch.delenv("MM_SUBSPACE_CACHE")
    assert tm.cache_dir() == Path.home() / ".cache" / "mm_subspace"


def test_cached_failed_build_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MM_SUBSPACE_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # a killed build

    with pytest.raises(KeyboardInterrupt):
        cached("thing-v1", build)
    assert list(tmp_path.iterdir()) == []


def test_cached_loser_of_rename_uses_winner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MM_SUBSPACE_CACHE", str(tmp_path))
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "mine.txt").write_text("loser")
        winner = tmp_path / "thing-v1"  # another process finishes first
        winner.mkdir()
        (winner / "mine.txt").write_text("winner")

    path = cached("thing-v1", build)
    assert path == tmp_path / "thing-v1"
    assert (path / "mine.txt").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing-v1"]  # temp folder removed
    assert cached("thing-v1", build) == path and len(calls) == 1  # built once


def test_two_processes_build_at_once(tmp_path: Path) -> None:
    code = (
        "from mm_subspace import tiny_models as tm; "
        "print(tm.clip_tokenizer()('a cat').input_ids)"
    )
    env = {**os.environ, "MM_SUBSPACE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and "49406, 320, 2368, 49407" in outs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tm.CLIP_TOKENIZER_NAME]


# --------------------------------------------------------------------------- tokenizers


def test_clip_vocab_equals_open_clip() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    vocab, merges = _clip_vocab_and_merges()
    assert vocab == SimpleTokenizer().encoder
    assert len(vocab) == tm.CLIP_VOCAB_SIZE and len(merges) == 48894


def test_clip_tokenizer_ids_equal_open_clip() -> None:
    import open_clip

    files = tm.clip_tokenizer_files()
    assert (files / "vocab.json").is_file() and (files / "merges.txt").is_file()
    tok = tm.clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    ref = open_clip.tokenize(PROMPTS)
    for prompt, row in zip(PROMPTS, ref):
        ids = tok(prompt).input_ids
        assert ids == row[: len(ids)].tolist() and row[len(ids)] == 0
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok(PROMPTS[0], padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)


def test_lm_tokenizer_bos_only_and_clip_ids() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tok = tm.lm_tokenizer()
    simple = SimpleTokenizer()
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ids == [49406] + simple.encode(prompt)  # bos, no eos
    assert tok.convert_tokens_to_ids(tm.IMAGE_TOKEN) == tm.IMAGE_TOKEN_ID == 49408
    assert tok.pad_token_id == 49409 and tok.eos_token_id == 49407
    assert len(tok) <= tm.LM_VOCAB_SIZE
    ids = tok("look <image> at this", add_special_tokens=False).input_ids
    assert ids.count(tm.IMAGE_TOKEN_ID) == 1
    ids = tok("a photo of a cat").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<start_of_text>USER: <image>\nWhat is it?\nASSISTANT: A cat.<end_of_text>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == 49406 and ids.count(49406) == 1 and ids[-1] == 49407


# --------------------------------------------------------------------------- SDXL


def test_tiny_sdxl_generates_32px_deterministically(sdxl_path: Path) -> None:
    pipe = tm.tiny_sdxl_pipeline(pretrained=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8

    def run() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        out = pipe("a photo of a cat", num_inference_steps=4, generator=generator, output_type="np")
        return out.images

    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    generator = torch.Generator().manual_seed(1)
    image = pipe("a photo", num_inference_steps=2, generator=generator).images[0]
    assert image.size == (32, 32)


def test_tiny_sdxl_config_is_sdxl_shaped(sdxl_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    # how --pretrained_model_name_or_path loads it
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert unet.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    )
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    betas = (sched.beta_schedule, sched.beta_start, sched.beta_end)
    assert betas == ("scaled_linear", 0.00085, 0.012)
    steps = (sched.num_train_timesteps, sched.timestep_spacing, sched.steps_offset)
    assert steps == (1000, "leading", 1)
    prompt = "a photo of a cat"
    assert pipe.tokenizer(prompt).input_ids == pipe.tokenizer_2(prompt).input_ids


def test_tiny_sdxl_loads_identical_weights_and_keeps_global_rng(sdxl_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = tm.tiny_sdxl_pipeline(pretrained=False), tm.tiny_sdxl_pipeline(pretrained=False)
    assert torch.equal(torch.rand(3), expected)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same_state(getattr(first, name), getattr(second, name)), name
    # A rebuild from the seed reproduces the saved weights bit for bit.
    assert _same_state(tm.tiny_sdxl_components()["unet"], first.unet)


# --------------------------------------------------------------------------- LLaMA / LLaVA


def test_tiny_llama_round_trip_and_generate() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tm.tiny_llama()
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 49472)
    linears = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.in_features % 64 == 0 for m in linears)  # bitsandbytes 4-bit on CPU
    path = tm.tiny_llama_path()
    again = AutoModelForCausalLM.from_pretrained(path)
    assert _same_state(model, again)
    assert AutoTokenizer.from_pretrained(path)("a cat").input_ids == tok("a cat").input_ids
    enc = tok("a photo of", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, enc.input_ids.shape[1] + 3)
    assert tm.tiny_llama(torch.bfloat16)[0].dtype == torch.bfloat16


def test_tiny_llava_forward_and_generate_on_real_image() -> None:
    from transformers import LlavaForConditionalGeneration

    model, processor = tm.tiny_llava()
    assert model.config.image_token_index == tm.IMAGE_TOKEN_ID
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        images=tm.sample_photo("astronaut"),
        text=prompt,
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert inputs.pixel_values.shape == (1, 3, 32, 32)
    assert int((inputs.input_ids == tm.IMAGE_TOKEN_ID).sum()) == 16
    assert inputs.input_ids[0, 0] == 49406 and int((inputs.input_ids == 49406).sum()) == 1
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], 49472) and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 3)
    again = LlavaForConditionalGeneration.from_pretrained(tm.tiny_llava_path())
    assert _same_state(model, again)


# --------------------------------------------------------------------------- in-memory ViTs


@pytest.mark.parametrize(
    ("builder", "out_shape"),
    [
        (tm.tiny_clip_vision, (2, 17, 32)),
        (tm.tiny_open_clip_vit, (2, 32)),
        (tm.tiny_timm_vit, (2, 10)),
    ],
)
def test_tiny_vits_seeded_forward(builder, out_shape: tuple[int, ...]) -> None:
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a, b = builder(), builder()
    assert torch.equal(torch.rand(2), expected)  # global RNG untouched
    assert _same_state(a, b)
    assert not _same_state(a, builder(seed=1))
    x = torch.randn(2, 3, 32, 32)
    out = a(pixel_values=x).last_hidden_state if builder is tm.tiny_clip_vision else a(x)
    assert tuple(out.shape) == out_shape


def test_open_clip_vit_uses_multihead_attention() -> None:
    vit = tm.tiny_open_clip_vit(width=32)
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in vit.modules()) == 2


def test_tiny_clip_model_with_processor() -> None:
    model, processor = tm.tiny_clip_model(), tm.tiny_clip_processor()
    inputs = processor(
        text=["a photo of a cat", "a rocket"],
        images=[tm.sample_photo("chelsea"), tm.sample_photo("rocket")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()


# --------------------------------------------------------------------------- real-size configs


def test_meta_parameter_counts_match_published() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    def count(module: torch.nn.Module) -> int:
        assert next(module.parameters()).is_meta
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(LlamaForCausalLM(tm.llama3_8b_config())) == 8_030_261_248
        assert count(CLIPVisionModel(tm.clip_vit_l14_config())) == 303_179_776
        assert count(UNet2DConditionModel.from_config(tm.sdxl_base_unet_config())) == 2_567_463_684


# --------------------------------------------------------------------------- photos


def test_cat_photos_deterministic_distinct(tmp_path: Path) -> None:
    photos = tm.cat_photos(n=4, size=48)
    assert [p.size for p in photos] == [(48, 48)] * 4 and {p.mode for p in photos} == {"RGB"}
    arrays = [np.asarray(p) for p in photos]
    again = [np.asarray(p) for p in tm.cat_photos(n=4, size=48)]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again))
    assert len({a.tobytes() for a in arrays}) == 4
    paths = tm.write_cat_photos(tmp_path / "instance", n=3, size=32)
    assert sorted(os.listdir(tmp_path / "instance")) == ["cat_00.png", "cat_01.png", "cat_02.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(tm.cat_photos(3, 32)[0]))


def test_sample_photo_offline_and_error_names_fix() -> None:
    astronaut = tm.sample_photo()
    assert astronaut.size == (512, 512) and astronaut.mode == "RGB"
    assert tm.sample_photo("camera", size=32).size == (32, 32)  # grayscale -> RGB
    with pytest.raises(ValueError, match="did you mean 'astronaut'"):
        tm.sample_photo("astronout")


def _stock_sdxl_image(folder: Path) -> np.ndarray:
    """An image from stock ``StableDiffusionXLPipeline.from_pretrained(folder)``: no ``torch_dtype`` argument."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a handwritten digit seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    return out.images


def test_shipped_tiny_sdxl_loads_in_stock_diffusers_without_torch_dtype() -> None:
    image = _stock_sdxl_image(tm.tiny_sdxl_path())
    ours = tm.tiny_sdxl_pipeline()  # float32 explicitly: the same model
    ours.set_progress_bar_config(disable=True)
    ref = ours("a handwritten digit seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    np.testing.assert_array_equal(image, ref)


def test_declare_float32_configs_makes_an_fp16_pipeline_load_in_stock_diffusers(tmp_path: Path) -> None:
    from mm_subspace.compat import declare_float32_configs

    pipe = tm.tiny_sdxl_pipeline(pretrained=False)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "fp16")
    with pytest.raises(RuntimeError, match="must have the same dtype"):  # what stock diffusers does with it
        _stock_sdxl_image(tmp_path / "fp16")
    assert declare_float32_configs(tmp_path / "fp16") == ["text_encoder", "text_encoder_2"]
    assert declare_float32_configs(tmp_path / "fp16") == []  # idempotent
    assert np.isfinite(_stock_sdxl_image(tmp_path / "fp16")).all()
    with pytest.raises(ValueError, match="no model_index.json"):
        declare_float32_configs(tmp_path)
