"""SmallCNN, the heads and MultiTaskModel."""

from __future__ import annotations

import pytest
import torch

from mtlcore import Task
from mtlcore.models import SmallCNN
from mtlcore.nn import Conv2dAct, DenseHead, LinearHead, MLPHead, MultiTaskLoss, MultiTaskModel


def test_small_cnn_shapes_and_fused_layers(device):
    trunk = SmallCNN(3, 32).to(device)
    x = torch.randn(5, 3, 32, 32, device=device)
    assert trunk(x).shape == (5, 128)
    fmap, vec = trunk.features(x)
    assert fmap.shape == (5, 64, 8, 8) and torch.equal(vec, trunk(x))
    assert isinstance(trunk.conv1, Conv2dAct) and isinstance(trunk.conv2, Conv2dAct)
    with pytest.raises(ValueError, match="multiple of 4"):
        SmallCNN(3, 30)


def test_fused_and_plain_small_cnn_agree(device):
    """fused=False builds the same network from nn.Conv2d + relu with the same parameter names."""
    torch.manual_seed(0)
    fused = SmallCNN(1, 28).to(device)
    plain = SmallCNN(1, 28, fused=False).to(device)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 1, 28, 28, device=device)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_multitask_model_with_every_head_kind(device):
    trunk = SmallCNN(3, 16)
    heads = {
        "cls": LinearHead(128, 10),
        "attr": MLPHead(128, 4, hidden=16),
        "mask": DenseHead(trunk.map_channels, 3, 16),
    }
    model = MultiTaskModel(trunk, heads).to(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    assert out["cls"].shape == (2, 10) and out["attr"].shape == (2, 4)
    assert out["mask"].shape == (2, 3, 16, 16)
    loss = MultiTaskLoss(
        [Task("cls", "ce", 10), Task("attr", "bce", 4), Task("mask", "ce", 3, dense=True)]
    ).to(device)
    targets = {
        "cls": torch.randint(10, (2,), device=device),
        "attr": torch.rand(2, 4, device=device),
        "mask": torch.randint(3, (2, 16, 16), device=device),
    }
    total, parts = loss(out, targets)
    total.backward()
    assert set(parts) == {"cls", "attr", "mask"}
    assert all(p.grad is not None for p in model.parameters())
    assert len(model.shared_parameters()) == len(list(trunk.parameters()))


def test_single_head_is_the_baseline_and_bad_models_are_refused():
    model = MultiTaskModel(SmallCNN(3, 16), {"cls": LinearHead(128, 10)})
    assert set(model(torch.randn(1, 3, 16, 16))) == {"cls"}
    with pytest.raises(ValueError, match="at least one head"):
        MultiTaskModel(SmallCNN(3, 16), {})
    with pytest.raises(ValueError, match="need a feature map"):
        MultiTaskModel(torch.nn.Flatten(), {"mask": DenseHead(64, 3, 16)})


def test_torch_export_with_a_dynamic_batch(device, tmp_path):
    """A fused multi-task model (conv2d_act, max_pool2d, a dense head) exports with
    torch.export and a symbolic batch size: the graph holds our ops, the exported program
    gives the eager outputs bitwise at other batch sizes, and it survives a save / load."""
    torch.manual_seed(0)
    trunk = SmallCNN(3, 16)
    heads = {"kind": LinearHead(128, 3), "mask": DenseHead(trunk.map_channels, 2, 16)}
    model = MultiTaskModel(trunk, heads).to(device).eval()
    batch = torch.export.Dim("batch", min=1, max=512)
    example = torch.randn(5, 3, 16, 16, device=device)
    exported = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    code = exported.graph_module.code
    assert "mtlcore.conv2d_act" in code and "mtlcore.max_pool2d" in code
    torch.export.save(exported, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    for n in (1, 7, 33):
        x = torch.randn(n, 3, 16, 16, device=device)
        with torch.no_grad():
            want = model(x)
            for program in (exported, loaded):
                got = program.module()(x)
                assert got.keys() == want.keys()
                for name in want:
                    assert torch.equal(got[name], want[name]), (n, name)
