"""One file per method: its config dataclass and adapter class, registered by name.

Every module here is imported by :func:`mm_subspace.registry.get_method`, so adding a method is
adding a file.
"""
