"""The training scripts and their shared library, installed as ``mm_subspace.training``.

Scripts (``parse_args -> main(args)``, like diffusers' DreamBooth script; run as files with
``accelerate launch training/<script>.py``, as modules with ``accelerate launch -m mm_subspace.training.<script>``,
or through ``mm-subspace dreambooth`` / ``mm-subspace visual-instruction``):

* :mod:`.dreambooth_sdxl` — DreamBooth for SDXL with any adapter.
* :mod:`.visual_instruction` — LLaVA visual-instruction tuning with any adapter (full precision or 4-bit).
* :mod:`.pretrain_tiny_sdxl`, :mod:`.pretrain_tiny_llava` — how the shipped tiny models were made.

Library (imported by the installed name, so a script run as a file finds it too):

* :mod:`.script_flags` — the flags both scripts share, defined once.
* :mod:`.dreambooth_data`, :mod:`.sdxl_diffusion`, :mod:`.dreambooth_report` — DreamBooth's data, diffusion
  helpers (prompt encoding, class images, noise, EDM, loss) and reporting (card, digit quality, Hub).
* :mod:`.demo_adapters` — small demo adapters (tests, benchmarks, the comparison app's LLaVA tab).

Checkpoints, seeds, parameter groups and the NaN guard are in :mod:`mm_subspace.training_utils`.
"""
