"""model.teacher.masks_per_sample (data2vec 2.0's clone batch): the CNN and the EMA teacher
run once per utterance, the student's Transformer on M differently-masked copies, the
k-means labels and teacher targets repeated; M = 1 is the paper's forward, unchanged."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mt4ssl.config import load_config
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.targets import KMeansConfig
from mt4ssl.targets.teacher import instance_norm
from mt4ssl.train.config import PretrainConfig
from tests.conftest import small_model_config

B, S = 3, 32000
T = num_frames(S)


def model_and_batch(masks_per_sample: int = 1, **overrides):
    torch.manual_seed(0)
    cfg = small_model_config(channels=16, dim=32, classes=5, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                             **overrides)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, masks_per_sample=masks_per_sample))
    model = MT4SSL(cfg)
    for _ in range(3):  # a teacher that differs from the student
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.update_targets(0)
    wav = torch.randn(B, S)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[2, 24000:] = True
    labels = {"km": torch.randint(0, 5, (B, T))}
    return model, wav, pad, labels


def reference_loss(model: MT4SSL, wav, pad, labels, seed: int) -> torch.Tensor:
    """The paper's forward from the model's pieces: one mask per utterance."""
    torch.manual_seed(seed)
    features, frame_pad = model.features(wav, pad)
    mask = model.sample_mask(features, frame_pad)
    hidden = model.encoder(model.apply_mask(features, mask), frame_pad).x
    x = hidden[mask]
    ce = F.cross_entropy(model.targets["kmeans"].heads["km"](x), labels["km"][mask], reduction="sum")
    teacher = model.targets["teacher"]
    with torch.no_grad():
        out = teacher.ema(features.detach(), frame_pad)
        y = sum(instance_norm(f, frame_pad) for f in out.ffn_outputs[-2:]) / 2
    l2 = (teacher.head(x) - y[mask]).square().sum() * teacher.scale
    return ce + l2


def test_one_mask_per_sample_is_the_papers_forward_exactly():
    model, wav, pad, labels = model_and_batch(1)
    torch.manual_seed(7)
    out = model(wav, pad, labels=labels)
    assert torch.equal(out.loss, reference_loss(model, wav, pad, labels, seed=7))
    torch.manual_seed(7)  # the explicit argument: the same
    assert torch.equal(model(wav, pad, labels=labels, masks_per_sample=1).loss, out.loss)


def count_calls(module: torch.nn.Module, rows: list[int]):
    return module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))


def test_several_masks_per_sample_one_cnn_and_teacher_pass():
    M = 4
    model, wav, pad, labels = model_and_batch(M)
    cnn_rows, teacher_rows, student_rows = [], [], []
    hooks = [count_calls(model.feature_extractor, cnn_rows), count_calls(model.targets["teacher"].ema, teacher_rows),
             count_calls(model.encoder, student_rows)]
    torch.manual_seed(3)
    out = model(wav, pad, labels=labels)
    for h in hooks:
        h.remove()
    assert cnn_rows == [B] and teacher_rows == [B] and student_rows == [M * B]

    mask = out.mask
    assert mask.shape == (M * B, T)
    assert not mask[2 * M:, num_frames(24000):].any()  # the copies of utterance 2 keep out of its padding
    for b in range(B):
        copies = mask[b * M:(b + 1) * M]
        assert all(not torch.equal(copies[i], copies[j]) for i in range(M) for j in range(i))  # masks differ
    assert out.sample_size == mask.sum()  # every copy's masked frames count (data2vec 2.0's sample_size)

    # the loss of the M copies = the sum of M one-copy forwards, each with its copy's mask: the
    # same k-means labels and the same teacher targets for every copy of an utterance
    per_copy = [model(wav, pad, mask_indices=mask[m::M], labels=labels, masks_per_sample=1) for m in range(M)]
    torch.testing.assert_close(out.loss, sum(o.loss for o in per_copy), rtol=1e-5, atol=1e-4)
    for kind in ("kmeans", "teacher"):
        torch.testing.assert_close(out.losses[kind], sum(o.losses[kind] for o in per_copy), rtol=1e-5, atol=1e-4)
    assert out.sample_size == sum(o.sample_size for o in per_copy)

    out.loss.backward()  # gradient flows to the CNN, the student and both heads, not the teacher
    for name in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.0.fc1.weight",
                 "targets.kmeans.heads.km.weight", "targets.teacher.head.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.targets["teacher"].ema.parameters())


def test_unmasked_frames_of_every_copy_and_hubert_like():
    M = 2
    model, wav, pad, labels = model_and_batch(
        M, targets=("kmeans",), kmeans=KMeansConfig(labels=("km",), num_classes=(5,), unmasked_weight=1.0))
    torch.manual_seed(1)
    out = model(wav, pad, labels=labels)
    per_copy = [model(wav, pad, mask_indices=out.mask[m::M], labels=labels, masks_per_sample=1) for m in range(M)]
    torch.testing.assert_close(out.loss, sum(o.loss for o in per_copy), rtol=1e-5, atol=1e-4)


def test_given_masks_must_cover_every_copy():
    model, wav, pad, labels = model_and_batch(2)
    with pytest.raises(ValueError, match=r"2 masked copies x 3 utterances"):
        model(wav, pad, mask_indices=torch.zeros(B, T, dtype=torch.bool), labels=labels)


@pytest.mark.parametrize("value, message", [("0", "masks_per_sample 0 must be at least 1"),
                                            ("-2", "masks_per_sample -2 must be at least 1"),
                                            ("1.5", "model.teacher.masks_per_sample: expected int"),
                                            ("true", "model.teacher.masks_per_sample: expected int")])
def test_masks_per_sample_config_errors(value, message):
    with pytest.raises(InputError, match=message):
        load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "model.preset=tiny",
                                           f"model.teacher.masks_per_sample={value}"])
    cfg = load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "model.preset=tiny",
                                             "model.teacher.masks_per_sample=4"])
    assert cfg.model_config().teacher.masks_per_sample == 4
