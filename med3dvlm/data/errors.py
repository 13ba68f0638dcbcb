"""Errors raised for bad input data.

Every error is a ``DataError`` (itself a ``ValueError``) whose message names the file, and for a
CSV the row, so a user can find and fix the offending record. Callers that want to tolerate bad
samples catch ``DataError`` and nothing broader.
"""

from __future__ import annotations


class DataError(ValueError):
    """Base class: something in the dataset on disk is not what the readers expect."""


class MissingFileError(DataError):
    """A file the dataset refers to does not exist."""


class CorruptFileError(DataError):
    """A file exists but cannot be decoded (truncated, garbage bytes, malformed JSON/CSV)."""


class UnknownFormatError(DataError):
    """A volume file has a suffix no reader understands."""


class VolumeShapeError(DataError):
    """A volume has the wrong number of dimensions (or an empty axis)."""


class NonFiniteValuesError(DataError):
    """A volume holds NaN or infinite values."""


class InvalidRecordError(DataError):
    """A JSON entry or CSV row is missing fields or holds a value outside the allowed set."""


class MissingColumnsError(InvalidRecordError):
    """A CSV header lacks required columns."""


class UnsafePathError(InvalidRecordError):
    """A relative path in the dataset is absolute or climbs out of the data root with ``..``."""
