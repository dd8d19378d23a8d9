"""Data for the training loops: LLaVA-style conversations (:mod:`mm_subspace.data.llava`)."""
