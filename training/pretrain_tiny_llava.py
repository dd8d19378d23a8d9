#!/usr/bin/env python
"""Pretrain the tiny LLaVA shipped as ``mm_subspace/weights/tiny-llava-digits``.

    python training/pretrain_tiny_llava.py            # ~10-20 min on a shared 2-core CPU, writes the shipped folder

A real ``LlavaForConditionalGeneration`` (CLIP vision tower 32px/patch 8/hidden 64/3 layers,
``vision_feature_layer=-2``; 2-layer GELU projector; LLaMA LM hidden 128/4 layers/4 heads/2 KV
heads, embeddings tied to the head) with the real CLIP BPE tokenizer and the tiny chat template,
trained from scratch on scikit-learn's digits (train part of :func:`mm_subspace.data.llava.digits_split`),
in two stages like LLaVA, which starts from a pretrained CLIP encoder: (1) the vision tower alone learns to
classify the digits from the features LLaVA reads (layer -2 patch tokens, a linear probe on all of them that
is dropped); (2) the whole model (vision tower at 0.1x the learning rate) on

* captioning: ``USER: <image>\\n<one of CAPTION_PROMPTS> ASSISTANT: the digit seven.`` (loss on the answer),
  images shifted by up to one original pixel as augmentation;
* plain text (``text_fraction`` of the rows): number facts such as "seven is an odd number." and
  "seven plus one is eight." (:func:`~mm_subspace.data.llava.digit_facts`), loss on every token,
  so the LM is a language model that knows about the numbers.

The instruction tasks of ``training/visual_instruction.py`` (:data:`~mm_subspace.data.llava.DIGIT_TASKS`)
are never shown: the base model answers them with a caption. The loss is computed on label
positions only (the 49,472-way head is the cost). At the end: greedy caption accuracy on the test
part, the model saved in fp16 with its processor, and :func:`mm_subspace.shipped.write_manifest`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm_subspace import shipped, tiny_models
from mm_subspace.data import llava as data
from mm_subspace.training_utils import LossHistory, save_loss_curve, step_generator

logger = logging.getLogger("pretrain_tiny_llava")
NAME = "tiny-llava-digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(shipped.WEIGHTS_DIR / NAME))
    p.add_argument("--max_steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--vision_steps", type=int, default=800, help="stage 1: vision-tower classification steps")
    p.add_argument("--vision_batch_size", type=int, default=64)
    p.add_argument("--vision_learning_rate", type=float, default=3e-3)
    p.add_argument("--negatives", type=int, default=4096, help="random negative tokens per step (sampled softmax)")
    p.add_argument("--text_fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is much faster than 2 on a shared CPU")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--curve", default="docs/tiny_llava_pretrain_loss.png")
    return p.parse_args(argv)


def build_model() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=tiny_models.LM_VOCAB_SIZE, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=tiny_models.LM_MAX_LENGTH, rms_norm_eps=1e-5,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=tiny_models.PAD_TOKEN_ID,
                       tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tiny_models.IMAGE_TOKEN_ID,
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tiny_models.PAD_TOKEN_ID
    model.generation_config.eos_token_id = 49407
    return model


def label_loss(model: Any, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on label positions only (the head runs on those rows alone).

    ``candidates`` (sorted unique token ids, holding every label): a sampled softmax over those
    vocabulary rows only (Jean et al. 2015), the corpus tokens plus random negatives drawn afresh
    each step. The full 49,472-way head costs ~0.8 s per step here; the shipped model is
    evaluated (and used) with the full head.
    """
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    hidden = model.model(**kwargs).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != data.IGNORE_INDEX
    h, y = hidden[keep], labels[keep]
    if candidates is None:
        return F.cross_entropy(model.lm_head(h).float(), y)
    logits = h @ model.lm_head.weight[candidates].t()
    return F.cross_entropy(logits.float(), torch.searchsorted(candidates, y))


