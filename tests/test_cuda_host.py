"""CUDA kernel code run on the host, so that CI (which has nvcc but no GPU) exercises its index
arithmetic. Each program in tests/host/ is built against the real headers under csrc/cuda/ and
run; its header says what it checks:
- mta_host.cu (nvcc, host code): the multi-tensor apply's packing, chunk lookup and per-thread
  element walk over every (block, thread) of each launch: every element visited once, nothing
  else touched;
- optim_host.cu (nvcc, host code): the fused SGD and Adam element functors, unmodified, over
  random groups walked by every (block, thread) as the multi-tensor apply kernel walks them,
  against torch.optim's algorithms written out, bit for bit;
- max_pool2d_host.cu (nvcc, host code): the max_pool2d kernels' per-element forward and
  backward against a brute-force pooling, bit for bit;
- conv2d_act_host.cpp (g++ with AddressSanitizer and UBSan, the toolkit's headers): the
  convolution's tiled implicit GEMM, unmodified, through the block emulator of
  tests/host/cuda_emu.h, with all five tile maths (wmma included) and the depthwise element
  functions, against a naive convolution, bit for bit;
- multitask_loss_host.cpp (g++ with AddressSanitizer and UBSan, through the same emulator): the
  loss kernels of multitask_loss_kernels.cuh, unmodified, on the work lists it plans (every
  work mode, four dtypes, strided views with poisoned gaps, labels out of range), the finalize,
  backward-scaling and coupling-gradient kernels, against a float64 reference.
The two emulated programs also run under ThreadSanitizer, on fewer cases: a missing barrier is
a data race between the emulated threads.
They need nvcc (and its toolkit's headers; the multi-tensor apply also the CUDA library headers
ATen's CUDA headers include, which torch's CUDA wheel ships); they skip without them. No GPU is
needed."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "host"
CSRC = ROOT / "csrc"

# program, the header it tests, how it is built ("nvcc": host code through nvcc, "g++": the
# emulator), whether it includes ATen's CUDA headers (cusparse.h, ...), the line it prints
# last when every check passed.
PROGRAMS = [
    ("mta_host.cu", "multi_tensor_apply.cuh", "nvcc", True, "mta host: ok"),
    ("optim_host.cu", "optim_ops.cuh", "nvcc", True, "optim host: ok"),
    ("max_pool2d_host.cu", "max_pool2d_elements.cuh", "nvcc", False, "max_pool2d host: ok"),
    ("conv2d_act_host.cpp", "conv2d_act_gemm.cuh", "g++", False, "conv2d_act host: ok"),
    (
        "multitask_loss_host.cpp",
        "multitask_loss_kernels.cuh",
        "g++",
        False,
        "multitask_loss host: ok",
    ),
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


@functools.cache
def _toolkit_includes(nvcc: str) -> list[Path]:
    """The include folders nvcc itself passes to the host compiler (from ``nvcc --dryrun``)."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    folders: list[Path] = []
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith(("#$ INCLUDES=", "#$ SYSTEM_INCLUDES=")):
            words = shlex.split(line.split("=", 1)[1])
            folders += [Path(w[2:] if w.startswith("-I") else w) for w in words if w != "-isystem"]
    return [f.resolve() for f in folders if f.is_dir()]


def _cuda_library_includes(nvcc: str) -> list[Path]:
    """Folders that hold the CUDA library headers (cusparse.h, ...): torch's CUDA wheel's
    nvidia/*/include (as CMakeLists.txt adds them), then the toolkit's own."""
    site = Path(torch.__file__).resolve().parent.parent
    folders = [*sorted(site.glob("nvidia/*/include")), *_toolkit_includes(nvcc)]
    return [f for f in folders if (f / "cusparse.h").is_file()]


# Sanitizers of the g++ builds: AddressSanitizer and UBSan for every emulated program, and a
# second build of each under ThreadSanitizer (below).
ASAN_UBSAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
TSAN = ["-fsanitize=thread"]


def _sanitizers_link(cxx: str, folder: Path, flags: list[str]) -> bool:
    """Whether cxx builds a program with the sanitizer flags (their runtimes exist)."""
    if shutil.which(cxx) is None:
        return False
    probe = folder / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    built = subprocess.run(
        [cxx, *flags, str(probe), "-o", str(folder / "probe")],
        capture_output=True,
        timeout=120,
    )
    return built.returncode == 0


