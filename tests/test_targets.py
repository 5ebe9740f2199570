"""Targets: EMA teacher schedule and bookkeeping, target construction, losses, collapse guard."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mt4ssl.models.cnn import num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.targets import (
    CollapseGuard,
    KMeansConfig,
    KMeansTarget,
    TargetBatch,
    TeacherConfig,
    TrainingCollapsed,
)
from mt4ssl.targets.teacher import ema_decay, instance_norm, mean_std
from tests.conftest import small_model_config


def small_model(**overrides) -> MT4SSL:
    return MT4SSL(small_model_config(channels=16, dim=32, classes=5, **overrides))


def reference_instance_norm(x: np.ndarray, lengths: list[int], eps: float = 1e-5) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    for b, n in enumerate(lengths):
        for c in range(x.shape[2]):
            v = x[b, :n, c].astype(np.float64)
            out[b, :n, c] = (v - v.mean()) / np.sqrt(v.var() + eps)
    return out


# ---------------------------------------------------------------------------- EMA teacher


def test_ema_decay_schedule():
    values = {n: ema_decay(n, 0.999, 0.9999, 30000) for n in (0, 15000, 30000, 60000)}
    assert values[0] == pytest.approx(0.999)
    assert values[15000] == pytest.approx(0.99945)
    assert values[30000] == pytest.approx(0.9999)
    assert values[60000] == pytest.approx(0.9999)


def test_ema_step_averages_layers_copies_pos_conv():
    torch.manual_seed(0)
    model = small_model()
    teacher = model.targets["teacher"]
    names = {name for name, _ in teacher.ema.named_parameters()}
    # a copy of the Transformer encoder only: the CNN / projection are shared, not copied
    assert all(n.startswith(("pos_conv.", "layer_norm.", "layers.")) for n in names)
    assert any(n.startswith("layer_norm.") for n in names)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in teacher.ema.parameters())
    model.train()
    assert not teacher.ema.training and model.encoder.training

    before = {n: p.detach().clone() for n, p in teacher.ema.named_parameters()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    student = dict(model.encoder.named_parameters())
    model.update_targets(15000)
    d = 0.99945
    for name, p in teacher.ema.named_parameters():
        if name.startswith("pos_conv."):
            torch.testing.assert_close(p, student[name].detach())
        else:
            torch.testing.assert_close(p, d * before[name] + (1 - d) * student[name].detach())
    assert teacher.decay == pytest.approx(d)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in teacher.ema.parameters())
    teacher.reset(model.encoder)  # e.g. after loading student-only weights
    for name, p in teacher.ema.named_parameters():
        torch.testing.assert_close(p, student[name].detach())


def test_instance_norm_against_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 4) * 3 + 1
    lengths = [11, 7, 4]
    pad = torch.arange(11)[None, :] >= torch.tensor(lengths)[:, None]
    ours = instance_norm(x, pad).numpy()
    ref = reference_instance_norm(x.numpy(), lengths)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert (ours[pad.numpy()] == 0).all()
    full = instance_norm(x).numpy()
    torch_ref = F.instance_norm(x.transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(full, torch_ref, atol=1e-5)


def test_teacher_targets_are_topk_average_of_ffn_outputs():
    torch.manual_seed(0)
    model = small_model().eval()
    teacher = model.targets["teacher"]
    features = torch.randn(2, 12, 32)
    lengths = [12, 8]
    pad = torch.arange(12)[None, :] >= torch.tensor(lengths)[:, None]
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 1:5] = True
    y = teacher.targets(TargetBatch(features=features, padding_mask=pad, mask=mask))

    # reference: run the teacher's layers by hand, FFN output before the residual add
    enc = teacher.ema
    with torch.no_grad():
        x = features.masked_fill(pad[..., None], 0.0)
        x = enc.layer_norm(x + enc.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        ffns = []
        for layer in enc.layers:
            x = layer.self_attn_layer_norm(x + layer.self_attn(x, ~pad[:, None, None, :]))
            ffn = layer.fc2(F.gelu(layer.fc1(x)))
            ffns.append(ffn)
            x = layer.final_layer_norm(x + ffn)
    ref = sum(reference_instance_norm(f.numpy(), lengths) for f in ffns[-2:]) / 2
    np.testing.assert_allclose(y.numpy(), ref[mask.numpy()], atol=1e-5)


# ---------------------------------------------------------------------------- losses


def test_kmeans_cross_entropy_sum():
    target = KMeansTarget(4, KMeansConfig(labels=("a", "b"), num_classes=(2, 3)))
    with torch.no_grad():
        for head in target.heads.values():
            head.weight.zero_()
        target.heads["a"].bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # p = (3/4, 1/4)
        target.heads["b"].bias.zero_()  # uniform over 3
    mask = torch.tensor([[True, True, False, True]])
    labels = {"a": torch.tensor([[0, 1, 1, 1]]), "b": torch.tensor([[2, 0, 0, 1]])}
    x = torch.randn(3, 4)
    loss, logs = target.loss(
        x, TargetBatch(features=torch.zeros(1, 4, 4), padding_mask=None, mask=mask, labels=labels)
    )
    expected_a = -math.log(3 / 4) - 2 * math.log(1 / 4)
    expected_b = 3 * math.log(3)
    assert logs["loss_a"].item() == pytest.approx(expected_a, rel=1e-5)
    assert logs["loss_b"].item() == pytest.approx(expected_b, rel=1e-5)
    assert loss.item() == pytest.approx(expected_a + expected_b, rel=1e-5)
    assert logs["acc_a"].item() == pytest.approx(1 / 3)


def test_kmeans_unmasked_weight_adds_the_unmasked_frames():
    """HuBERT's pred_nomask_weight: w x CE over the frames neither masked nor padding."""
    cfg = KMeansConfig(labels=("a",), num_classes=(2,), unmasked_weight=0.5)
    target = KMeansTarget(4, cfg)
    with torch.no_grad():
        target.heads["a"].weight.zero_()
        target.heads["a"].bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # p = (3/4, 1/4)
    mask = torch.tensor([[True, False, False, False]])
    padding = torch.tensor([[False, False, False, True]])  # frame 3 is padding: never counted
    labels = {"a": torch.tensor([[0, 1, 0, 1]])}
    batch = TargetBatch(features=torch.zeros(1, 4, 4), padding_mask=padding, mask=mask, labels=labels,
                        hidden=torch.randn(1, 4, 4))
    loss, logs = target.loss(torch.randn(1, 4), batch)
    masked = -math.log(3 / 4)
    unmasked = -math.log(1 / 4) - math.log(3 / 4)  # frames 1 and 2
    assert logs["loss_a"].item() == pytest.approx(masked, rel=1e-5)  # the log stays masked-only
    assert loss.item() == pytest.approx(masked + 0.5 * unmasked, rel=1e-5)
    batch.hidden = None
    with pytest.raises(ValueError, match="needs the student output at every frame"):
        target.loss(torch.randn(1, 4), batch)
    with pytest.raises(ValueError, match="unmasked_weight -1 must be >= 0"):
        KMeansConfig(unmasked_weight=-1)


