"""Lazy loading of the compiled extension llama_fast._C, so `import llama_fast` works without it."""
from __future__ import annotations

import functools
import importlib


class ExtensionNotBuiltError(ImportError):
    pass


@functools.cache
def ext():
    """The llama_fast._C module; raises ExtensionNotBuiltError with the fix if it was not built."""
    try:
        return importlib.import_module("llama_fast._C")
    except ImportError as err:
        raise ExtensionNotBuiltError(
            "llama_fast._C (the C++ extension) is not built or does not load: "
            f"{err}. Build it with `bash scripts/bootstrap.sh` (or `python setup.py build_ext --inplace`)."
        ) from err


def has_ext() -> bool:
    try:
        ext()
        return True
    except ExtensionNotBuiltError:
        return False
