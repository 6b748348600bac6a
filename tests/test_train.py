"""Trainer: learning on Shapes, evaluation, history files, atomic checkpoints and resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mtlcore import Task
from mtlcore.data import Shapes
from mtlcore.models import SmallCNN
from mtlcore.nn import DenseHead, LinearHead, MultiTaskModel
from mtlcore.train import Trainer, load_checkpoint, save_checkpoint

TASKS = [Task("shape", "ce", 3), Task("colour", "ce", 4), Task("size", "mse", 1)]


def make_trainer(device="cpu", seed=0, **kwargs) -> Trainer:
    torch.manual_seed(seed)
    model = MultiTaskModel(SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in TASKS})
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return Trainer(model, TASKS, opt, device=device, batch_size=32, seed=seed, **kwargs)


def test_fit_learns_and_evaluates(device, tmp_path):
    train, test = Shapes(384, image_size=16, seed=0), Shapes(128, "test", image_size=16)
    trainer = make_trainer(device, out_dir=tmp_path)
    before = trainer.evaluate(test)
    history = trainer.fit(train, epochs=3, val=test)
    after = trainer.evaluate(test)
    assert len(history) == 3 and history[-1]["epoch"] == 3
    assert history[-1]["train_loss/total"] < history[0]["train_loss/total"]
    assert after["colour"]["accuracy"] > max(
        0.4, before["colour"]["accuracy"] + 0.15
    )  # chance: 0.25
    assert after["size"]["rmse"] < before["size"]["rmse"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "history.json").read_text())
    assert rows == history and (tmp_path / "history.csv").read_text().startswith("epoch,")
    preds = trainer.predict(test)
    assert preds["shape"].shape == (128, 3) and preds["size"].shape == (128, 1)
    gain = trainer.evaluate(test, baselines=after)["multitask_gain"]["delta_m"]
    assert gain == pytest.approx(0.0, abs=1e-9)


def test_missing_labels_train(device):
    train = Shapes(128, image_size=16, seed=2, missing=0.5)
    trainer = make_trainer(device)
    history = trainer.fit(train, epochs=1)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())


def test_resume_reaches_the_same_parameters(tmp_path):
    train = Shapes(96, image_size=16, seed=1)
    straight = make_trainer(seed=3)
    straight.fit(train, epochs=2)

    first = make_trainer(seed=3, out_dir=tmp_path)
    first.fit(train, epochs=1)
    resumed = make_trainer(seed=99)  # other initial weights: all must come from the checkpoint
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 1
    resumed.fit(train, epochs=2)
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert resumed.history == straight.history


def test_compiled_training_matches_eager_and_checkpoints_stay_plain(tmp_path):
    """Trainer(compile=...) trains through torch.compile (the fused ops traced into the graph,
    a last partial batch included) to the losses and parameters of eager training; a model
    the caller compiled trains the same way, and its checkpoint holds the plain module's
    keys, so it loads into an uncompiled model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    train = Shapes(100, image_size=16, seed=1)  # batches of 32, 32, 32 and 4
    eager = make_trainer(seed=4)
    eager.fit(train, epochs=2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = make_trainer(seed=4, compile={"backend": counter})
    compiled.fit(train, epochs=2)
    assert counter.frame_count >= 1  # it did train through a compiled graph

    torch.manual_seed(4)
    model = MultiTaskModel(SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in TASKS})
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    wrapped = torch.compile(model, backend="aot_eager")
    by_caller = Trainer(wrapped, TASKS, opt, batch_size=32, seed=4, out_dir=tmp_path)
    by_caller.fit(train, epochs=2)
    assert by_caller.model is model

    for trainer in (compiled, by_caller):
        for got, want in zip(trainer.history, eager.history, strict=True):
            assert got.keys() == want.keys()
            for key in got:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        for (name, got), (name_e, want) in zip(
            trainer.model.state_dict().items(), eager.model.state_dict().items(), strict=True
        ):
            assert name == name_e
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    plain = MultiTaskModel(SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in TASKS})
    plain.load_state_dict(state["model"])
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        make_trainer(compile="inductor")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_save_removes_what_killed_saves_left(tmp_path):
    """Temporary files of a dead writer on this host go at the next save; those of a running
    process, of another host, or of another name stay."""
    path = tmp_path / "ck.pt"
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".ck.pt.{host}.{dead_pid}.abcd1234.tmp"
    running = tmp_path / f".ck.pt.{host}.{os.getppid()}.abcd1234.tmp"
    other_host = tmp_path / f".ck.pt.{host}x.{dead_pid}.abcd1234.tmp"
    old_style = tmp_path / ".ck.pt.abcd1234.tmp"
    other_name = tmp_path / f".other.pt.{host}.{dead_pid}.abcd1234.tmp"
    for p in (stale, running, other_host, old_style, other_name):
        p.write_bytes(b"partial")
    save_checkpoint({"step": 1}, path)
    assert not stale.exists()
    assert all(p.exists() for p in (running, other_host, old_style, other_name))
    assert load_checkpoint(path) == {"step": 1}


