"""The training scripts and the batched pipeline on one CUDA GPU (skipped without one; under 5 minutes).

* the headline DreamBooth run (embedded tiny SDXL, digit subject) for 30 steps in fp16 — the real
  ``GradScaler`` calibrates; skipped steps are counted, not fatal — and in bf16 (no scaler);
* 4-bit QMoSLoRA visual-instruction tuning (NF4 base, bf16 compute) for 20 steps;
* K=4 batched generation (one denoising loop, four adapters) against K=1 runs.

Peak memory and time of each test go to ``$MM_SUBSPACE_GPU_REPORT`` (default ``runs/gpu_report.json``).
Run: ``python -m pytest -q tests/gpu`` (README, "GPU tests").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("fresh_accelerate_state")]


def report_path() -> Path:
    return Path(os.environ.get("MM_SUBSPACE_GPU_REPORT", "runs/gpu_report.json"))


@pytest.fixture
def peak_memory(request: pytest.FixtureRequest):
    """Reset CUDA's peak-memory counters; after the test, add ``{test: {peak MiB, seconds, device}}`` to the report."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    extra: dict = {}
    yield extra
    path = report_path()
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[request.node.name] = {
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def assert_trained_and_finite(weights: Path) -> None:
    tensors = load_file(str(weights))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_headline_dreambooth_30_steps(tmp_path: Path, precision: str, peak_memory: dict) -> None:
    from PIL import Image

    from mm_subspace.training import dreambooth_sdxl as db

    out = tmp_path / precision
    result = db.main(db.parse_args(["--output_dir", str(out), "--mixed_precision", precision, "--max_train_steps", "30",
                                    "--report_to", "none", "--validation_batch_size", "2"]))
    peak_memory.update(skipped_steps=result["skipped_steps"], final_loss=result["final_loss"],
                       quality=result["quality"])
    assert result["global_step"] == 30
    assert result["skipped_steps"] < 30 if precision == "fp16" else result["skipped_steps"] == 0
    assert_trained_and_finite(out / "unet" / "adapter_model.safetensors")
    grid = np.asarray(Image.open(out / "validation" / "step-000030.png"), dtype=np.float32)
    assert grid.std() > 1.0, "validation images are blank (NaN decoded as black?)"
    assert result["quality"]["adapter_subject_fidelity"] >= 0.0  # the evaluation ran on the GPU


def test_qmoslora_visual_instruction_4bit_bf16_20_steps(tmp_path: Path, peak_memory: dict) -> None:
    pytest.importorskip("bitsandbytes")
    from mm_subspace.training import visual_instruction as vi

    out = tmp_path / "qmoslora"
    result = vi.main(vi.parse_args(["--output_dir", str(out), "--adapter", "moslora", "--load_in_4bit",
                                    "--bnb_4bit_compute_dtype", "bfloat16", "--mixed_precision", "bf16",
                                    "--max_train_steps", "20", "--report_to", "none", "--eval_limit", "50"]))
    peak_memory.update(final_loss=result["final_loss"], seconds_per_step=result["seconds_per_step"],
                       eval={k: v["mean_accuracy"] for k, v in result["eval"].items()})
    assert result["global_step"] == 20 and np.isfinite(result["final_loss"])
    assert_trained_and_finite(out / "adapter_model.safetensors")


def test_batched_generation_k4_equals_k1_runs(tmp_path: Path, peak_memory: dict) -> None:
    from mm_subspace.pipelines.sdxl import SDXLAdapters
    from mm_subspace.tiny_models import tiny_sdxl_path
    from mm_subspace.training.demo_adapters import make_demo_sdxl_adapter

    torch.manual_seed(0)
    sd = SDXLAdapters.from_pretrained(tiny_sdxl_path())
    for i, method in enumerate(["lora", "moslora", "sulora"]):
        make_demo_sdxl_adapter(sd, tmp_path / f"dreambooth-sdxl-{method}", method, steps=0, init_weights=False, seed=i)
    sd.load_adapters([tmp_path / f"dreambooth-sdxl-{m}" for m in ("lora", "moslora", "sulora")])
    sd.pipe.to("cuda")
    rows = ["lora", "moslora", None, "sulora"]
    gen = {"num_inference_steps": 8, "height": 64, "width": 64, "output_type": "np"}
    batched = sd.generate_batch("a handwritten digit sks", rows, seed=3, **gen)
    single = sd.generate_sequential("a handwritten digit sks", rows, seed=3, **gen)
    peak_memory.update(batched_seconds_per_image=batched[0].seconds, single_seconds_per_image=single[0].seconds)
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.image, s.image, atol=2e-3)  # TF32/cuDNN kernels differ with the batch size
    assert np.abs(batched[0].image - batched[2].image).max() > 1e-3  # the adapters change the image
