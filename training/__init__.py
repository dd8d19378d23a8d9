"""The training scripts and their shared library, installed as ``mm_subspace.training``.

Scripts (``parse_args -> main(args)``, like diffusers' DreamBooth script; run as files with
``accelerate launch training/<script>.py`` or as modules with ``accelerate launch -m mm_subspace.training.<script>``,
or through ``mm-subspace dreambooth`` / ``mm-subspace visual-instruction``):

* :mod:`.dreambooth_sdxl` — DreamBooth for SDXL with any adapter.
* :mod:`.visual_instruction` — LLaVA visual-instruction tuning with any adapter (full precision or 4-bit).
* :mod:`.pretrain_tiny_sdxl`, :mod:`.pretrain_tiny_llava` — how the shipped tiny models were made.
"""
