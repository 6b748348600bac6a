"""The installed package: build information, the command line, the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import mtlcore
from mtlcore.demo import train_demo


def test_build_info_reports_how_it_was_built():
    info = mtlcore.build_info()
    for key in ("version", "torch", "cuda", "cuda_archs", "cpu_isa", "openmp", "threads"):
        assert key in info
    assert info["version"] == mtlcore.__version__
    assert info["cpu_isa"] in ("base", "avx2", "avx512")
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cuda_archs"], list)
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["openmp"] is True  # at::parallel_for needs it to use more than one thread


def test_ops_are_registered_for_the_built_devices():
    for op in (torch.ops.mtlcore.sgd_, torch.ops.mtlcore.adam_):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA")
        assert has_cuda == mtlcore.build_info()["cuda"]


def test_cli_info_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "mtlcore", "info"], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out)["version"] == mtlcore.__version__


def test_cli_demo_loss_falls():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlcore",
            "demo",
            "--steps",
            "40",
            "--device",
            "cpu",
            "--optimizer",
            "sgd",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout


def test_demo_trains_with_each_optimizer():
    for name in ("sgd", "adam", "adamw"):
        losses = train_demo(steps=60, optimizer=name, device=torch.device("cpu"))
        assert losses[-1] < 0.5 * losses[0], name


def test_cli_train_on_shapes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlcore",
            "train",
            "--data",
            "shapes",
            "--epochs",
            "1",
            "--samples",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--compare-plain",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for task in ("shape", "colour", "size", "position", "outline", "mask"):
        assert task in proc.stdout
    assert "plain PyTorch" in proc.stdout
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "history.csv").is_file()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlcore",
            "evaluate",
            "--checkpoint",
            str(tmp_path / "checkpoint.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mask" in proc.stdout and "mean_iou" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "mtlcore", "evaluate", "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--epochs", "0"],
        ["--data", "imagenet"],
        ["--optimizer", "lbfgs"],
        ["--data", "cifar10"],
        ["--resume"],  # needs --out
        ["--autocast", "float8"],
    ],
)
def test_cli_train_bad_arguments_exit_2_without_traceback(args):
    """Argument errors: a one-line message, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "mtlcore", "train", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip()


def test_cli_weighting_names_are_the_strategies():
    from mtlcore import cli, weighting

    assert set(cli.STRATEGY_NAMES) == set(weighting.STRATEGIES) - {"fixed"}


@pytest.mark.parametrize("autocast", [[], ["--autocast", "bfloat16"]], ids=["fp32", "bf16"])
def test_cli_train_with_a_weighting(autocast):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlcore",
            "train",
            "--data",
            "shapes",
            "--samples",
            "32",
            "--epochs",
            "1",
            "--weighting",
            "pcgrad",
            "--no-progress",
            *autocast,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mask" in proc.stdout


def test_cli_train_compiled_writes_a_plain_checkpoint(tmp_path):
    """`train --compile` trains through torch.compile (inductor, mtlcore's ops in the graph);
    its checkpoint holds the plain model, which `evaluate` rebuilds to the same metrics."""
    out = tmp_path / "run"
    train = [sys.executable, "-m", "mtlcore", "train", "--data", "shapes", "--samples", "48"]
    proc = subprocess.run(
        [*train, "--epochs", "1", "--compile", "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluate = [sys.executable, "-m", "mtlcore", "evaluate", "--checkpoint"]
    proc2 = subprocess.run([*evaluate, str(out / "checkpoint.pt")], capture_output=True, text=True)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    metrics = [line for line in proc.stdout.splitlines() if "accuracy" in line]
    assert metrics and all(line in proc2.stdout for line in metrics)
