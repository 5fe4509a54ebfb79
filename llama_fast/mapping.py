"""Which memory is a mapped file, and dropping a mapped range's pages from this process (Linux: its
/proc/self/maps and madvise; elsewhere nothing counts as mapped and nothing is dropped). Torch-free: the
GGUF reader and the fast start use it."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

_MADV_DONTNEED = 4


class FileMappings:
    """The address ranges of this process's file mappings, read once (mappings made later are not in it)."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:  # start-end perms offset dev inode path
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                        start, end = (int(a, 16) for a in fields[0].split("-"))
                        self.ranges.append((start, end))
        except OSError:
            pass

    def holds(self, address: int, nbytes: int) -> bool:
        """Whether [address, address + nbytes) lies in one mapped file."""
        return nbytes > 0 and any(lo <= address and address + nbytes <= hi for lo, hi in self.ranges)


def drop_pages(address: int, nbytes: int) -> None:
    """Drops the whole pages inside [address, address + nbytes) of a file mapping that was never written to:
    they stop counting in this process's memory (the page cache keeps them for whoever reads the file), and
    reading them again reads the file."""
    first = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache  # loaded once, not per call
def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
