"""The checkpoint format in one place: names, tags, manifest and layer layout (format.py), and
the streaming ZeRO-3 reader (reader.py) that export/ and pruning/ use."""

from . import format
from .reader import ZeroCheckpoint

__all__ = ["ZeroCheckpoint", "format"]
