"""Set-up as a newcomer meets it: scripts/run.sh on a fresh clone says what it does at each step and installs
only the runtime packages; the package works installed (outside a checkout); the repository stands alone."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def git(*args, cwd=REPO):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository's committed state cloned into a temp dir with a prepared .venv: a fresh virtual
    environment that reuses this one's installed packages (a .pth line naming its site-packages), so pip
    finds the requirements satisfied instead of installing them, and this checkout's built extensions with
    their build stamp (the sources are the same), so nothing is compiled."""
    if git("status", "--porcelain", "--", "csrc", "setup.py").strip():
        pytest.skip("csrc/ or setup.py has uncommitted changes: the clone's extension would need a rebuild")
    folder = tmp_path_factory.mktemp("clone") / "llama_fast"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", REPO, str(folder)], check=True)
    for built in glob.glob(os.path.join(REPO, "llama_fast", "_*.so")):
        shutil.copy(built, folder / "llama_fast")
    base = getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", str(folder / ".venv")], check=True)
    shutil.copy(os.path.join(REPO, ".venv", ".llama_fast_build"), folder / ".venv")
    site = subprocess.run([str(folder / ".venv" / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "reused_packages.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    return folder


def test_run_sh_on_a_fresh_clone_prints_each_step(clone, tmp_path):
    env = {**os.environ, "LLAMA_FAST_CACHE_DIR": str(tmp_path / "cache")}  # the first run's conversion too
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["bash", "scripts/run.sh", "Say hi.", "--max-new-tokens", "6", "--seed", "3"], cwd=clone,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    steps = [line for line in log.splitlines() if line.startswith("[setup]") or line.startswith("[run]")]
    for expected in ("installing requirements.txt: the runtime packages",
                     "installing requirements-build.txt",
                     "registering the package in .venv",
                     "converting the default model into the cache",
                     "[run] llama-fast generate --chat"):
        assert any(expected in line for line in steps), (expected, steps)
    assert not any(line.startswith("[setup] building") for line in steps)  # built once, not again
    assert "requirements-dev.txt" not in log  # the main job does not install the test stack
    assert "is ignored: it is neither a file nor a directory" not in log
    assert "Requirement already satisfied: torch==2.13.0" in log  # pip's own progress is shown
    assert result.stdout.strip()  # the model's reply, on stdout (set-up talks on stderr)
    assert os.path.exists(clone / ".venv" / "bin" / "llama-fast")
    # Its extension is the clone's own, registered by the editable install; a second run is quiet.
    where = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", "import torch, llama_fast._C as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd="/", env=env)
    assert where.stdout.startswith(str(clone)), where
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=clone, capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode == 0 and again.stderr == "", again.stderr


def test_bench_runs_installed_outside_the_checkout(tmp_path):
    """`llama-fast bench` with the package laid out as `pip install .` installs it (setup.py's build_py:
    the packages and their package data; the built extensions beside them), run from a folder that is not
    a checkout: its prompt text is package data, its report goes to ./llama_fast_bench."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)], cwd=REPO, check=True,
                   capture_output=True)
    assert (site / "llama_fast" / "data" / "shakespeare_head.txt").exists()
    assert not (site / "tests").exists() and not (site / "benchmarks").exists()
    for built in glob.glob(os.path.join(REPO, "llama_fast", "_*.so")):
        shutil.copy(built, site / "llama_fast")
    work = tmp_path / "work"
    work.mkdir()
    code = "import sys, llama_fast.bench as b; assert b.__file__.startswith(sys.argv[1]), b.__file__; b.main(sys.argv[2:])"
    result = subprocess.run([sys.executable, "-c", code, str(site), "--engines", "llama_fast-lite", "--dtypes", "float32",
                             "--rounds", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--ttft-repeats", "1"],
                            cwd=work, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "llama_fast_bench" / "bench_decode.json").read_text())
    assert len(report["engines"][0]["tokens"]) == 4


def test_nothing_points_outside_the_repository():
    """No file of the repository names a folder outside it (the team's shared one) or a design document
    that is not in it (the architecture is docs/ARCHITECTURE.md). The needles are split so that this file
    does not match them itself."""
    shared = "shared"
    needles = tuple(n.encode() for n in ("/".join(["", "work", shared]), "/".join(["..", shared]), "DES" "IGN.md",
                                         shared + " folder"))
    files = git("ls-files").split("\n")
    offenders = []
    for name in filter(None, files):
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            text = f.read()
        if any(needle in text for needle in needles):
            offenders.append(name)
    assert offenders == []
