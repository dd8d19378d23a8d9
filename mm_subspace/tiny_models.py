"""Embedded default models: tiny, randomly initialised, real architecture classes, offline.

Nothing here downloads anything. Every model is built from a config written in this file,
with a fixed seed inside ``torch.random.fork_rng`` (the caller's global RNG is untouched).
Tokenizers use the real CLIP BPE vocabulary bundled with ``open_clip``; photos come from
scikit-image's bundled data.

Pipelines and models that are loaded by path (``--pretrained_model_name_or_path``) are built
once, written with ``save_pretrained`` to ``cache_dir() / "<name>-v<N>"`` and loaded from
there afterwards. A build goes to a temporary sibling folder that is renamed into place, so
a killed build never leaves a half folder and two processes may build at once (the loser of
the rename uses the winner's folder). Bump the ``-vN`` suffix whenever a config changes.

Tiny SDXL (``tiny_sdxl_path``): VAE scale factor 4 (three VAE blocks), UNet ``sample_size`` 8,
so the pipeline's default image is 32x32 with 8x8 latents. By default it is the shipped model
pretrained on handwritten digits (``mm_subspace/weights/tiny-sdxl-digits``, see
``training/pretrain_tiny_sdxl.py``); ``pretrained=False`` gives random weights.

Real-size configs (``llama3_8b_config``, ``llama2_7b_config``, ``clip_vit_l14_config``,
``sdxl_base_unet_config``, ``roberta_base_config``, ``roberta_large_config``, ``deberta_v3_base_config``)
are for parameter counting on ``torch.device("meta")``; they carry no weights.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import (
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_VOCAB_SIZE",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "LM_VOCAB_SIZE",
    "SAMPLE_PHOTOS",
    "cache_dir",
    "cat_photos",
    "clip_tokenizer",
    "clip_tokenizer_files",
    "clip_vit_l14_config",
    "llama3_8b_config",
    "llama2_7b_config",
    "roberta_base_config",
    "roberta_large_config",
    "deberta_v3_base_config",
    "lm_tokenizer",
    "sample_photo",
    "sdxl_base_unet_config",
    "tiny_clip_model",
    "tiny_clip_processor",
    "tiny_clip_vision",
    "tiny_llama",
    "tiny_llama_path",
    "tiny_llava",
    "tiny_llava_path",
    "tiny_llava_processor",
    "tiny_open_clip_vit",
    "tiny_sdxl_path",
    "tiny_sdxl_pipeline",
    "tiny_timm_vit",
    "write_cat_photos",
]

SEED = 0

# CLIP BPE vocabulary: 256 bytes + 256 bytes with "</w>" + 48,894 merges + 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = 49152 - 256 - 2  # number of merges CLIP uses from the bundled file
BOS_TOKEN = "<start_of_text>"  # id 49406
EOS_TOKEN = "<end_of_text>"  # id 49407
# Extra tokens of the causal-LM tokenizer, appended after the CLIP vocabulary.
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 49408
PAD_TOKEN = "<pad>"
PAD_TOKEN_ID = 49409
LM_VOCAB_SIZE = 49472  # CLIP vocab + extra tokens, rounded up to a multiple of 64
LM_MAX_LENGTH = 1024

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Simple LLaVA-1.5-style template; bos comes from the template, so tokenize the rendered
# prompt with ``add_special_tokens=False``. Assistant turns end with eos (for training).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Versioned cache folder names: bump when the corresponding builder changes.
CLIP_TOKENIZER_NAME = "clip-tokenizer-v1"
LM_TOKENIZER_NAME = "lm-tokenizer-v1"
TINY_SDXL_NAME = "tiny-sdxl-v2"  # v2: 32 px images, VAE factor 4 (8x8 latents)
TINY_LLAMA_NAME = "tiny-llama-v1"
TINY_LLAVA_NAME = "tiny-llava-v1"
TINY_LLAVA_PRETRAINED = "tiny-llava-digits"  # shipped in mm_subspace/weights
#: the shipped pretrained tiny SDXL (``mm_subspace/weights/tiny-sdxl-digits``)
TINY_SDXL_SHIPPED = "tiny-sdxl-digits"

# scikit-image photos that are bundled with the package (no download needed).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "clock",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Folder holding built artefacts: ``$MM_SUBSPACE_CACHE`` or ``~/.cache/mm_subspace``."""
    env = os.environ.get("MM_SUBSPACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mm_subspace"


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir() / name``, calling ``build(tmp_folder)`` first if it is missing.

    The build writes into a fresh temporary sibling folder that is then renamed into place
    (atomic on one file system). If another process won the rename, its folder is used.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=final.parent))
    try:
        logger.info("building %s in %s", name, tmp)
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("%s was built concurrently by another process; using it", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside ``fork_rng`` so the caller's RNG state is unchanged."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- tokenizers


def _bpe_file() -> Path:
    """Path of open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the CLIP BPE vocabulary ships with open_clip; install it with "
            "`pip install open_clip_torch`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode map (same order as open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49,408-entry CLIP vocabulary and its 48,894 merges, as open_clip builds them."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer_files() -> Path:
    """Folder with the real CLIP ``vocab.json`` + ``merges.txt`` (from open_clip's BPE file).

    The folder also holds a saved ``CLIPTokenizer`` (``CLIPTokenizer.from_pretrained`` works).
    """

    def build(folder: Path) -> None:
        vocab, merges = _clip_vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
        (folder / "merges.txt").write_text(merge_text, encoding="utf-8")
        _clip_tokenizer_from_files(folder).save_pretrained(folder)

    return _cached(CLIP_TOKENIZER_NAME, build)


def _clip_tokenizer_from_files(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,  # without it the SDXL pipeline overflows
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (bos 49406, eos/pad/unk 49407, ``model_max_length`` 77)."""
    return _clip_tokenizer_from_files(clip_tokenizer_files())


def _build_lm_tokenizer() -> PreTrainedTokenizerFast:
    """Causal-LM tokenizer on the CLIP BPE vocabulary: bos prepended, no eos appended."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers import pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _clip_vocab_and_merges()
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    # Same normaliser / pre-tokeniser as transformers' CLIPTokenizer (lower-cased, no spaces).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # ByteLevel joins the tokens into one string; "</w>" marks word ends -> spaces.
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    tok.add_special_tokens(
        [
            AddedToken(IMAGE_TOKEN, special=True, normalized=False),
            AddedToken(PAD_TOKEN, special=True, normalized=False),
        ]
    )
    assert tok.token_to_id(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    assert tok.token_to_id(PAD_TOKEN) == PAD_TOKEN_ID
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=LM_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def lm_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny LLaMA/LLaVA tokenizer: CLIP BPE + ``<image>`` (49408) + ``<pad>`` (49409).

    Prepends bos (``<start_of_text>``, 49406), never appends eos (``<end_of_text>``, 49407);
    has a simple ``USER: ... ASSISTANT:`` chat template. Lower-cases like CLIP.
    """
    from transformers import AutoTokenizer

    path = _cached(LM_TOKENIZER_NAME, lambda folder: _build_lm_tokenizer().save_pretrained(folder))
    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------- SDXL


def _tiny_sdxl_components() -> dict[str, Any]:
    """Seeded components of the tiny SDXL pipeline (see the module docstring)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    addition_time_embed_dim = 8
    text_hidden, projection_dim = 32, 32
    with _seeded(SEED):
        unet = UNet2DConditionModel(
            sample_size=8,  # latents; x vae scale factor 4 -> 32x32 images (the 8x8 digits, upscaled)
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL-like order
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1,
            attention_head_dim=(2, 4),  # heads of 16 channels, as SDXL's 64-channel heads
            use_linear_projection=True,
            cross_attention_dim=text_hidden + text_hidden,  # concat of both encoders
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # pooled text_encoder_2 output + 6 micro-conditioning numbers
            projection_class_embeddings_input_dim=projection_dim + 6 * addition_time_embed_dim,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),  # three blocks -> vae scale factor 4
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
            scaling_factor=0.13025,  # SDXL's; pretraining sets 1 / std of its latents
        )
        common = dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=text_hidden,
            intermediate_size=64,
            num_hidden_layers=2,  # SDXL reads hidden_states[-2]
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=projection_dim,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    tokenizer = clip_tokenizer()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
    )


def tiny_sdxl_path(pretrained: bool = True) -> Path:
    """Folder of the tiny SDXL pipeline (``StableDiffusionXLPipeline.from_pretrained`` loads it).

    Same layout as stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, scheduler). VAE scale factor 4, UNet sample size 8:
    default images are 32x32.

    Args:
        pretrained: ``True`` (default): the shipped ``tiny-sdxl-digits`` model, pretrained on the
            handwritten digits 0-8 by ``training/pretrain_tiny_sdxl.py`` (fp16 safetensors in
            ``mm_subspace/weights``; every file checked against its manifest first, a wrong file
            raises :class:`~mm_subspace.errors.ShippedModelError`). ``False``: the same
            architecture with seeded random weights, built once into :func:`cache_dir` (for tests
            that only need structure).
    """
    if pretrained:
        from .shipped import shipped_path

        return shipped_path(TINY_SDXL_SHIPPED)

    def build(folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        components = _tiny_sdxl_components()
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(folder)

    return _cached(TINY_SDXL_NAME, build)


def tiny_sdxl_pipeline(
    torch_dtype: torch.dtype | None = None, pretrained: bool = True
) -> StableDiffusionXLPipeline:
    """Load the tiny SDXL pipeline in ``torch_dtype`` (default float32); see :func:`tiny_sdxl_path`.

    ``pretrained=True`` (default): the shipped digits model (prompts such as "a handwritten digit
    seven", 32x32 images). ``pretrained=False``: random weights, same architecture.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path(pretrained), dtype=torch_dtype or torch.float32, local_files_only=True
    )


# --------------------------------------------------------------------------- LLaMA / LLaVA


def _tiny_llama_config() -> LlamaConfig:
    from transformers import LlamaConfig

    # Linear in_features are multiples of 64: bitsandbytes 4-bit on this CPU needs >= 64.
    return LlamaConfig(
        vocab_size=LM_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LM_MAX_LENGTH,
        rms_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def tiny_llama_path() -> Path:
    """Folder of the tiny LLaMA (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``).

    ``LlamaForCausalLM``: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab
    49,472 (~6.4M parameters, mostly embeddings). Tokenizer: see ``lm_tokenizer``.
    """

    def build(folder: Path) -> None:
        from transformers import LlamaForCausalLM

        with _seeded(SEED):
            model = LlamaForCausalLM(_tiny_llama_config())
        model.save_pretrained(folder)
        lm_tokenizer().save_pretrained(folder)

    return _cached(TINY_LLAMA_NAME, build)


def tiny_llama(
    torch_dtype: torch.dtype | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load ``(LlamaForCausalLM, tokenizer)`` of the tiny LLaMA (built on first use)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tiny_llama_path()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _tiny_clip_vision_config() -> CLIPVisionConfig:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="quick_gelu",
    )


def _clip_image_processor(size: int = 32) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def tiny_llava_processor() -> LlavaProcessor:
    """``LlavaProcessor`` of the tiny LLaVAs: 32px CLIP image processor, ``lm_tokenizer``, 16 image tokens."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_clip_image_processor(32),
        tokenizer=lm_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token; 0 gives 15 tokens for 16 features
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def tiny_llava_path(pretrained: bool = True) -> Path:
    """Folder of a tiny LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

    ``pretrained=True`` (default): the shipped ``tiny-llava-digits`` (``mm_subspace/weights``,
    checked against its sha256 manifest): CLIP vision 32px / patch 8 / hidden 64 / 3 layers,
    LLaMA hidden 128 / 4 layers, tied embeddings, pretrained on captions of scikit-learn's digits
    and number facts by ``training/pretrain_tiny_llava.py`` (see its manifest for data and metrics).

    ``pretrained=False``: random weights, built on first use into the cache — for structure-only
    tests. Vision CLIP 32px / patch 8 / hidden 32 / 2 layers -> 16 patch features
    (``vision_feature_layer=-2``); text = the tiny LLaMA config. In both, ``<image>`` is id 49408
    and the processor expands it to 16 tokens.
    """
    if pretrained:
        from .shipped import shipped_path

        return shipped_path(TINY_LLAVA_PRETRAINED)

    def build(folder: Path) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(
            vision_config=_tiny_clip_vision_config(),
            text_config=_tiny_llama_config(),
            image_token_index=IMAGE_TOKEN_ID,
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        with _seeded(SEED):
            model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = PAD_TOKEN_ID
        model.save_pretrained(folder)
        tiny_llava_processor().save_pretrained(folder)

    return _cached(TINY_LLAVA_NAME, build)


def tiny_llava(
    torch_dtype: torch.dtype | None = None, pretrained: bool = True,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load ``(LlavaForConditionalGeneration, LlavaProcessor)`` of a tiny LLaVA (see :func:`tiny_llava_path`)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = tiny_llava_path(pretrained)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype or torch.float32)
    return model, LlavaProcessor.from_pretrained(path)


# --------------------------------------------------------------------------- in-memory ViTs


def tiny_clip_vision(seed: int = SEED) -> CLIPVisionModel:
    """Seeded transformers ``CLIPVisionModel``: 32px images, patch 8, hidden 32, 2 layers."""
    from transformers import CLIPVisionModel

    with _seeded(seed):
        return CLIPVisionModel(_tiny_clip_vision_config())


def tiny_clip_model(seed: int = SEED) -> CLIPModel:
    """Seeded transformers ``CLIPModel`` (tiny vision tower + 2-layer text tower, projection 32).

    Text side uses the real CLIP vocabulary: pair it with ``clip_tokenizer()``
    (or ``tiny_clip_processor()``).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=_tiny_clip_vision_config().to_dict(),
        projection_dim=32,
    )
    with _seeded(seed):
        return CLIPModel(config)


def tiny_clip_processor() -> CLIPProcessor:
    """``CLIPProcessor`` for ``tiny_clip_model``: real CLIP tokenizer, 32px image processor."""
    from transformers import CLIPProcessor

    return CLIPProcessor(image_processor=_clip_image_processor(32), tokenizer=clip_tokenizer())


def tiny_open_clip_vit(seed: int = SEED, width: int = 64) -> torch.nn.Module:
    """Seeded ``open_clip.transformer.VisionTransformer``: 32px, patch 8, 2 layers, output 32.

    No pretrained download. Attention blocks are plain ``nn.MultiheadAttention``.

    Args:
        seed: init seed.
        width: residual width (32 or 64; heads = width // 16).
    """
    from open_clip.transformer import VisionTransformer

    with _seeded(seed):
        return VisionTransformer(
            image_size=32,
            patch_size=8,
            width=width,
            layers=2,
            heads=max(1, width // 16),
            mlp_ratio=4.0,
            output_dim=32,
        )


def tiny_timm_vit(seed: int = SEED, num_classes: int = 10) -> torch.nn.Module:
    """Seeded timm ``VisionTransformer``: img 32, patch 8, embed 64, depth 2, 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    with _seeded(seed):
        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=num_classes
        )


# --------------------------------------------------------------------------- real-size configs


def llama3_8b_config() -> LlamaConfig:
    """Config of meta-llama/Meta-Llama-3-8B (8,030,261,248 parameters); for meta-device counts."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def clip_vit_l14_config() -> CLIPVisionConfig:
    """``CLIPVisionConfig`` of openai/clip-vit-large-patch14 (vision tower: 303,179,776 params)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def sdxl_base_unet_config() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json`` (2,567,463,684 parameters).

    Use with ``UNet2DConditionModel.from_config(sdxl_base_unet_config())`` under
    ``torch.device("meta")``.
    """
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": False,
        "use_linear_projection": True,
    }


def llama2_7b_config() -> LlamaConfig:
    """Config of meta-llama/Llama-2-7b-hf (6,738,415,616 parameters): the SuLoRA INSTRUCTEVAL backbone."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, hidden_act="silu",
    )


def _roberta_config(hidden: int, layers: int, heads: int) -> Any:
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def roberta_base_config() -> Any:
    """``RobertaConfig`` of FacebookAI/roberta-base (``RobertaModel``: 124,645,632 parameters)."""
    return _roberta_config(768, 12, 12)


def roberta_large_config() -> Any:
    """``RobertaConfig`` of FacebookAI/roberta-large (``RobertaModel``: 355,359,744 parameters)."""
    return _roberta_config(1024, 24, 16)


def deberta_v3_base_config() -> Any:
    """``DebertaV2Config`` of microsoft/deberta-v3-base (``DebertaV2Model``: 183,831,552 parameters)."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0,
    )


