"""Run the tritonserver binary bundled with nvidia-pytriton on a model repository (CPU-only, Python
backend only): how the tests and the benchmark load what `clipfuse triton-repo` writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import ClipfuseError
from .server import python_libdir_first


def prepare(workdir: Path) -> tuple:
    """(tritonserver binary, backend directory, environment) ready to run.

    Like PyTriton: the backends folder is copied next to a stub built for this Python version,
    the running interpreter's libpython comes first on the loader path (docs/serving.md#serving-one-machine) and its bin
    folder first on PATH, so the stub's embedded Python finds this environment's packages (its
    numpy<2, the Python backend 2.51 reads numpy 2 arrays as empty tensors).
    """
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError as exc:
        raise ClipfuseError(f"the bundled tritonserver comes with nvidia-pytriton: pip install 'clipfuse[serve]' ({exc})") from None
    root = get_root_module_path() / "tritonserver"
    backends = Path(workdir) / "backends"
    if not backends.exists():
        shutil.copytree(root / "backends", backends)
        shutil.copy2(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                     backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    python_libdir_first(env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([env["LD_LIBRARY_PATH"], str(get_libs_path())])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return root / "bin" / "tritonserver", backends, env


def start(repository: Path, workdir: Path, http_port: int, grpc_port: int, metrics_port: int,
          host: str = "127.0.0.1", exit_timeout_s: int = 5, log: Optional[Path] = None,
          extra: Optional[List[str]] = None) -> subprocess.Popen:
    """Start tritonserver on `repository` (returns at once; poll /v2/health/ready)."""
    binary, backends, env = prepare(Path(workdir))
    cmd = [str(binary), f"--model-repository={repository}", f"--backend-directory={backends}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
           "--allow-gpu-metrics=false", f"--exit-timeout-secs={exit_timeout_s}", *(extra or [])]
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