def shift_images(pixels: torch.Tensor, gen: torch.Generator, background: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (one original digits pixel), filling with background."""
    n, _, h, w = pixels.shape
    padded = background.view(1, 3, 1, 1).expand(n, 3, h + 2 * max_shift, w + 2 * max_shift).clone()
    padded[:, :, max_shift:max_shift + h, max_shift:max_shift + w] = pixels
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def pretrain_vision(model: Any, train_px: torch.Tensor, train_digits: list[int], test_px: torch.Tensor,
                    test_digits: list[int], background: torch.Tensor, args: argparse.Namespace) -> float:
    """Stage 1 (as LLaVA starts from a pretrained CLIP encoder): train the vision tower to classify the digits
    from the features LLaVA reads (layer -2 patch tokens, flattened, a linear head dropped afterwards; a
    mean-pooled head reached only 79 % on the test scans, the flattened one 96 %).
    Returns the test accuracy of that probe."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    head = torch.nn.Linear(n_patches * tower.config.hidden_size, 10)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vision_learning_rate, total_steps=args.vision_steps)
    labels = torch.tensor(train_digits)

    def logits(px: torch.Tensor) -> torch.Tensor:
        return head(tower(px, output_hidden_states=True).hidden_states[layer][:, 1:].flatten(1))

    for step in range(args.vision_steps):
        gen = step_generator(args.seed, 1, step)
        idx = torch.randint(len(train_digits), (args.vision_batch_size,), generator=gen)
        loss = F.cross_entropy(logits(shift_images(train_px[idx], gen, background)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            logger.info("vision step %d/%d loss %.4f", step + 1, args.vision_steps, loss.item())
    with torch.no_grad():
        acc = (logits(test_px).argmax(-1) == torch.tensor(test_digits)).float().mean().item()
    logger.info("vision tower probe accuracy on the test scans: %.4f", acc)
    return acc


def caption_accuracy(model: Any, encoder: data.ConversationEncoder, pixels: torch.Tensor, digits: list[int]) -> float:
    """Greedy caption of every image (first caption prompt): fraction equal to ``the digit <d>.``."""
    prompt = encoder.prompt_ids([{"role": "user", "content": f"<image>\n{data.CAPTION_PROMPTS[0]}"}])
    tok = encoder.tokenizer
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(digits), 128):
            px = pixels[start:start + 128]
            ids = torch.tensor([prompt] * len(px))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            correct += sum(data.exact_match(t, data.digit_caption(d)) for t, d in zip(texts, digits[start:start + 128]))
    model.train()
    return correct / len(digits)


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    processor = tiny_models.tiny_llava_processor()
    encoder = data.ConversationEncoder(processor)
    tok = encoder.tokenizer
    model = build_model()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2f M parameters", n_params / 1e6)

    train_idx, test_idx = data.digits_split(0)
    image_proc = processor.image_processor

    def pixels_of(indices: list[int]) -> torch.Tensor:
        return image_proc([data.digit_image(i) for i in indices], return_tensors="pt")["pixel_values"]

    train_px, test_px = pixels_of(train_idx), pixels_of(test_idx)
    train_digits = [data.digit_label(i) for i in train_idx]
    test_digits = [data.digit_label(i) for i in test_idx]
    background = image_proc(data.digit_image(0).point(lambda _: 255), return_tensors="pt")["pixel_values"][0, :, 0, 0]

    captions = {}  # (digit, prompt index) -> Encoded (the image is filled per row)
    for d in range(10):
        for k, prompt in enumerate(data.CAPTION_PROMPTS):
            rec = data.Record(f"caption-{d}-{k}", [{"role": "user", "content": f"<image>\n{prompt}"},
                                                   {"role": "assistant", "content": data.digit_caption(d)}], image=object())
            captions[d, k] = encoder.encode(rec)
    texts = []
    for fact in data.digit_facts():
        ids = [tok.bos_token_id] + tok(fact, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        texts.append((ids, [data.IGNORE_INDEX] + ids[1:]))

    corpus_tokens = torch.tensor(sorted({t for e in captions.values() for t in e.labels} | {t for _, lab in texts for t in lab}
                                        - {data.IGNORE_INDEX}))
    vision_acc = pretrain_vision(model, train_px, train_digits, test_px, test_digits, background, args)
    tower_params = {id(p) for p in model.model.vision_tower.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in tower_params], "lr": args.learning_rate},
              {"params": list(model.model.vision_tower.parameters()), "lr": args.learning_rate * 0.1}]  # keep stage 1
    opt = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = LossHistory()
    pad = tok.pad_token_id
    for step in range(args.max_steps):
        gen = step_generator(args.seed, 0, step)
        is_text = (torch.rand(args.batch_size, generator=gen) < args.text_fraction).tolist()
        rows, images = [], []
        for text_row in is_text:
            if text_row:
                rows.append(texts[int(torch.randint(len(texts), (1,), generator=gen))])
            else:
                j = int(torch.randint(len(train_idx), (1,), generator=gen))
                enc = captions[train_digits[j], int(torch.randint(len(data.CAPTION_PROMPTS), (1,), generator=gen))]
                rows.append((enc.input_ids, enc.labels))
                images.append(j)
        width = max(len(r[0]) for r in rows)
        batch = {
            "input_ids": torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows]),
            "labels": torch.tensor([r[1] + [data.IGNORE_INDEX] * (width - len(r[1])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]),
        }
        if images:
            batch["pixel_values"] = shift_images(train_px[images], gen, background)
        negatives = torch.randint(tiny_models.LM_VOCAB_SIZE, (args.negatives,), generator=gen)
        candidates = torch.unique(torch.cat([corpus_tokens, negatives]))  # sorted
        loss = label_loss(model, batch, candidates)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(step + 1, loss=loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            logger.info("step %d/%d loss %.4f lr %.2e  %.1f s", step + 1, args.max_steps, float(loss),
                        sched.get_last_lr()[0], time.time() - started)
    train_seconds = time.time() - started

    acc_test = caption_accuracy(model, encoder, test_px, test_digits)
    acc_train = caption_accuracy(model, encoder, train_px[:450], train_digits[:450])
    logger.info("caption accuracy: test %.4f, train(450) %.4f", acc_test, acc_train)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    if args.curve:
        Path(args.curve).parent.mkdir(parents=True, exist_ok=True)
        save_loss_curve(history, args.curve, title=f"{NAME} pretraining loss")
    final = sum(r["loss"] for r in history.rows[-50:]) / len(history.rows[-50:])
    metrics = {
        "vision_probe_accuracy_test": round(vision_acc, 4),
        "caption_exact_match_test": round(acc_test, 4),
        "caption_exact_match_train_first450": round(acc_train, 4),
        "caption_eval": "greedy, prompt 'describe the image.', exact match of 'the digit <word>.'",
        "final_loss_mean_last50": round(final, 4),
        "first_loss": round(history.rows[0]["loss"], 4),
        "train_seconds": round(train_seconds, 1),
        "parameters": n_params,
    }
    command = "python training/pretrain_tiny_llava.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    shipped.write_manifest(
        out, name=NAME, command=command.strip(),
        data={"dataset": "sklearn.datasets.load_digits (1,797 UCI 8x8 scans)", "split": "stratified 75/25, random_state 0",
              "train_images": len(train_idx), "test_images": len(test_idx),
              "captions": list(data.CAPTION_PROMPTS), "text": f"{len(texts)} number facts (mm_subspace.data.llava.digit_facts)",
              "held_out": sorted(data.DIGIT_TASKS)},
        metrics=metrics,
        training={k: v for k, v in vars(args).items() if k not in ("output_dir", "curve")},
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(parse_args())
