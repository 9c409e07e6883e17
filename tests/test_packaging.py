"""What users install: the sdist and the wheel carry every tracked file of the three package
folders, pass `twine check`, and agree on one version; the tiny graph that .ci/wheel-smoke runs
without torch is still what its documented command produces.

A wheel once shipped without clipfuse.runtime.backends because the package list was kept by hand
and CI installed editable; these tests build the real artifacts instead.
"""
from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the checkout -> import package in the distribution
FOLDERS = {"export": "clipfuse/export", "runtime": "clipfuse/runtime", "benchmarks": "clipfuse/benchmarks"}
TINY = ROOT / "tests" / "data" / "tiny-naclip"


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the wheel is compared with `git ls-files`")
    out = subprocess.run(["git", "ls-files", *FOLDERS], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]
    assert files, "git ls-files listed nothing under export/, runtime/, benchmarks/"
    return files


def _committable_files() -> list[str]:
    _tracked_files()  # skips outside a git checkout
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    # `python -m build` with no target builds the sdist, then the wheel FROM the sdist (as pip
    # does from PyPI), so a stale build/ folder in the checkout cannot fill gaps in the wheel.
    pytest.importorskip("build", reason="the [dev] extra's `build` builds the sdist and wheel")
    # Build from a copy of what git would commit: a checkout's leftover *.egg-info/SOURCES.txt or
    # build/ lets setuptools ship files that a clean clone's wheel would miss.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for rel in _committable_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("clipfuse-*.whl"), out.glob("clipfuse-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_every_tracked_file(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    tracked = _tracked_files()
    missing = [f for f in tracked if FOLDERS[f.split("/", 1)[0]] + "/" + f.split("/", 1)[1] not in names]
    assert not missing, f"tracked files missing from the wheel: {missing}"
    assert not [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n], "bytecode in the wheel"
    # Everything under clipfuse/ in the wheel comes from a tracked file (no stray build outputs).
    inverse = {v: k for k, v in FOLDERS.items()}
    untracked = [n for n in names if n.startswith("clipfuse/")
                 and inverse["/".join(n.split("/")[:2])] + n[len("/".join(n.split("/")[:2])):] not in tracked]
    assert not untracked, f"wheel files that git does not track: {untracked}"


def test_sdist_holds_every_tracked_file(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in _tracked_files() if f not in names]
    assert not missing, f"tracked files missing from the sdist: {missing}"


def test_twine_check_passes(dists):
    pytest.importorskip("twine", reason="the [dev] extra's `twine` checks the distributions")
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dists["wheel"]), str(dists["sdist"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_version_everywhere(dists):
    from clipfuse.runtime._version import __version__
    from clipfuse.runtime.manifest import new_manifest

    with zipfile.ZipFile(dists["wheel"]) as whl:
        meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(whl.read(meta_name))
    assert metadata["Version"] == __version__
    assert dists["wheel"].name.startswith(f"clipfuse-{__version__}-")
    printed = subprocess.run([sys.executable, "-m", "clipfuse.runtime.cli", "--version"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert printed == ["clipfuse", __version__]
    assert new_manifest("image")["clipfuse_version"] == __version__


def test_committed_tiny_graph_is_what_its_command_makes(tmp_path):
    """.ci/wheel-smoke runs tests/data/tiny-naclip/ without torch; regenerate.sh must still
    produce it (same I/O contract and protocol, same scores within float noise, same labels)."""
    pytest.importorskip("open_clip", reason="regenerating the tiny graph needs the [export] extra")
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from clipfuse.runtime.manifest import read_manifest

    if shutil.which("clipfuse") is None:
        pytest.skip("the `clipfuse` console script is not on PATH")
    proc = subprocess.run(["bash", str(TINY / "regenerate.sh"), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    committed, fresh = read_manifest(TINY / "naclip.json"), read_manifest(tmp_path / "naclip.json")
    volatile = {"onnx_sha256", "clipfuse_version", "folding"}
    assert {k: v for k, v in committed.items() if k not in volatile} == \
           {k: v for k, v in fresh.items() if k not in volatile}

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    image = (ramp[None, :, None] * 0.6 + ramp[:, None, None] * 0.3 + rng.uniform(0, 20, (224, 224, 3)))
    batch = np.clip(image, 0, 255).astype(np.uint8)[None]
    scores = [ort.InferenceSession(str(p / "naclip.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": batch})[0]
              for p in (TINY, tmp_path)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-5)

    want = np.array(Image.open(TINY / "street.labels.png"))
    got = np.array(Image.open(tmp_path / "street.labels.png"))
    assert want.shape == got.shape
    assert (want == got).mean() >= 0.999
