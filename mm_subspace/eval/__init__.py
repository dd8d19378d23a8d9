"""Quality metrics for the embedded defaults (see :mod:`mm_subspace.eval.digits`)."""
