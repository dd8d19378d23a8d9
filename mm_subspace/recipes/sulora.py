"""Recipes of the SuLoRA paper (Ding et al. 2025)."""

from __future__ import annotations

from .registry import Recipe, register_recipe

_SULORA_ALPHA = ("The paper gives no α: alpha = r with the default alpha/r scaling is Eq. (4) with α = 1; for the "
                 "paper's convention pass scaling_mode='alpha' and your α. Eq. (4) is read literally (pairing='index', "
                 "Kaiming A); build_config(pairing='paired', a_init='orthonormal') gives the library defaults "
                 "(docs/methods.md, SuLoRA pairing).")
#: Eq. (4) read literally, with LoRA's Kaiming A and the load-balance loss of Eq. (6) on (the library defaults pair
#: a_i with b_i, freeze an orthonormal A and leave Eq. 6 off)
_SULORA_EQ4 = dict(pairing="index", a_init="kaiming", balance_coef=0.01)
_GLUE = "GLUE (CoLA, SST-2, MRPC, QNLI, STS-B, RTE, MNLI, QQP); 3 seeds averaged (§4.3)."
register_recipe(Recipe(
    "sulora_glue_r4", "roberta", "sulora", dict(rank=4, alpha=4.0, num_subspaces=8, targets="roberta_qv", **_SULORA_EQ4),
    cite="SuLoRA §4.3 (RoBERTa-base, W_Q and W_V only, r=4 with N=8), Table 1 (89.17 avg), Table 7 (N sweep)",
    notes="No learning rate, batch or epochs are given for GLUE. Table 1's #Params (0.34M) are not this setting's: "
          "they match r=4 B-only on all six linear layers, halved from the AdaLoRA/MELoRA LoRA baseline (see "
          "docs/methods.md). " + _SULORA_ALPHA + " " + _GLUE,
    model="FacebookAI/roberta-base",
))
register_recipe(Recipe(
    "sulora_glue_r8", "roberta", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="roberta_qv", **_SULORA_EQ4),
    cite="SuLoRA §4.3 (RoBERTa-base, W_Q and W_V only, r=8 with N=16), Table 1 (89.87 avg), Table 11 (N=16 marked *)",
    notes="No learning rate, batch or epochs are given for GLUE; Table 1's 0.67M is not this setting's count (see "
          "docs/methods.md). " + _SULORA_ALPHA + " " + _GLUE,
    model="FacebookAI/roberta-base",
))
register_recipe(Recipe(
    "sulora_instructeval", "llama", "sulora", dict(rank=64, alpha=64.0, num_subspaces=128, targets="llama_qv", **_SULORA_EQ4),
    {"learning_rate": 3e-4, "lr_scheduler": "linear", "train_batch_size": 16, "num_train_epochs": 3},
    cite="SuLoRA §4.3 (LLaMA-2-7B, W_Q/W_V, AdamW, 3 epochs, linear schedule from 3e-4, batch 16, N = 2r), Table 3",
    notes="The rank is not stated for INSTRUCTEVAL: Table 3's LoRA baseline (33.6M) is exactly r=64 on q,v of "
          "LLaMA-2-7B (tested), and on GLUE SuLoRA is compared at the LoRA baseline's rank, so r=64, N=128. "
          "Data: cleaned Alpaca, 2k random samples held out as dev; INSTRUCTEVAL 5-shot MMLU, 3-shot BBH/DROP, "
          "0-shot HumanEval. " + _SULORA_ALPHA,
    model="meta-llama/Llama-2-7b-hf",
))
register_recipe(Recipe(
    "sulora_domainbed", "timm_vit", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="timm_vit_qv", **_SULORA_EQ4),
    cite="SuLoRA §4.3 (ImageNet-pretrained ViT, W_Q and W_V), Table 2 (SuLoRA r=8, N = 2r)",
    notes="timm's fused attn.qkv adapted as q and v slices (k untouched). The ViT size and the training "
          "hyper-parameters are not given; DomainBed VLCS/PACS/OfficeHome with 80/20 splits, trained per "
          "environment (LabelMe, Cartoon, Clipart). " + _SULORA_ALPHA,
    model="an ImageNet-pretrained timm ViT (size not stated)",
))
register_recipe(Recipe(
    "sulora_llava", "llava", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="llava_qv", **_SULORA_EQ4),
    extra={"tune_projector": "frozen", "freeze_vision_tower": True, "load_in_4bit": False},
    cite="SuLoRA §4.3 (LLaVA-v1 13B, W_Q and W_V), Table 4 / Table 10 (SuLoRA vs LoRA r=8)",
    notes="Instruction tuning on a 182,167-example Vision-Flan subset (187 tasks, ≤1000 each) following Shen et al. "
          "2024; zero-shot on Text-VQA, VSR, CIFAR-100, MNIST, MME. Only the language model's q,v are adapted; what "
          "happens to the projector and vision tower is not stated (we keep both frozen). No hyper-parameters "
          "given. " + _SULORA_ALPHA,
    model="LLaVA-v1 13B (stage-one aligned)",
))