def test_autocast_bf16_on_cpu():
    trainer = make_trainer(autocast_dtype=torch.bfloat16)
    history = trainer.fit(Shapes(64, image_size=16), epochs=1)
    assert torch.isfinite(torch.tensor(history[0]["train_loss/total"]))


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.02), ("adam", 1e-3)])
def test_fused_training_matches_plain_pytorch_step_by_step(optimizer, lr):
    """The fused model (Conv2dAct, multitask_loss, mtlcore.optim) and its plain-PyTorch twin
    (nn.Conv2d + relu, F.cross_entropy, torch.optim fused) from the same weights give the same
    losses over 20 steps. They differ by rounding only; with Adam, whose update divides by the
    gradient's running RMS, those differences grow, hence its looser bound after step 10."""
    from mtlcore.train.plain import fused_step, plain_step, twin_models

    data = Shapes(16 * 20, image_size=16, seed=4)
    tasks = [t for t in data.tasks() if t.name in ("shape", "colour")]
    (fused, loss, fused_opt), (plain, plain_opt) = twin_models(tasks, 3, 16, lr, 0, optimizer)
    for step in range(20):
        x = data.images[16 * step : 16 * (step + 1)]
        y = {t.name: data.targets[t.name][16 * step : 16 * (step + 1)] for t in tasks}
        a = float(fused_step(fused, loss, fused_opt, x, y))
        b = float(plain_step(plain, plain_opt, tasks, x, y))
        bound = 1e-4 if optimizer == "sgd" or step < 10 else 1e-3
        assert abs(a - b) <= bound * abs(b), (step, a, b)


def test_equal_weighting_reproduces_summed_loss_training():
    from mtlcore.weighting import Equal

    train = Shapes(64, image_size=16, seed=6)
    plain, equal = make_trainer(seed=2), make_trainer(seed=2, weighting=Equal(len(TASKS)))
    plain.fit(train, epochs=1)
    equal.fit(train, epochs=1)
    for a, b in zip(plain.model.parameters(), equal.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_weighting_with_one_task_is_plain_training():
    """With one task every gradient-based strategy returns that task's gradient, so the
    representation-gradient step must train exactly like ordinary backpropagation."""
    from mtlcore.weighting import MGDA

    one = [TASKS[0]]

    def trainer(weighting):
        torch.manual_seed(0)
        model = MultiTaskModel(SmallCNN(3, 16), {"shape": LinearHead(128, 3)})
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return Trainer(model, one, opt, batch_size=16, weighting=weighting)

    a, b = trainer(None), trainer(MGDA(1))
    data = Shapes(48, image_size=16, seed=7)
    a.fit(data, epochs=1)
    b.fit(data, epochs=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "autocast",
    [None, torch.bfloat16, torch.float16],
    ids=["float32", "autocast-bf16", "autocast-fp16-gradscaler"],
)
@pytest.mark.parametrize(
    "name", ["uncertainty", "dwa", "rlw", "famo", "gradnorm", "pcgrad", "mgda", "cagrad"]
)
def test_every_weighting_trains(name, autocast):
    from mtlcore import weighting

    data = Shapes(64, image_size=16, seed=8)
    torch.manual_seed(0)
    model = MultiTaskModel(
        SmallCNN(3, 16), {"mask": DenseHead(64, 4, 16), "size": LinearHead(128, 1)}
    )
    tasks = [Task("mask", "ce", 4, dense=True), Task("size", "mse", 1)]
    strategy = weighting.get(name, 2)
    params = list(model.parameters()) + list(strategy.parameters())
    trainer = Trainer(
        model,
        tasks,
        torch.optim.Adam(params, lr=1e-3),
        batch_size=16,
        weighting=strategy,
        autocast_dtype=autocast,
        grad_scaler=torch.amp.GradScaler("cpu") if autocast == torch.float16 else None,
    )
    before = [p.detach().clone() for p in model.parameters()]
    history = trainer.fit(data, epochs=2)
    assert all(torch.isfinite(torch.tensor(v)) for row in history for v in row.values())
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_parameter_gradients_mode():
    """weighting_on="parameters": the strategy sees the full gradients of the shared
    parameters; with one task it trains like plain backpropagation."""
    from mtlcore.weighting import MGDA, PCGrad

    def trainer(weighting, tasks, on="parameters", **kwargs):
        torch.manual_seed(0)
        model = MultiTaskModel(
            SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in tasks}
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return Trainer(
            model, tasks, opt, batch_size=16, weighting=weighting, weighting_on=on, **kwargs
        )

    data = Shapes(48, image_size=16, seed=7)
    a, b = trainer(None, TASKS[:1]), trainer(MGDA(1), TASKS[:1])
    a.fit(data, epochs=1)
    b.fit(data, epochs=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    history = trainer(PCGrad(len(TASKS)), TASKS).fit(data, epochs=1)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    scaled = trainer(
        PCGrad(len(TASKS)),
        TASKS,
        autocast_dtype=torch.float16,
        grad_scaler=torch.amp.GradScaler("cpu"),
    )
    history = scaled.fit(data, epochs=1)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    with pytest.raises(ValueError, match="weighting_on must be"):
        trainer(None, TASKS, on="everything")