def test_kmeans_label_errors():
    target = KMeansTarget(4, KMeansConfig(labels=("a",), num_classes=(2,)))
    mask = torch.ones(1, 3, dtype=torch.bool)
    batch = TargetBatch(features=torch.zeros(1, 3, 4), padding_mask=None, mask=mask, labels={})
    with pytest.raises(ValueError, match="needs labels 'a'"):
        target.loss(torch.zeros(3, 4), batch)
    batch.labels = {"a": torch.zeros(1, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="one label per 20 ms frame"):
        target.loss(torch.zeros(3, 4), batch)


def test_regression_loss_l2_over_sqrt_dim():
    torch.manual_seed(0)
    model = small_model(embed_dim=4, num_heads=2, pos_conv_groups=2)
    teacher = model.targets["teacher"]
    with torch.no_grad():
        teacher.head.weight.copy_(torch.eye(4))
        teacher.head.bias.zero_()
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    teacher.targets = lambda batch: y  # fixed targets for a hand computation
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 3.0, 1.0, 1.0]])
    batch = TargetBatch(
        features=torch.zeros(1, 2, 4), padding_mask=None, mask=torch.ones(1, 2, dtype=torch.bool)
    )
    loss, logs = teacher.loss(x, batch)
    assert loss.item() == pytest.approx((1.0 + 4.0) / math.sqrt(4))
    assert set(logs) == {"target_std", "pred_std"}


def test_mean_std():
    y = torch.randn(50, 6) * torch.arange(1, 7)
    assert mean_std(y).item() == pytest.approx(torch.sqrt(y.var(dim=0) + 1e-6).mean().item(), rel=1e-5)


def test_total_loss_is_weighted_sum():
    torch.manual_seed(0)
    model = small_model(
        kmeans=KMeansConfig(weight=2.0, labels=("km",), num_classes=(5,)),
        teacher=TeacherConfig(weight=0.5, top_k=2),
    )
    wav = torch.randn(2, 6400)
    out = model(wav, labels={"km": torch.randint(0, 5, (2, num_frames(6400)))})
    expected = 2.0 * out.losses["kmeans"] + 0.5 * out.losses["teacher"]
    torch.testing.assert_close(out.loss, expected)
    assert out.sample_size.item() == out.mask.sum().item() > 0


# ---------------------------------------------------------------------------- collapse guard


def test_collapse_guard():
    guard = CollapseGuard(min_target_std=0.1, min_pred_std=0.01, after_updates=5000)
    collapsed = {"target_std": torch.tensor(0.05), "pred_std": torch.tensor(0.5)}
    guard.check(collapsed, 5000)  # not yet checked
    with pytest.raises(TrainingCollapsed, match="target_std = 0.05 < 0.1"):
        guard.check(collapsed, 5001)
    with pytest.raises(TrainingCollapsed, match="pred_std"):
        guard.check({"target_std": 1.0, "pred_std": 0.001}, 9000)
    guard.check({"target_std": 1.0, "pred_std": 0.5}, 9000)
    guard.check({"acc_hubert500": 0.3}, 9000)  # no teacher target: nothing to check
