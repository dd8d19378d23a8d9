"""training/visual_instruction.py on the shipped tiny LLaVA: 3-step runs (lora, moslora, sulora, 4-bit
moslora), reload/PEFT/merge parity, one-file projector save, resume after SIGKILL, 2-process CPU run,
the real data path with bad records, the recipe, and SuLoRA's training = generation routing.

Runs are tiny (8 train images x 5 tasks, batch 4, rank 4, 3 steps, 4 test images) and shared per module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mm_subspace as mms
from conftest import checkpointing_on, kill_at_first_checkpoint, run_two_cpu_processes
from mm_subspace import tiny_models
from mm_subspace.data import llava as data
from mm_subspace.errors import ConfigError, DataError
from mm_subspace.training import llava_eval
from mm_subspace.training import visual_instruction as vi

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "visual_instruction.py"

FAST = ["--report_to", "none", "--threads", "1", "--train_limit", "8", "--eval_limit", "4", "--train_batch_size", "4",
        "--rank", "4", "--eval_batch_size", "32", "--max_new_tokens", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, *extra: str, fast: list[str] = FAST) -> dict:
    return vi.main(vi.parse_args([*fast, "--output_dir", str(out), *extra]))


RUNS = {
    "lora": ["--adapter", "lora", "--save_merged"],
    "moslora": ["--adapter", "moslora", "--tune_projector", "full", "--vision_rank", "4"],
    "sulora": ["--adapter", "sulora"],
    "moslora-4bit": ["--adapter", "moslora", "--load_in_4bit"],
}


class Runs(dict):
    """name -> result of a 3-step run, trained on first use (so `-k sulora` trains only sulora)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> dict:
        if name == "moslora-4bit":
            pytest.importorskip("bitsandbytes")
        self[name] = run(self.root / name, *RUNS[name], "--max_train_steps", "3", "--checkpointing_steps", "2")
        return self[name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("vi_runs"))


def load_base(four_bit: bool = False):
    from transformers import LlavaForConditionalGeneration

    path = tiny_models.tiny_llava_path()
    if four_bit:
        from mm_subspace.quant import load_4bit

        return load_4bit(path, LlavaForConditionalGeneration, skip_modules=vi.FOUR_BIT_SKIP, gradient_checkpointing=False,
                         dtype=torch.float32)
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("name", list(RUNS))
def test_writes_every_output_and_reload_reproduces_logits(trained: Runs, name: str) -> None:
    result = trained[name]
    out = result["output_dir"]
    assert result["global_step"] == 3 and torch.isfinite(torch.tensor(result["final_loss"]))
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png", "eval.json",
              "training_args.json"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert not list(out.glob("*.bin"))  # one safetensors file holds everything trained
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev[name.split("-")[0]]["tasks"]) == set(data.DIGIT_TASKS)
    assert "## Evaluation" in (out / "README.md").read_text()
    # reload onto a fresh base: the same logits as the trained model in the training process
    model = load_base(four_bit=name.endswith("4bit"))
    mms.load_adapter(model, out)
    logits = vi.probe_forward(model, result["probe"])
    torch.testing.assert_close(logits, result["probe_logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(vi.probe_forward(load_base(name.endswith("4bit")), result["probe"]), logits, atol=1e-4)


@pytest.mark.parametrize("name", ["lora", "moslora"])
def test_stock_peft_loads_the_adapter(trained: Runs, name: str) -> None:
    from peft import PeftModel

    result = trained[name]
    peft_model = PeftModel.from_pretrained(load_base(), result["output_dir"] / "peft").eval()
    batch = vi.model_inputs(result["probe"])
    with torch.no_grad():
        logits = peft_model(**batch).logits.float()
    torch.testing.assert_close(logits, result["probe_logits"], rtol=0, atol=1e-4)


def test_projector_trained_fully_lives_in_the_same_adapter_file(trained: Runs) -> None:
    out = trained["moslora"]["output_dir"]
    tensors = load_file(out / "adapter_model.safetensors")
    proj = {k: v for k, v in tensors.items() if "multi_modal_projector" in k}
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in proj} >= {"linear_1.weight", "linear_2.weight"}
    assert any("vision_tower" in k for k in tensors)  # --vision_rank adapters too
    base = load_base()
    key = next(k for k in proj if k.endswith("linear_1.weight"))
    assert not torch.equal(proj[key], base.model.multi_modal_projector.linear_1.weight)  # it trained
    mms.load_adapter(base, out)
    assert torch.equal(base.model.multi_modal_projector.linear_1.weight, proj[key])


def test_one_step_merge_gives_a_full_model(trained: Runs) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    result = trained["lora"]
    merged_dir = result["output_dir"] / "merged"
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32)
    AutoProcessor.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    logits = vi.probe_forward(merged, result["probe"])
    torch.testing.assert_close(logits, result["probe_logits"], rtol=0, atol=1e-4)