def _build_command(
    program: str, compiler: str, nvcc: str, binary: Path, sanitizers: list[str] = ASAN_UBSAN
) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    lib = torch_dir / "lib"
    torch_includes = [
        "-isystem",
        str(torch_dir / "include"),
        "-isystem",
        str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
    ]
    if compiler == "nvcc":
        cmd = [nvcc, "-std=c++20", "-O2", "--expt-relaxed-constexpr", "-I", str(CSRC)]
        cmd += torch_includes
        cmd += [f"-Xcompiler=-idirafter,{f}" for f in _cuda_library_includes(nvcc)]
        return [*cmd, str(HOST / program), "-o", str(binary), f"-L{lib}", "-lc10",
                f"-Xlinker=-rpath,{lib}"]  # fmt: skip
    toolkit = [w for f in _toolkit_includes(nvcc) for w in ("-isystem", str(f))]
    cxx = os.environ.get("CXX", "g++")
    return [
        cxx, "-std=c++20", "-O1", *sanitizers,
        "-pthread", "-I", str(CSRC), "-I", str(HOST), *toolkit, *torch_includes,
        str(HOST / program), "-o", str(binary), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _build_and_run(
    folder: Path,
    program: str,
    header: str,
    compiler: str,
    needs_cuda_libraries: bool,
    ok_line: str,
    sanitizers: list[str] = ASAN_UBSAN,
    args: tuple[str, ...] = (),
) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    if not (CSRC / "cuda" / header).is_file():
        pytest.skip("the C++ sources are not next to the tests")
    if needs_cuda_libraries and not _cuda_library_includes(nvcc):
        pytest.skip("no cusparse.h: this torch or toolkit lacks the CUDA library headers")
    if compiler == "g++" and not _sanitizers_link(os.environ.get("CXX", "g++"), folder, sanitizers):
        pytest.skip(f"no host C++ compiler that links {' '.join(sanitizers)}")
    binary = folder / Path(program).stem
    built = subprocess.run(
        _build_command(program, compiler, nvcc, binary, sanitizers),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, f"the build failed:\n{built.stderr[-4000:]}"
    # Any sanitizer report ends the run with an error (ThreadSanitizer: exit code 66); no leak
    # check (the emulator keeps its block threads until exit).
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
        "TSAN_OPTIONS": "halt_on_error=1",
    }
    env.pop("LD_PRELOAD", None)
    ran = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=900, env=env)
    assert ran.returncode == 0, f"exit {ran.returncode}:\n{ran.stdout[-4000:]}{ran.stderr[-4000:]}"
    assert ran.stdout.rstrip().endswith(ok_line), ran.stdout


@pytest.mark.parametrize(
    ("program", "header", "compiler", "needs_cuda_libraries", "ok_line"),
    PROGRAMS,
    ids=[p[0] for p in PROGRAMS],
)
def test_cuda_code_on_the_host(tmp_path, program, header, compiler, needs_cuda_libraries, ok_line):
    _build_and_run(tmp_path, program, header, compiler, needs_cuda_libraries, ok_line)


# The emulated kernels again under ThreadSanitizer, on fewer cases (the argument each program
# takes for that): a __syncthreads missing between one thread's write of shared memory and
# another's read (or the reverse) is a data race between the block's std::threads. Checked
# that it can fail: without the barrier that ends a step of the conv's tile loop, either of the
# loss's block_allreduce barriers around its result, or the finalize kernel's before it reads
# task_loss, the run reports a race.
TSAN_SIZE = {"conv2d_act_host.cpp": "0", "multitask_loss_host.cpp": "quick"}
EMULATED = [p for p in PROGRAMS if p[2] == "g++"]


@pytest.mark.parametrize(
    ("program", "header", "compiler", "needs_cuda_libraries", "ok_line"),
    EMULATED,
    ids=[p[0] for p in EMULATED],
)
def test_emulated_kernels_have_no_data_race(
    tmp_path, program, header, compiler, needs_cuda_libraries, ok_line
):
    _build_and_run(
        tmp_path,
        program,
        header,
        compiler,
        needs_cuda_libraries,
        ok_line,
        TSAN,
        (TSAN_SIZE[program],),
    )
