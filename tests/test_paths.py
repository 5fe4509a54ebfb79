"""The cache of converted checkpoints (llama_fast/paths.py): what makes an entry stale, and how entries are
written when writers die."""
import os
import shutil
import signal
import subprocess
import sys
import time

from llama_fast.paths import complete_entry, gguf_cache_path, write_entry


def test_a_file_replaced_with_its_mtime_copied_over_gets_a_new_cache_entry(tmp_path, monkeypatch):
    """cp -p / rsync -a / tar -x: same path, same size, same mtime, other bytes."""
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"A" * 64)
    before = gguf_cache_path(str(model))
    st = os.stat(model)
    (tmp_path / "other").write_bytes(b"B" * 64)
    shutil.copy2(tmp_path / "other", model)   # rewritten in place (same inode), times copied
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(model).st_size == st.st_size and os.stat(model).st_mtime_ns == st.st_mtime_ns
    assert gguf_cache_path(str(model)) != before
    os.replace(tmp_path / "other", model)   # a new file renamed over it
    assert gguf_cache_path(str(model)) != before
    assert gguf_cache_path(str(model)) == gguf_cache_path(str(model))   # and stable while nothing changes


WRITER = """
import sys, time
from llama_fast.paths import write_entry
def write(part):
    with open(part, "w") as f:
        f.write("half")
        f.flush()
        time.sleep(60)
write_entry(sys.argv[1], {"weights.safetensors": write})
"""


def test_files_left_by_a_killed_writer_are_removed_by_the_next(tmp_path):
    folder = tmp_path / "entry"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)])
    try:
        deadline = time.monotonic() + 60
        while not (folder.exists() and any(name.endswith(".part") for name in os.listdir(folder))):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer did not start"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    live = folder / f".other.{os.getpid()}.1.part"   # a live writer's file stays
    live.write_text("x")
    assert write_entry(str(folder), {"weights.safetensors": lambda part: open(part, "w").write("whole")})
    assert sorted(os.listdir(folder)) == sorted([live.name, "done", "weights.safetensors"])
    assert (folder / "weights.safetensors").read_text() == "whole"


def test_dead_writers_files_beside_a_complete_entry_go_when_it_is_found(tmp_path):
    """A writer killed after another completed the entry (torchrun's SIGTERM to the other ranks) leaves its
    part file where no write_entry comes again; finding the entry removes it. gguf_write's own ".part" on a
    part name (a block-format conversion) is a dead writer's file too."""
    folder = tmp_path / "entry"
    assert write_entry(str(folder), {"weights.gguf": lambda part: open(part, "w").write("whole")})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [folder / f".weights.gguf.{dead.pid}.{2**47 + 3}.part", folder / f".weights.gguf.{dead.pid}.7.part.part"]
    live = folder / f".weights.gguf.{os.getpid()}.1.part.part"
    for f in (*leftovers, live):
        f.write_text("half")
    assert complete_entry(str(folder)) == str(folder)
    assert sorted(os.listdir(folder)) == sorted([live.name, "done", "weights.gguf"])
