"""Recipes of the MoSLoRA paper (Wu et al. 2024): commonsense, visual instruction, SDXL subject-driven."""

from __future__ import annotations

import copy
from typing import Any

from .registry import Recipe, register_recipe

_COMMONSENSE = dict(rank=16, alpha=32, dropout=0.05, targets="llama_moslora")
_COMMONSENSE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct (§4.1: the instruction version)"
_COMMONSENSE_DATA = ("Data: the 170k commonsense training mixture of LLM-Adapters (Hu et al. 2023), evaluated "
                     "on ARC-e/c, OBQA, SIQA, WinoGrande, PIQA, BoolQ, HellaSwag.")
register_recipe(Recipe(
    "moslora_commonsense", "llama", "moslora",
    {**_COMMONSENSE, "mixer_init": "kaiming_uniform"},
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA App. B.1, Table 7 (hyper-parameters); Tables 3-4 (Kaiming mixer, 85.6 avg; 28.4M params)",
    notes="The paper's numbers: lr 3e-5 (Table 7). The official train_moslora.sh runs lr 3e-4 with micro-batch 4 "
          "and cutoff 256: that is moslora_commonsense_official. Table 3's other inits: override mixer_init "
          "('orthogonal' 84.4, 'identity' 82.6, 'normal_unit' 80.7 — the paper gives no std; the official code's "
          "commented-out nn.init.normal_ is std 1). " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "moslora_commonsense_official", "llama", "moslora",
    {**_COMMONSENSE, "mixer_init": "kaiming_uniform"},
    {"learning_rate": 3e-4, "train_batch_size": 4, "gradient_accumulation_steps": 4, "num_train_epochs": 3,
     "max_length": 256},
    cite="official MoSLoRA code, commonsense_reasoning/train_moslora.sh (batch 16 = micro-batch 4 × 4)",
    notes="What the released script runs, which differs from the paper's Table 7 lr 3e-5 (moslora_commonsense): "
          "lr 3e-4, micro-batch 4, cutoff_len 256, val_set_size 120. " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "lora_commonsense", "llama", "lora", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7, Table 4 (LoRA baseline: 28.3M params, 82.8 avg)",
    notes="The LoRA column of Table 7. " + _COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "ts_mixing_commonsense", "llama", "ts_mixing", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA §2.2, Table 1 (two-subspaces-mixing LoRA at r=16; 'all hyper-parameters are the same' = App. B.1)",
    notes="Table 1 also reports r=8: override rank=8, alpha=16. " + _COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "dora_commonsense", "llama", "dora", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7 (DoRA column, r=16), Table 4 (DoRA 29.1M params, 85.0 avg)",
    notes=_COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "dora_commonsense_baseline", "llama", "dora", {**_COMMONSENSE, "rank": 32, "alpha": 64},
    {"learning_rate": 1e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7 (last column, DoRA† with the larger rank), Table 4 (DoRA† 57.4M params, 85.2 avg)",
    notes="Table 7's rank (16 | 32), alpha (32 | 64) and learning rate (3e-5 | 1e-5) rows each have two values; "
          "we read the second value as the last column's (DoRA†), as for rank and alpha — the table's layout does "
          "not say so explicitly. " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))

_VI_LLAMA3_MODEL = ("LLaVA with meta-llama/Meta-Llama-3-8B-Instruct, openai/clip-vit-large-patch14-336 and XTuner's "
                    "pretrained projector (llava_llama3_8b_instruct_clip_vit_large_p14_336 pretrain stage)")
_VI_DATA = "Data: LLaVA-v1.5 mix665k instruction data; evaluation with VLMEvalKit (Table 5)."
#: rank_pattern/alpha_pattern key of the vision tower (transformers' vision_tower., XTuner's visual_encoder.)
VISION_PATTERN = r"(vision_tower|visual_encoder)\..*"
_VI_CONFIG = dict(
    rank=64, alpha=128, dropout=0.05, targets="llava", mixer_init="kaiming_uniform",
    rank_pattern={VISION_PATTERN: 64}, alpha_pattern={VISION_PATTERN: 16.0},
)
_VI_EXTRA = dict(vision_rank=64, vision_alpha=16.0, vision_targets="clip_vit", freeze_vision_tower=False,
                 load_in_4bit=False)
def _visual_instruction(name: str, family: str, config: dict[str, Any], paper: dict[str, Any], official_lr: float,
                        extra: dict[str, Any], cite: str, notes: str, official_cite: str, official_notes: str,
                        model: str) -> None:
    """Register ``name`` (the paper's Table 8 values, projector frozen) and ``name_official`` (the XTuner config)."""
    register_recipe(Recipe(name, family, "moslora", copy.deepcopy(config), dict(paper),
                           {**_VI_EXTRA, **extra, "tune_projector": "frozen"}, cite=cite, notes=notes + " " + _VI_DATA,
                           model=model))
    register_recipe(Recipe(f"{name}_official", family, "moslora", copy.deepcopy(config),
                           {**paper, "learning_rate": official_lr, "lr_scheduler": "cosine", "max_length": 1472},
                           {**_VI_EXTRA, **extra, "tune_projector": "full"},
                           cite="official MoSLoRA code, visual_instruction_tuning/" + official_cite,
                           notes=official_notes + " " + _XTUNER + " " + _VI_DATA, model=model))


_XTUNER = ("XTuner run: AdamW, weight decay 0, grad-clip 1, fp16 AMP; LinearLR warm-up over the first 3% of the "
           "epoch, then cosine to 0 (set --lr_warmup_steps to 3% of the steps); max_length = 2048 − 576 image tokens; "
           "the projector trained fully from XTuner's pretrained one (XTuner's LLaVAModel never freezes it); 4 GPUs.")
_visual_instruction(
    "moslora_vi_llama3", "llava", _VI_CONFIG,
    {"learning_rate": 2e-5, "train_batch_size": 8, "gradient_accumulation_steps": 2, "num_train_epochs": 1}, 2e-5, {},
    cite="MoSLoRA §4.2, Table 8 (LLaMA-3+ViT column), App. B.2; Table 5 (57.1 avg Kaiming, 57.3 orthogonal)",
    notes="LLM q,k,v,o,gate,up,down r=64 α=128; every ViT linear (attention and MLP fc1/fc2, as the official XTuner "
          "config's find_all_linear_names) r=64 α=16; the pretrained projector kept (§4.2). Table 5's 'Orth' row: "
          "override mixer_init='orthogonal'. Dropout 0.05 is the official config's (Table 8 gives none). The "
          "official XTuner run differs (projector trained fully, cosine schedule): moslora_vi_llama3_official.",
    official_cite="kaiming_mix_lora_llava_llama3_8b_instruct_clip_vit_large_p14_336_lora_e1_gpu4_finetune.py",
    official_notes="Per-device batch 8 × accumulation 2 (global 64), lr 2e-5 as in Table 8.",
    model=_VI_LLAMA3_MODEL,
)
_VI_INTERNLM2_MODEL = ("LLaVA with internlm/internlm2-chat-7b (4-bit NF4, double quantisation), "
                       "openai/clip-vit-large-patch14-336 and XTuner's pretrained projector")
_visual_instruction(
    "qmoslora_vi_internlm2", "internlm2_vl", {**_VI_CONFIG, "rank": 512, "alpha": 256, "targets": "internlm2_vl"},
    {"learning_rate": 2e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 1}, 2e-4,
    {"load_in_4bit": True},
    cite="MoSLoRA §4.2, Table 8 (InternLM2+ViT column), App. B.2 (NF4 with double quantisation); Table 5 (59.5 avg)",
    notes="QMoSLoRA: the LLM loaded in 4-bit NF4 with double quantisation (mm_subspace.load_4bit), MoSLoRA r=512 "
          "α=256 on InternLM2's real module names wqkv, wo, w1, w2, w3 (preset internlm2_vl; the fused GQA wqkv is "
          "adapted whole, as PEFT/XTuner do), ViT linears r=64 α=16. The official config differs: lr 2e-4 (not "
          "Table 8's 2e-5), plain LoRA on the ViT (lora_use_mixer=False), projector trained fully: "
          "qmoslora_vi_internlm2_official.",
    official_cite="kaiming_mix_lora_llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu4_finetune.py",
    official_notes="lr 2e-4 (Table 8 says 2e-5), fp16 compute dtype, per-device batch 16. The official ViT adapter is "
                   "plain LoRA (no mixer); one mm_subspace config has one method, so this recipe puts MoSLoRA on the "
                   "ViT too (+64² params per ViT linear) — inject a separate lora config on the vision tower to match "
                   "it exactly.",
    model=_VI_INTERNLM2_MODEL,
)

_SDXL = dict(rank=4, alpha=4.0, targets="sdxl_unet")
_SDXL_TRAINING = {"learning_rate": 1e-4, "train_batch_size": 1, "gradient_accumulation_steps": 4,
                  "max_train_steps": 500, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "num_validation_inference_steps": 50, "seed": 0}
_SDXL_EXTRA = {"with_prior_preservation": False, "train_text_encoder": False}
_SDXL_NOTES = ("Official train_sdxl_lora_cat.sh: diffusers' train_dreambooth_lora_sdxl.py defaults (rank 4, "
               "alpha = rank, UNet to_q/to_k/to_v/to_out.0), no prior preservation, no text-encoder training, "
               "batch 1 × accumulation 4 (the paper's batch 4), constant lr 1e-4, 500 steps, resolution 1024 "
               "(our default for SDXL), fp16 with madebyollin/sdxl-vae-fp16-fix, prompt 'a photo of ikat cat'; "
               "images at 50 inference steps (§4.3, infer.py).")
register_recipe(Recipe(
    "moslora_sdxl", "sdxl", "moslora", {**_SDXL, "mixer_init": "orthogonal"}, dict(_SDXL_TRAINING),
    dict(_SDXL_EXTRA),
    cite="MoSLoRA §4.3 (SDXL DreamBooth: orthogonal mixer, lr 1e-4, batch 4, 500 steps, 50 inference steps); "
         "official subject_driven_generation/train_sdxl_lora_cat.sh",
    notes=_SDXL_NOTES + " Alias: moslora_paper.", model="stabilityai/stable-diffusion-xl-base-1.0",
))
register_recipe(Recipe(
    "lora_sdxl", "sdxl", "lora", dict(_SDXL), dict(_SDXL_TRAINING), dict(_SDXL_EXTRA),
    cite="MoSLoRA §4.3, Table 6 (the LoRA side of the human evaluation); official train_sdxl_lora_cat.sh (first run)",
    notes=_SDXL_NOTES, model="stabilityai/stable-diffusion-xl-base-1.0",
))