# --------------------------------------------------------------------------- photos


def cat_photos(n: int = 4, size: int = 64, seed: int = SEED) -> list[PIL.Image.Image]:
    """``n`` real photos of one subject: crops/flips of scikit-image's ``chelsea`` cat (CC0).

    Deterministic for a given ``(n, size, seed)``: square crops of 220-300 px around the
    cat's face, every other one mirrored, resized to ``size`` x ``size`` RGB.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    if n < 1 or size < 1:
        raise ValueError(f"cat_photos needs n >= 1 and size >= 1, got n={n}, size={size}")
    photo = Image.fromarray(data.chelsea())  # 451 x 300, face centred near x=215
    width, height = photo.size
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        side = int(rng.integers(220, height + 1))
        cx = 215 + int(rng.integers(-35, 36))
        left = min(max(cx - side // 2, 0), width - side)
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if i % 2 == 1:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(crop.resize((size, size), Image.Resampling.BICUBIC))
    return images


def write_cat_photos(folder: str | os.PathLike[str], n: int = 4, size: int = 64) -> list[Path]:
    """Save ``cat_photos(n, size)`` as ``folder/cat_00.png`` ... (a DreamBooth instance folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(cat_photos(n, size)):
        path = folder / f"cat_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def sample_photo(name: str = "astronaut", size: int | None = None) -> PIL.Image.Image:
    """A real RGB photo bundled with scikit-image (``SAMPLE_PHOTOS``), optionally resized.

    Args:
        name: e.g. "astronaut" (NASA, public domain), "chelsea", "coffee", "rocket".
        size: if given, resize to ``size`` x ``size`` (no crop).
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    if name not in SAMPLE_PHOTOS:
        import difflib

        close = difflib.get_close_matches(name, SAMPLE_PHOTOS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown sample photo '{name}'; {hint}choose one of {', '.join(SAMPLE_PHOTOS)} "
            "(others in skimage.data need a download)"
        )
    array = np.asarray(getattr(data, name)())
    image = Image.fromarray(array).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
