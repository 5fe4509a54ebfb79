"""The amx kernel level (csrc/core/amx.inc), where the CPU has AMX-BF16: its batch-invariance, error-bound and
session tests, run in a pytest process of their own. A process opts in to AMX
(csrc/core/cpu_decode.h, best_isa: torch's first fp32 matmul after it was seen at bf16 precision on a Xeon
VM), so the rest of the suite never runs after AMX products in its process."""
import os
import subprocess
import sys

import pytest

from llama_fast import _ext

from models import AMX_TESTS

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not _ext.has_ext() or "amx" not in _ext.ext().cpu_isas(),
                                reason="needs the extension and a CPU with AMX-BF16 (and the kernel's permission)")


def test_amx_level_passes_the_kernel_and_session_tests():
    files = [os.path.join(HERE, f) for f in ("test_batch_invariance.py", "test_session.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "amx", *files],
                         env=dict(os.environ, **{AMX_TESTS: "1"}), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
