import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VIDITQ_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA, Triton kernels are tested in the CPU interpreter; the flag must be set before triton is imported
# anywhere (diffusers may import it), and the interpreter needs a NumPy >= 2.4 work-around.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from viditq.kernels.triton_compat import patch_interpreter

        patch_interpreter()
    except ImportError:  # triton not installed: kernel tests skip themselves
        pass

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def sm90_compile():
    """``sm90_compile(which)``: runs ``tests/sm90_compile.py which`` (the Gluon kernels compiled for sm_90 without a
    GPU) in a subprocess — Triton's active driver is swapped there, and the compile must not see
    ``TRITON_INTERPRET`` — and returns what it prints (JSON)."""
    import viditq

    def run(which: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(viditq.__file__).parents[1]), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py")), which], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script(name)``: ``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
