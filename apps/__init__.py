"""Apps, installed as ``mm_subspace.apps``: :mod:`.compare` (Gradio side-by-side comparison; ``mm-subspace compare``)."""
