"""CUDA kernel code run on the host, so that CI (which has nvcc but no GPU) exercises its index
arithmetic. nvcc compiles each program in tests/host/ as a host program against the real
headers under csrc/cuda/ (their functions are __host__ __device__) and runs it:
- mta_host.cu: the multi-tensor apply's packing, chunk lookup and per-thread element walk over
  every (block, thread) of each launch: every element visited once, nothing else touched;
- max_pool2d_host.cu: the max_pool2d kernels' per-element forward and backward against a
  brute-force pooling, bit for bit.
Each program's header says what it checks. Needs nvcc (and, for the multi-tensor apply, the
CUDA library headers ATen's CUDA headers include, which torch's CUDA wheel ships); skips
without them. No GPU is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "host"
CSRC = ROOT / "csrc"

# program, the header it tests, whether it includes ATen's CUDA headers (cusparse.h, ...),
# the line it prints last when every check passed.
PROGRAMS = [
    ("mta_host.cu", "multi_tensor_apply.cuh", True, "mta host: ok"),
    ("max_pool2d_host.cu", "max_pool2d_elements.cuh", False, "max_pool2d host: ok"),
]


def _nvcc() -> str | None:
    for candidate in (
        os.environ.get("CUDACXX"),
        os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _nvidia_includes(nvcc: str) -> list[Path]:
    """Folders that hold the CUDA library headers (cusparse.h, ...): torch's CUDA wheel's
    nvidia/*/include (as CMakeLists.txt adds them), then the toolkit's own."""
    site = Path(torch.__file__).resolve().parent.parent
    folders = sorted(site.glob("nvidia/*/include"))
    folders.append(Path(nvcc).resolve().parent.parent / "include")
    return [f for f in folders if (f / "cusparse.h").is_file()]


@pytest.mark.parametrize(
    ("program", "header", "needs_cuda_libraries", "ok_line"), PROGRAMS, ids=[p[0] for p in PROGRAMS]
)
def test_cuda_code_on_the_host(tmp_path, program, header, needs_cuda_libraries, ok_line):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    if not (CSRC / "cuda" / header).is_file():
        pytest.skip("the C++ sources are not next to the tests")
    includes = _nvidia_includes(nvcc) if needs_cuda_libraries else []
    if needs_cuda_libraries and not includes:
        pytest.skip("no cusparse.h: this torch or toolkit lacks the CUDA library headers")
    torch_dir = Path(torch.__file__).resolve().parent
    lib = torch_dir / "lib"
    binary = tmp_path / Path(program).stem
    cmd = [
        nvcc,
        "-std=c++20",
        "-O2",
        "--expt-relaxed-constexpr",
        "-I",
        str(CSRC),
        "-isystem",
        str(torch_dir / "include"),
        "-isystem",
        str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
        *(f"-Xcompiler=-idirafter,{folder}" for folder in includes),
        str(HOST / program),
        "-o",
        str(binary),
        f"-L{lib}",
        "-lc10",
        f"-Xlinker=-rpath,{lib}",
    ]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"nvcc failed:\n{built.stderr[-4000:]}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, f"exit {ran.returncode}:\n{ran.stdout[-4000:]}{ran.stderr[-2000:]}"
    assert ran.stdout.rstrip().endswith(ok_line), ran.stdout
