#!/usr/bin/env python
"""Make the demo adapters shipped with the package (``mm_subspace/weights/demo-adapters``).

    python training/make_demo_adapters.py --output_dir mm_subspace/weights/demo-adapters

The comparison app (``apps/compare.py``) serves these at once when its adapters folder holds none, so a
fresh install shows real adapters within seconds instead of training first:

* ``dreambooth-sdxl-lora/``, ``dreambooth-sdxl-moslora/``: the headline DreamBooth run
  (``training/dreambooth_sdxl.py --adapter <method>``, every default: the shipped digits SDXL taught
  the held-out 9, 500 steps, rank 6 on ``sdxl_unet_wide`` and both text encoders), the adapter folders only
  (``unet/``, ``text_encoder/``, ``text_encoder_2/``), with the measured subject fidelity and prior
  preservation in the manifest;
* ``llava-lora/``, ``llava-moslora/``: tiny adapters of the shipped digits LLaVA
  (:func:`mm_subspace.training.demo_adapters.make_demo_llava_adapter`, rank 4, 30 steps on
  :data:`~mm_subspace.training.demo_adapters.DEMO_EXAMPLES`).

Everything is checked against ``manifest.json`` (sha256, size, this command) on load, like the shipped models.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mm_subspace import shipped
from mm_subspace.training import dreambooth_sdxl
from mm_subspace.training.demo_adapters import DEMO_ADAPTERS, DEMO_EXAMPLES, DEMO_METHODS, make_demo_llava_adapter

logger = logging.getLogger("make_demo_adapters")

LLAVA_DEMO_STEPS = 30
LLAVA_DEMO_RANK = 4


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", type=str, default=str(shipped.WEIGHTS_DIR / DEMO_ADAPTERS),
                        help="Where the demo adapters and their manifest go.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    return parser.parse_args(input_args)


def record_shipped_base(folder: Path, name: str) -> None:
    """Record the shipped model's name as the adapter's base, not this machine's absolute path to it."""
    config = folder / "adapter_config.json"
    meta = json.loads(config.read_text(encoding="utf-8"))
    meta["base_model"]["name_or_path"] = name
    config.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    metrics: dict[str, Any] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="demo-adapters-") as tmp:
        for method in DEMO_METHODS:  # the headline DreamBooth run, every default
            run = Path(tmp) / f"dreambooth-sdxl-{method}"
            result = dreambooth_sdxl.main(dreambooth_sdxl.parse_args(
                ["--adapter", method, "--output_dir", str(run), "--report_to", "none", "--threads", str(args.threads)]))
            target = out / run.name
            for part in ("unet", "text_encoder", "text_encoder_2"):
                if (run / part).is_dir():
                    shutil.copytree(run / part, target / part)
            quality = result["quality"]
            metrics[run.name] = {"steps": result["global_step"], "final_loss": round(result["final_loss"], 5),
                                 "subject_fidelity": quality["adapter_subject_fidelity"],
                                 "prior_preservation": quality["adapter_prior_preservation"],
                                 "base_subject_fidelity": quality["base_subject_fidelity"],
                                 "base_prior_preservation": quality["base_prior_preservation"]}
    from mm_subspace.pipelines import LlavaAdapters

    llava = LlavaAdapters.from_pretrained()
    for method in DEMO_METHODS:
        info = make_demo_llava_adapter(llava, out / f"llava-{method}", method, rank=LLAVA_DEMO_RANK, steps=LLAVA_DEMO_STEPS)
        record_shipped_base(out / f"llava-{method}", "mm_subspace.tiny_llava")
        metrics[f"llava-{method}"] = {"steps": LLAVA_DEMO_STEPS, "params": info.params}
    command = "python training/make_demo_adapters.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    shipped.write_manifest(
        out, name=DEMO_ADAPTERS, command=command.strip(),
        data={"sdxl": "DreamBooth default subject: 5 test-split scans of the held-out digit 9 (sklearn digits), "
                      "prompt 'a handwritten digit sks', prior preservation on 'a handwritten digit'",
              "llava": [list(e) for e in DEMO_EXAMPLES]},
        metrics=metrics, seconds=round(time.time() - started, 1),
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(parse_args())
