"""Exceptions raised by mm_subspace.

Every error names the problem and the fix. All inherit from :class:`SubspaceError`, and from the
builtin type a caller would naturally catch (``ValueError`` for bad input, ``RuntimeError`` for an
operation that cannot be done in the model's current state), so ``except ValueError`` keeps working.
These are the only exceptions the loaders let escape on bad files (see ``tests/test_io.py``).
"""

from __future__ import annotations


class SubspaceError(Exception):
    """Base class of every mm_subspace error."""


class ConfigError(SubspaceError, ValueError):
    """An adapter configuration is invalid (unknown method, bad rank, unknown field, ...)."""


class TargetError(SubspaceError, ValueError):
    """A target module name matched nothing, or matched a layer type we cannot wrap."""


class AdapterFileError(SubspaceError, ValueError):
    """An adapter on disk is corrupt, truncated, of an unknown format, or has wrong keys/shapes."""


class IncompatibleAdapterError(AdapterFileError):
    """An adapter on disk was made for a different base model (missing modules, other shapes)."""


class MergeError(SubspaceError, RuntimeError):
    """The adapter cannot be folded into the base weight (input-dependent or nonlinear ΔW)."""


class AdapterStateError(SubspaceError, RuntimeError):
    """The operation is not possible in the model's current state (e.g. adapter name exists)."""


class NonFiniteError(SubspaceError, FloatingPointError):
    """A NaN or inf was found in a loss or an adapter output."""


class ShippedModelError(SubspaceError, RuntimeError):
    """A pretrained default shipped with the package is missing, truncated or altered."""


class DataError(SubspaceError, ValueError):
    """Training data is malformed: a data set (missing images, captions, columns) or a record (image/``<image>``
    mismatch, missing file, bad turns, ...)."""


class HubError(SubspaceError, OSError):
    """A name that is no local path could not be fetched as a Hugging Face Hub id (offline, missing, private,
    gated); the message names the id, ``HF_HUB_OFFLINE``, logging in and passing a local folder."""