def test_eval_only_matches_the_training_time_evaluation(trained: Runs, tmp_path: Path) -> None:
    out = trained["moslora"]["output_dir"]
    before = json.loads((out / "eval.json").read_text())
    again = vi.main(vi.parse_args([*FAST, "--output_dir", str(out), "--eval_only", "--tune_projector", "full"]))
    assert again["eval"]["moslora"]["tasks"] == before["moslora"]["tasks"]
    assert "## Evaluation (--eval_only)" in (out / "README.md").read_text()


def test_gradient_checkpointing_trains_the_same_adapter(trained: Runs, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--gradient_checkpointing recomputes activations: the same 3 steps give the same adapter."""
    plain = trained["lora"]
    enabled = []

    def spy(model):
        vi_enable(model)
        enabled.append(checkpointing_on(model))

    vi_enable = vi.enable_activation_checkpointing
    monkeypatch.setattr(vi, "enable_activation_checkpointing", spy)
    ckpt = run(tmp_path / "ckpt", *RUNS["lora"][:2], "--max_train_steps", "3", "--checkpointing_steps", "2",
               "--skip_eval", "--gradient_checkpointing")
    assert enabled == [True]
    assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    a = load_file(plain["output_dir"] / "adapter_model.safetensors")
    b = load_file(ckpt["output_dir"] / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_sulora_generation_routes_like_training() -> None:
    """The issue's bug: with a KV cache the prefill routed on the prompt and every decode step on one
    token. Under `mm_subspace.inject.routing` generate() reproduces the teacher-forced training forward exactly."""
    from mm_subspace.inject import routing
    from mm_subspace.methods import sulora

    model, processor = tiny_models.tiny_llava()
    mms.inject(model, mms.config_for("sulora", rank=4, alpha=8, targets=vi.LLM_TARGETS), "s")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if "lora_B" in name else 3.0))
    model.eval()
    encoder = data.ConversationEncoder(processor)
    prompt = encoder.prompt_ids([{"role": "user", "content": "<image>\nis the digit even? answer yes or no."}])
    ids = torch.tensor([prompt, prompt])
    pixels = processor.image_processor([data.digit_image(0), data.digit_image(5)], return_tensors="pt")["pixel_values"]
    mask = torch.ones_like(ids)

    def generate(routed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = routing(model, mask, cache=True) if routed else torch.no_grad()
        with torch.no_grad(), ctx:
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, min_new_tokens=5,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        return out.sequences, torch.stack(out.logits, 1)

    seqs, gen_logits = generate(routed=True)
    # the training forward over prompt + answer, routed on the prompt (labels mark the answer)
    labels = seqs.clone()
    labels[:, : ids.shape[1]] = data.IGNORE_INDEX
    route = sulora.prompt_route_mask(torch.ones_like(seqs), labels)
    with torch.no_grad(), routing(model, route, cache=False):
        train_logits = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), pixel_values=pixels).logits
    steps = gen_logits.shape[1]
    teacher = train_logits[:, ids.shape[1] - 1: ids.shape[1] - 1 + steps]
    torch.testing.assert_close(gen_logits, teacher, rtol=0, atol=2e-4)
    # without the rule the decode steps route on single tokens: a different model
    seqs_old, old_logits = generate(routed=False)
    assert (old_logits[:, 1:] - teacher[:, 1:]).abs().max() > 1e-2


def test_real_path_folder_model_json_data_and_bad_records(tmp_path: Path) -> None:
    """--model_name_or_path (a LLaVA saved to disk: the random tiny one) + --data_path/--image_folder."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        data.digit_image(i).save(images / f"{i}.png")
    good = [{"id": f"g{i}", "image": f"{i}.png", "task": "word",
             "conversations": [{"from": "human", "value": "<image>\nwhich digit?"}, {"from": "gpt", "value": data.DIGIT_WORDS[i]},
                               {"from": "human", "value": "plus one?"}, {"from": "gpt", "value": data.DIGIT_WORDS[i + 1]}]}
            for i in range(3)]
    bad = {"id": "bad-1", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                 {"from": "gpt", "value": "a"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(good + [bad]))
    (tmp_path / "eval.json").write_text(json.dumps(good[:2]))
    model = str(tiny_models.tiny_llava_path(pretrained=False))
    argv = ["--model_name_or_path", model, "--data_path", str(path), "--image_folder", str(images),
            "--max_train_steps", "2", "--adapter", "lora", "--eval_data_path", str(tmp_path / "eval.json")]
    fast = [a for a in FAST if a not in ("--train_limit", "8")]
    with pytest.raises(DataError, match=r"record 'bad-1'.*nope.png does not exist"):
        run(tmp_path / "out", *argv, fast=fast)
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # stopped before training
    result = run(tmp_path / "out", *argv, "--skip_bad_records", fast=fast)
    assert result["global_step"] == 2 and set(result["eval"]["lora"]["tasks"]) == {"word"}
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["base_model"]["name_or_path"] == model


@pytest.mark.parametrize(("argv", "lr"), [
    (["--adapter", "sulora"], 6e-3),                              # docs/methods.md: SuLoRA at LoRA's budget needs 6e-3
    (["--adapter", "sulora", "--learning_rate", "1e-3"], 1e-3),   # the user's flag wins
    (["--adapter", "asylora"], 2e-3),                             # AsyLoRA (B only too) lost a seed at 6e-3
    (["--adapter", "lora"], 2e-3),
    (["--adapter", "sulora", "--model_name_or_path", "x"], None),  # a real model takes the recipe's lr, not ours
])
def test_embedded_learning_rate_per_method(argv: list[str], lr: float | None) -> None:
    args = vi.parse_args(argv)
    if lr is None:
        assert args.learning_rate != vi.EMBEDDED_METHOD_LEARNING_RATES["sulora"]
        return
    assert args.learning_rate == pytest.approx(lr)
    if args.adapter == "sulora":
        assert vi.adapter_config(args).balance_coef == 0.0  # the load-balance loss is off by default


def test_parse_args_errors_and_recipe() -> None:
    args = vi.parse_args(["--recipe", "moslora_vi_llama3", "--learning_rate", "1e-3"])
    assert (args.adapter, args.rank, args.alpha, args.vision_rank, args.vision_alpha) == ("moslora", 64, 128.0, 64, 16.0)
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (8, 2, 1)
    assert args.tune_projector == "frozen" and not args.load_in_4bit
    assert args.learning_rate == 1e-3  # explicit flag wins over the recipe's 2e-5
    config = vi.adapter_config(args)
    assert config.rank_for("model.vision_tower.encoder.layers.0.mlp.fc1") == 64
    assert config.alpha_for("model.vision_tower.encoder.layers.0.mlp.fc1") == 16.0
    assert config.alpha_for("model.language_model.layers.0.mlp.gate_proj") == 128.0
    assert vi.parse_args(["--recipe", "moslora_vi_llama3"]).learning_rate == 2e-5
    # recipes' alias moslora_paper is the SDXL recipe: refused here, naming the LLaVA one
    with pytest.raises(ConfigError, match="moslora_paper is the SDXL recipe moslora_sdxl.*moslora_vi_llama3"):
        vi.parse_args(["--recipe", "moslora_paper"])
    # the official recipe's max_length reaches --model_max_length (the old applier dropped it)
    assert vi.parse_args(["--recipe", "moslora_vi_llama3_official"]).model_max_length == 1472
    assert vi.parse_args(["--recipe", "moslora_vi_llama3_official"]).lora_dropout == 0.05
    with pytest.raises(ConfigError, match="--num_subspaces does not apply to --adapter lora"):
        vi.parse_args(["--adapter", "lora", "--num_subspaces", "8"])
    with pytest.raises(ConfigError, match="unknown digits task"):
        vi.parse_args(["--tasks", "even,parity"])
    with pytest.raises(ValueError, match="--rank must be > 0"):
        vi.parse_args(["--rank", "0"])
    with pytest.raises(ConfigError, match="--image_folder needs --data_path"):
        vi.parse_args(["--image_folder", "x"])


# -- resume after SIGKILL ----------------------------------------------------------------------------
RESUME = [*FAST, "--adapter", "moslora", "--checkpointing_steps", "1", "--lr_scheduler", "constant",
          "--gradient_accumulation_steps", "2", "--skip_eval", "--lora_dropout", "0.1"]


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path) -> None:
    """Kill a run (SIGKILL) after checkpoint-1, resume with `latest`: same adapter as 2 uninterrupted steps
    (dropout on, so the per-step seeding is tested too)."""
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), *RESUME, "--output_dir", str(killed), "--max_train_steps", "100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_at_first_checkpoint(cmd, killed, timeout=300, env=env)
    assert not (killed / "adapter_config.json").exists()
    resumed = vi.main(vi.parse_args([*RESUME, "--output_dir", str(killed), "--max_train_steps", "2",
                                     "--resume_from_checkpoint", "latest"]))
    assert resumed["resumed_from"] == killed / "checkpoint-1" and resumed["global_step"] == 2
    straight = vi.main(vi.parse_args([*RESUME, "--output_dir", str(tmp_path / "straight"), "--max_train_steps", "2"]))
    a = load_file(killed / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss"] == straight["final_loss"]


# -- two CPU processes -----------------------------------------------------------------------------
def test_two_process_cpu_run_ends_with_identical_adapters(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_two_cpu_processes(SCRIPT, [*FAST, "--adapter", "moslora", "--vision_rank", "4", "--max_train_steps", "2",
                                   "--skip_eval", "--output_dir", str(out)], env={"PYTHONPATH": str(ROOT)})
    assert (out / "checkpoint-1" / "random_states_1.pkl").is_file()


def test_fsdp2_sharded_run_saves_the_same_adapter(tmp_path: Path) -> None:
    """accelerate's FSDP does not run on CPU (docs/visual_instruction.md); torch's fully_shard does. The
    sharded save path — gather the full state dict, load it into an unsharded copy, save_adapter — gives
    the adapter of the same step run unsharded."""
    helper = ROOT / "tests" / "fsdp_adapter_save.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(helper), str(tmp_path / "sharded")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    loss, digest = re.search(r"sharded loss ([0-9.]+) digest ([0-9a-f]{16})", proc.stdout).groups()
    spec = importlib.util.spec_from_file_location("fsdp_adapter_save", helper)
    fsdp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fsdp)
    from mm_subspace.training_utils import adapters_digest

    model = fsdp.build()
    ref_loss = fsdp.step(model, [p for p in model.parameters() if p.requires_grad])
    assert abs(float(loss) - ref_loss.item()) < 1e-5
    assert digest == adapters_digest({"model": model})
    saved = load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    mms.save_adapter(model, tmp_path / "plain")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert saved.keys() == plain.keys() and all(torch.allclose(saved[k], plain[k], atol=1e-6) for k in saved)


def test_shipped_tiny_llava_is_pretrained_and_verified() -> None:
    """The default is the shipped, hash-checked pretrained model: it captions held-out digits scans; the
    random builder (pretrained=False) does not; the instruction tasks are not answered by the base."""
    from mm_subspace.shipped import read_manifest

    manifest = read_manifest("tiny-llava-digits")
    assert manifest["metrics"]["caption_exact_match_test"] >= 0.9
    assert set(manifest["data"]["held_out"]) == set(data.DIGIT_TASKS)
    test = data.digits_split()[1][:24]
    caption = [data.Record(str(i), [{"role": "user", "content": f"<image>\n{data.CAPTION_PROMPTS[0]}"},
                                    {"role": "assistant", "content": data.digit_caption(data.digit_label(i))}],
                           data.digit_image(i)) for i in test]
    accuracy = {}
    for pretrained in (True, False):
        model, processor = tiny_models.tiny_llava(pretrained=pretrained)
        encoder = data.ConversationEncoder(processor)
        accuracy[pretrained] = llava_eval.evaluate(model, encoder, caption, 32, 6, vi.pixel_values(processor.image_processor))
    assert accuracy[True]["mean_accuracy"] >= 0.8 and accuracy[False]["mean_accuracy"] == 0.0


def test_float_flags_finite_and_data_paths_checked(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    for flag in ("--learning_rate", "--max_grad_norm", "--adam_beta2", "--lora_dropout", "--vision_alpha"):
        with pytest.raises(SystemExit):
            vi.parse_args([f"{flag}=nan"])
        assert f"argument {flag}: must be a finite number, got 'nan'" in capsys.readouterr().err
    for argv, says in ((["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
                       (["--lr_warmup_ratio", "1.5"], "--lr_warmup_ratio must be in [0, 1)"),
                       (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
                       (["--data_path", str(tmp_path / "none.json")], "none.json: no such file"),
                       (["--data_path", str(tmp_path), "--image_folder", str(tmp_path / "imgs")], "--data_path")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            vi.parse_args(argv)


def test_allow_outside_data_reaches_the_llava_reader(tmp_path: Path) -> None:
    from mm_subspace.tiny_models import write_cat_photos

    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    write_cat_photos(elsewhere, n=1, size=32)
    images.mkdir()
    record = {"id": "0", "image": str(next(elsewhere.glob("*.png"))),
              "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a cat"}]}
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps([record]))
    flags = ["--data_path", str(data_path), "--eval_data_path", str(data_path), "--image_folder", str(images)]
    encoder = types.SimpleNamespace(processor=None)  # training_set only keeps it (records are encoded per batch)
    args = vi.parse_args(flags)
    with pytest.raises(mms.errors.DataError, match="outside"):  # the lazy training set
        vi.training_set(args, encoder, None)
    assert isinstance(llava_eval.load_records(args)[0], mms.errors.DataError)  # the evaluation records
    args = vi.parse_args([*flags, "--allow_outside_data"])
    assert len(vi.training_set(args, encoder, None)) == 1
    assert not isinstance(llava_eval.load_records(args)[0], mms.errors.DataError)


# --------------------------------------------------------------------------- a LLaVA-1.5-like folder
def _records_665k_like(folder: Path) -> list[dict]:
    """llava_v1_5_mix665k-shaped records: single- and multi-turn image conversations (``<image>`` first or last
    in the question), and ShareGPT-style text-only conversations."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "coco" / "train2017").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "coco" / "train2017" / f"{k:012d}.jpg")
    image = {"image": "coco/train2017/000000000000.jpg"}
    return [
        {"id": "000000000000", **image, "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": "a white square."}]},
        {"id": "000000000001", "image": "coco/train2017/000000000001.jpg", "conversations": [
            {"from": "human", "value": "describe the image.\n<image>"}, {"from": "gpt", "value": "a black circle."},
            {"from": "human", "value": "is seven even?"}, {"from": "gpt", "value": "no, seven is odd."}]},
        {"id": "000000000002", "image": "coco/train2017/000000000002.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the digit plus one?"}, {"from": "gpt", "value": "eight"}]},
        {"id": "sharegpt-0", "conversations": [
            {"from": "human", "value": "what comes after three?"}, {"from": "gpt", "value": "four"},
            {"from": "human", "value": "and after nine?"}, {"from": "gpt", "value": "ten"}]},
        {"id": "sharegpt-1", "conversations": [
            {"from": "human", "value": "is eight even?"}, {"from": "gpt", "value": "yes, eight is even."}]},
    ]


@pytest.fixture(scope="module")
def llava15_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA-1.5-like folder (random tiny ``LlavaForConditionalGeneration``, LLaMA-style SentencePiece tokenizer,
    llava-hf's vicuna chat template, ``<image>`` added after the vocabulary) and a 665K-shaped JSON beside it."""
    from transformers import AutoProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from conftest import build_llama_llava_processor
    from mm_subspace.tiny_models.vision import tiny_clip_vision_config

    root = tmp_path_factory.mktemp("llava15_like")
    processor = AutoProcessor.from_pretrained(build_llama_llava_processor(root / "tokenizer"))
    tok = processor.tokenizer
    text = LlamaConfig(vocab_size=64 * -(-len(tok) // 64), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                       initializer_range=0.3)  # a frozen random head of std 0.02 caps the logits near 1: nothing to memorise with
    config = LlavaConfig(vision_config=tiny_clip_vision_config(), text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "llava-1.5-like")
    processor.save_pretrained(root / "llava-1.5-like")
    (root / "data.json").write_text(json.dumps(_records_665k_like(root)))
    return root


def test_real_model_defaults_are_the_recipe_and_logged(tmp_path: Path) -> None:
    data_json = tmp_path / "d.json"  # --data_path must exist at parse time
    data_json.write_text("[]")
    real = vi.parse_args(["--model_name_or_path", "some/llava", "--data_path", str(data_json)])
    assert (real.learning_rate, real.train_batch_size, real.gradient_accumulation_steps) == (2e-5, 8, 2)
    assert real.gradient_checkpointing is True
    assert real.bnb_4bit_compute_dtype == ("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                           else "float32")
    assert any("--learning_rate 2e-05 (recipe moslora_vi_llama3" in n for n in real.default_notes)
    assert any("--gradient_checkpointing" in n for n in real.default_notes)
    explicit = vi.parse_args(["--model_name_or_path", "m", "--data_path", str(data_json), "--learning_rate", "1e-3",
                              "--train_batch_size", "2", "--no-gradient_checkpointing"])
    assert (explicit.learning_rate, explicit.train_batch_size, explicit.gradient_accumulation_steps) == (1e-3, 2, 2)
    assert explicit.gradient_checkpointing is False
    embedded = vi.parse_args([])
    assert (embedded.learning_rate, embedded.train_batch_size, embedded.gradient_checkpointing) == (2e-3, 16, False)
    assert embedded.default_notes == [] and embedded.bnb_4bit_compute_dtype == "float32"


def test_llava15_like_folder_trains_and_greedy_answers_end_at_eos(llava15_like: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The LLaVA user's path: a LLaVA-1.5-like folder with a LLaMA SentencePiece tokenizer and the vicuna template, a
    665K-shaped JSON (multi-turn, text-only). A short memorisation run; every greedy answer is the trained answer
    followed by ``</s>``, so the model learned to stop."""
    import logging

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir, data_path = llava15_like / "llava-1.5-like", llava15_like / "data.json"
    argv = ["--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--image_folder", str(llava15_like),
            "--report_to", "none", "--threads", "1", "--adapter", "lora", "--rank", "16", "--learning_rate", "1e-2",
            "--train_batch_size", "5", "--gradient_accumulation_steps", "1", "--max_train_steps", "60",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--tune_projector", "full", "--skip_eval",
            "--group_by_modality_length", "--dataloader_num_workers", "1", "--checkpointing_steps", "1000"]
    with caplog.at_level(logging.INFO):
        result = run(tmp_path / "out", *argv, fast=[])
    assert "conversation template: vicuna_v1" in caplog.text
    assert "real-model default: --gradient_checkpointing" in caplog.text
    assert result["final_loss"] < 0.05, result["final_loss"]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    mms.load_adapter(model, tmp_path / "out", "default")
    encoder = data.ConversationEncoder(processor)
    tok = processor.tokenizer
    records = data.load_llava_json(data_path, llava15_like)
    for rec in records:
        for k in range(1, len(rec.messages), 2):  # every answer of every turn, given the conversation before it
            prompt = torch.tensor([encoder.prompt_ids(rec.messages[:k])])
            kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
            if rec.image is not None:
                kwargs["pixel_values"] = processor.image_processor([rec.image], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out = model.generate(**kwargs, max_new_tokens=24, do_sample=False, eos_token_id=encoder.stop_token_ids,
                                     pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
            expected = tok(" " + rec.messages[k]["content"] + "</s>", add_special_tokens=False).input_ids
            assert out == expected, (rec.id, k, tok.convert_ids_to_tokens(out))
            assert out[-1] == tok.eos_token_id


def test_model_card_snippet_runs_as_written_from_the_folder_above_the_run(tmp_path):
    """The card's "Use it" code: relative paths only, the image and question defined; it runs as written."""
    import shutil
    from argparse import Namespace

    from mm_subspace.training.demo_adapters import demo_adapters_path

    out = tmp_path / "llava-run"
    shutil.copytree(demo_adapters_path() / "llava-lora", out)
    args = Namespace(model_name_or_path=None, data_path=None, adapter="lora")
    code = llava_eval.usage_snippet(args, out).removeprefix("```python\n").removesuffix("```")
    assert str(tmp_path) not in code and "image = " in code and "question = " in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.endswith("\n"), proc.stderr[-2000:]  # printed an answer
    own = llava_eval.usage_snippet(Namespace(model_name_or_path=str(tmp_path / "my-llava"), data_path="data.json", adapter="lora"), out)
    assert str(tmp_path) not in own and 'from_pretrained("my-llava")' in own and 'Image.open("photo.jpg")' in own
    assert "is the digit even" not in own  # the user's own kind of question, not the digits task's
