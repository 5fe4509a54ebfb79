"""Fetches llama.cpp's tokenizer test vectors (once) into the cache and prints the folder holding them.

llama.cpp ships, for each vocabulary it supports, a vocab-only GGUF (`ggml-vocab-NAME.gguf`) with test
strings (`.gguf.inp`) and the ids its tokenizer gives them (`.gguf.out`). They travel in the
llama-cpp-python source distribution (vendor/llama.cpp/models/); this downloads that sdist with pip
(pinned by version and hash), extracts only those files into
`$LLAMA_FAST_CACHE_DIR/llama-cpp-vocab-VERSION` (default ~/.cache/llama_fast) and deletes the sdist.
Later runs find the folder complete and return at once. Exit status 2: pip could not download it.

    python scripts/fetch_tokenizer_vectors.py        # prints the folder
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_DIR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/"
DONE = "complete"  # written last: a folder without it is an interrupted fetch


class DownloadError(RuntimeError):
    """pip could not download the sdist (no network, or no PyPI)."""


def vectors_dir() -> str:
    """The cache folder of the vectors (under LLAMA_FAST_CACHE_DIR like converted models; when that is
    "none", under the default cache: these are downloads, not conversions)."""
    root = os.environ.get("LLAMA_FAST_CACHE_DIR")
    if not root or root == "none":
        root = os.path.join(os.path.expanduser("~"), ".cache", "llama_fast")
    return os.path.join(root, f"llama-cpp-vocab-{VERSION}")


def fetch() -> str:
    """The folder holding ggml-vocab-*.gguf(.inp/.out), downloading it on the first call."""
    target = vectors_dir()
    if os.path.exists(os.path.join(target, DONE)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        requirement = os.path.join(tmp, "requirement.txt")
        with open(requirement, "w") as f:
            f.write(f"llama-cpp-python=={VERSION} --hash=sha256:{SHA256}\n")
        print(f"fetching llama.cpp's tokenizer test vectors (llama-cpp-python {VERSION} sdist, ~77 MB, once) "
              f"into {target}", file=sys.stderr, flush=True)
        # pip reads the sdist's metadata (fetching its build backend into a throwaway environment) but
        # builds and installs nothing.
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "-r", requirement, "-d", tmp]
        result = subprocess.run(pip, capture_output=True, text=True)
        sdist = os.path.join(tmp, f"llama_cpp_python-{VERSION}.tar.gz")
        if not os.path.exists(sdist):
            raise DownloadError(f"pip could not download llama-cpp-python=={VERSION}: "
                                f"{(result.stderr or result.stdout).strip()[-500:]}")
        staging = os.path.join(tmp, "vectors")
        os.makedirs(staging)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name[len(MEMBER_DIR):]
                if (member.isfile() and member.name.startswith(MEMBER_DIR) and name.startswith("ggml-vocab-")
                        and "/" not in name):
                    with tar.extractfile(member) as src, open(os.path.join(staging, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        open(os.path.join(staging, DONE), "w").close()
        shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier fetch
        os.replace(staging, target)
    return target


def main() -> int:
    try:
        print(fetch())
    except DownloadError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
