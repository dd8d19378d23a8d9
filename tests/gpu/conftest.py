"""tests/gpu: the CUDA path, skipped without a CUDA device. Each test's peak memory and time go to a JSON report:
``$MM_SUBSPACE_GPU_REPORT`` (default ``runs/gpu_report.json``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch


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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision included) per process: without a reset the bf16 run after the
    fp16 one would silently train in fp16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier run's precision would refuse fp16
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
