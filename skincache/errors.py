"""skincache's own error types: one base class, so the CLI can turn *our* failures into one line
while anything else (a torch shape bug, CUDA running out of memory) keeps its traceback.

Each subclass also inherits the built-in type callers used to catch before (ValueError,
RuntimeError, OSError), so `except ValueError` around library calls keeps working.
"""

from __future__ import annotations


class SkincacheError(Exception):
    """Base of every error skincache raises on purpose: the message names the file or option
    and says what to do next."""


class UsageError(SkincacheError, ValueError):
    """A bad option or parameter value given by the user (checked before any heavy import)."""


class InputFileError(SkincacheError, ValueError):
    """A file the user handed us (checkpoint, head file, image, CSV) is unreadable or wrong."""


class DiskError(SkincacheError, OSError):
    """Disk full, read-only folder, permission denied: nothing done so far is lost."""


class NotFoundError(SkincacheError, FileNotFoundError):
    """A file or folder the user named is not there (a checkpoint, a run, a saved head)."""


class ExistsError(SkincacheError, FileExistsError):
    """The output the user named is taken (a run folder that already holds a run)."""


class ModelError(SkincacheError, RuntimeError):
    """A model that cannot be loaded: an unknown architecture, weights not downloadable."""
