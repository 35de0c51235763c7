"""The exceptions sgdstab raises for anything a user can fix.

Every class derives from :class:`SgdstabError`; the command line turns exactly these into one line
on stderr and exit status 2, and lets every other exception surface with its traceback, because
anything else is a bug in sgdstab. Each subclass also derives from the builtin a caller would
naturally catch (``ValueError``, ``FileNotFoundError``, ``MemoryError``), so code written against
the builtins keeps working.

Layer: below every other module (it imports nothing from sgdstab).
"""

from __future__ import annotations


class SgdstabError(Exception):
    """Base class: the message says what was wrong and what to do."""


class InputError(SgdstabError, ValueError):
    """An argument or option is out of range, of the wrong type, or inconsistent with another."""


class DataError(SgdstabError, ValueError):
    """The data (inputs, targets) or the weights cannot give a meaningful number.

    Non-finite values, a loader that changes between passes, a diverged run.
    """


class DataNotFoundError(SgdstabError, FileNotFoundError):
    """A data set's files are not where they were looked for; the message says how to get them."""


class RunFolderError(SgdstabError, ValueError):
    """A run or suite folder is missing, damaged, held by another writer, or belongs to another run."""


class ResourceLimitError(SgdstabError, MemoryError):
    """A computation would exceed a size budget (dense matrices, Gram matrices).

    The message names the budget argument and the matrix-free alternative.
    """
