"""Pretraining: config errors, schedules, gradient accumulation and DDP equivalence, exact
resume after a signal, atomic checkpoints under SIGKILL, fp16 overflow skipping, the
collapse guard, validation with fixed masks and checkpoint_best."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mt4ssl.cli import main
from mt4ssl.config import load_config
from mt4ssl.data.dataset import collate
from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import write_state
from mt4ssl.models.cnn import num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.targets import TrainingCollapsed
from mt4ssl.train import distributed, pretrain
from mt4ssl.train.checkpoint import CheckpointDir
from mt4ssl.train.config import OptimConfig, PretrainConfig
from mt4ssl.train.schedule import lr_multiplier
from tests.conftest import write_tree
from tools import plot_curves
from tools.demo_table import read_log

SMALL_MODEL = [
    "model.preset=tiny", "model.embed_dim=32", "model.ffn_dim=64", "model.num_heads=4",
    "model.num_layers=2", "model.pos_conv_groups=4", "model.teacher.top_k=2",
    "model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
    "model.dropout=0.0", "model.attention_dropout=0.0", "model.layerdrop=0.0",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Manifests (train, valid) + 50 Hz MFCC k-means labels of a small generated tree."""
    root = tmp_path_factory.mktemp("train")
    write_tree(root / "libri", {"train": [32001, 40007, 48319, 35555, 57603, 33333, 36000, 41000],
                                "valid": [33001, 45007, 38319, 20000]})  # 20000: shorter than min_samples
    m, f, lab = root / "m", root / "f", root / "lab"
    assert main(["manifest", str(root / "libri"), "--out", str(m)]) == 0
    for split in ("train", "valid"):
        assert main(["features", "mfcc", str(m), split, str(f)]) == 0
    assert main(["kmeans", str(f), "train", str(lab / "km.npz"), "-k", "8", "--fraction", "1"]) == 0
    for split in ("train", "valid"):
        assert main(["labels", str(f), split, str(lab / "km.npz"), "--manifest-dir", str(m), "--out", str(lab)]) == 0
    return root


def make_cfg(prepared: Path, out: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"data.manifest_dir={prepared / 'm'}", f"data.labels={{km: {prepared / 'lab'}}}",
        "data.max_tokens=100000", "data.num_workers=0", f"run.out_dir={out}", "run.max_updates=6",
        "run.log_interval=1", "run.save_interval=100", "run.device=cpu", "optim.lr=1e-3",
        "optim.phase_ratio=[0.5,0.3,0.2]", *SMALL_MODEL, *overrides])


# ---------------------------------------------------------------------------- config


def test_config_errors_name_the_key_and_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {manifest_dir: m}\nrun: {out_dir: o, max_updatez: 3}\n")
    assert main(["pretrain", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml.run: unknown key(s) ['max_updatez']" in err and "max_updates" in err
    with pytest.raises(InputError, match=r"run\.precision: 'fp8' is not one of"):
        load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "run.precision=fp8"])
    with pytest.raises(InputError, match=r"missing required key\(s\) \['data'\]"):
        load_config(PretrainConfig, None, ["run.out_dir=o"])
    with pytest.raises(InputError, match=r"optim\.lr: expected float, got 'fast'"):
        load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "optim.lr=fast"])
    with pytest.raises(InputError, match=r"model\.teacher: unknown key\(s\) \['topk'\]"):
        load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "model.teacher.topk=2"])
    with pytest.raises(InputError, match="expected key=value"):
        load_config(PretrainConfig, None, ["run.out_dir"])


def test_tri_stage_schedule_matches_fairseq_formula():
    f = lr_multiplier(OptimConfig(phase_ratio=(0.1, 0.5, 0.4), init_lr_scale=0.01, final_lr_scale=0.05), 1000)
    assert f(0) == pytest.approx(0.01)
    assert f(50) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == f(599) == 1.0
    assert f(800) == pytest.approx(math.exp(math.log(0.05) * 200 / 400))
    assert f(1000) == pytest.approx(0.05) and f(5000) == pytest.approx(0.05)
    cos = lr_multiplier(OptimConfig(schedule="cosine", warmup_ratio=0.1, final_lr_scale=0.0), 100)
    assert cos(5) == pytest.approx(0.5) and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)


# ---------------------------------------------------------------------------- equivalence


def fixed_batches(trainer, ids: list[int], per_batch: int) -> list[dict]:
    """Items cropped to one length, with fixed masks, split into batches of `per_batch`."""
    items = [trainer.dataset[i] for i in ids]
    n = min(len(it["wav"]) for it in items)
    items = [{"id": it["id"], "wav": it["wav"][:n],
              "labels": {k: v[:num_frames(n)] for k, v in it["labels"].items()}} for it in items]
    whole = collate(items, mode="crop")
    with torch.no_grad():
        feats, _ = trainer.model.features(whole["wav"])
    torch.manual_seed(123)
    masks = trainer.model.sample_mask(feats, None)
    return [dict(collate(items[s:s + per_batch], mode="crop"), mask=masks[s:s + per_batch])
            for s in range(0, len(items), per_batch)]


def grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_one_big_batch(prepared, tmp_path):
    d = distributed.Dist()
    one = pretrain.Trainer(make_cfg(prepared, tmp_path / "a"), d)
    two = pretrain.Trainer(make_cfg(prepared, tmp_path / "b", "run.update_freq=2"), d)
    big = one.accumulate(fixed_batches(one, [0, 1, 2, 3], 4))
    small = two.accumulate(fixed_batches(two, [0, 1, 2, 3], 2))
    assert big["sample_size"] == small["sample_size"] > 0
    assert big["loss"] == pytest.approx(small["loss"], rel=1e-5)
    g1, g2 = grads(one), grads(two)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def ema_by_hand(teacher: dict, student: dict, d: float, steps: int) -> dict:
    """`steps` EMA steps of the teacher towards one student, in float64 (pos_conv is copied)."""
    out = {}
    for name, t in teacher.items():
        x, s = t.double(), student[name].double()
        for _ in range(steps):
            x = s if name.startswith("pos_conv.") else d * x + (1 - d) * s
        out[name] = x
    return out


def teacher_params(teacher) -> dict:
    return {n: p.detach().double().clone() for n, p in teacher.ema.named_parameters()}


@pytest.mark.parametrize("per_micro_batch", [False, True])
def test_ema_steps_once_per_update_or_before_every_micro_batch(prepared, tmp_path, monkeypatch, per_micro_batch):
    """Default: one EMA step after each update, towards the updated student, however the batch
    is split. fairseq's order (model.teacher.ema_per_micro_batch): a step before every
    micro-batch's forward, towards the student as it is, so micro-batch j of an update uses the
    teacher after j steps. Checked against the EMA formula applied by hand."""
    k = 3
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "ema", f"run.update_freq={k}",
                                        f"model.teacher.ema_per_micro_batch={str(per_micro_batch).lower()}",
                                        "model.teacher.ema_decay=0.9", "model.teacher.ema_end_decay=0.99",
                                        "model.teacher.ema_anneal_updates=10"), distributed.Dist())
    teacher = trainer.model.targets["teacher"]
    with torch.no_grad():  # a teacher away from the student, so that each EMA step shows
        for p in teacher.ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    seen, targets = [], teacher.targets  # the teacher each micro-batch's targets came from
    monkeypatch.setattr(teacher, "targets", lambda batch: seen.append(teacher_params(teacher)) or targets(batch))
    before, student0 = teacher_params(teacher), {n: p.detach().clone() for n, p in trainer.model.encoder.named_parameters()}
    trainer.train_step(fixed_batches(trainer, [0, 1, 2], 1))
    assert trainer.num_updates == 1 and len(seen) == k
    student1 = dict(trainer.model.encoder.named_parameters())
    d0, d1 = 0.9, 0.9 + (0.99 - 0.9) * 1 / 10  # the decay at updates 0 and 1
    if per_micro_batch:
        expected_seen = [ema_by_hand(before, student0, d0, j) for j in range(1, k + 1)]
        expected_after = expected_seen[-1]  # the steps towards student1 come with the next update's micro-batches
    else:
        expected_seen = [before] * k
        expected_after = ema_by_hand(before, {n: p.detach() for n, p in student1.items()}, d1, 1)
    for got, want in zip([*seen, teacher_params(teacher)], [*expected_seen, expected_after]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(not torch.allclose(before[n], expected_after[n]) for n in before)
    assert moved > 10


def test_normalize_before_crop_is_fairseqs_order(prepared, tmp_path):
    """data.normalize_before_crop: each file normalised over its whole length, then cropped,
    and the model does not normalise again; by default the model normalises the crop."""
    d = distributed.Dist()
    parity = pretrain.Trainer(make_cfg(prepared, tmp_path / "p", "data.normalize_before_crop=true",
                                       "data.max_samples=32000"), d)
    default = pretrain.Trainer(make_cfg(prepared, tmp_path / "d", "data.max_samples=32000"), d)
    ds = parity.dataset
    i = int(np.argmax(np.asarray(ds.manifest.sizes)[ds.indices]))  # the longest file: most of it cropped away
    full = torch.from_numpy(ds.manifest.read(int(ds.indices[i]))).double()
    assert len(full) > 50000 and len(ds[i]["wav"]) == 32000
    whole = ((full - full.mean()) / torch.sqrt(full.var(unbiased=False) + 1e-5))[:32000]
    torch.testing.assert_close(ds[i]["wav"].double(), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(default.dataset[i]["wav"].double(), full[:32000])  # raw samples
    assert not torch.allclose(F.layer_norm(full[:32000], (32000,)), whole, atol=1e-3)  # the two orders differ

    def loss(trainer, model=None):
        batch = fixed_batches(trainer, [i, 0, 1], 3)[0]
        torch.manual_seed(0)
        if model is None:
            return trainer.task.loss(trainer.model, batch)[0]
        return model(batch["wav"], None, mask_indices=batch["mask"], labels=batch["labels"]).loss

    plain = MT4SSL(dataclasses.replace(parity.model.cfg, normalize=False))  # reads its input as it is
    plain.load_state_dict(parity.model.state_dict())
    assert torch.equal(loss(parity), loss(parity, plain))
    default.model.load_state_dict(parity.model.state_dict())
    assert not torch.allclose(loss(default), loss(parity), rtol=1e-6)


def _ddp_worker(rank: int, prepared: str, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = distributed.setup("cpu")
    trainer = pretrain.Trainer(make_cfg(Path(prepared), Path(out) / "ddp"), d)
    valid = trainer.validate()  # each worker validates one of the two valid batches
    batches = fixed_batches(trainer, [0, 1, 2, 3], 2)
    stats = trainer.accumulate([batches[rank]])  # each worker holds half of the global batch
    torch.save({"grads": grads(trainer), "stats": stats, "valid": valid}, Path(out) / f"rank{rank}.pt")
    trainer.step(stats)
    torch.save({n: p.detach().clone() for n, p in trainer.model.state_dict().items()},
               Path(out) / f"params{rank}.pt")
    distributed.teardown(d)


def test_ddp_two_gloo_workers_equal_one_process(prepared, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(str(prepared), str(tmp_path), port), nprocs=2, join=True)
    single = pretrain.Trainer(make_cfg(prepared, tmp_path / "single"), distributed.Dist())
    assert len(single.valid_batches) == 2
    want_valid = single.validate()
    stats = single.accumulate(fixed_batches(single, [0, 1, 2, 3], 4))
    want = grads(single)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["valid"] == pytest.approx(want_valid, rel=1e-6)
        assert got["stats"]["sample_size"] == stats["sample_size"]
        for name, g in want.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    single.step(stats)
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=0, msg=name)  # ranks agree exactly
        torch.testing.assert_close(p0[name], value, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------- resume


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["update"]: r["loss"] for r in rows}


def signal_after(monkeypatch, update: int, sig=signal.SIGUSR1):
    """Make the trainer signal itself (as `scancel --signal=USR1` or a preemption would) after
    update `update`; returns the real train_step, to put back."""
    real_step = pretrain.Trainer.train_step

    def step_then_signal(self, batches):
        stats = real_step(self, batches)
        if self.num_updates == update:
            os.kill(os.getpid(), sig)
        return stats

    monkeypatch.setattr(pretrain.Trainer, "train_step", step_then_signal)
    return real_step


def test_interrupted_run_resumes_exactly(prepared, tmp_path, monkeypatch):
    straight = pretrain.train(make_cfg(prepared, tmp_path / "straight", "data.num_workers=1"))
    assert straight["num_updates"] == 6

    real_step = signal_after(monkeypatch, 2)
    cfg = make_cfg(prepared, tmp_path / "resumed", "data.num_workers=1")
    with pytest.raises(pretrain.Preempted, match="stopped by SIGUSR1 at update 3"):
        pretrain.train(cfg)
    saved = torch.load(tmp_path / "resumed/checkpoints/checkpoint_last.pt", weights_only=True)
    assert saved["num_updates"] == 3 and saved["sampler"]["consumed"] == 3
    monkeypatch.setattr(pretrain.Trainer, "train_step", real_step)
    assert pretrain.train(cfg)["num_updates"] == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exactly, update by update
    a = torch.load(tmp_path / "straight/checkpoints/checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/checkpoint_last.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert (tmp_path / "resumed/config.yaml").exists() and any((tmp_path / "resumed/tb").iterdir())


def test_a_stop_right_after_a_numbered_save_writes_nothing_again(prepared, tmp_path, monkeypatch, caplog):
    """checkpoint_last is the numbered save's file (a hard link): a signal then costs no second
    write of the whole state in the job's grace time."""
    signal_after(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="mt4ssl.train"), \
            pytest.raises(pretrain.Preempted, match="stopped by SIGUSR1 at update 3"):
        pretrain.train(make_cfg(prepared, tmp_path / "run", "run.save_interval=1"))
    folder = tmp_path / "run/checkpoints"
    assert (folder / "checkpoint_last.pt").stat().st_ino == (folder / "checkpoint_3.pt").stat().st_ino
    assert "checkpoint_last.pt already holds update 3" in caplog.text


def test_resume_refuses_another_model(prepared, tmp_path):
    pretrain.train(make_cfg(prepared, tmp_path / "run", "run.max_updates=1"))
    with pytest.raises(InputError, match=r"checkpoint_last.pt: made with another model config \(embed_dim: \d+ -> 64; "
                                         r"ffn_dim: \d+ -> 128; checkpoint -> this run\)"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "run", "model.embed_dim=64", "model.ffn_dim=128"),
                         distributed.Dist())


def test_resume_across_an_upgrade_that_added_model_keys(prepared, tmp_path):
    """A checkpoint written before a model key existed (its default keeps the old behaviour)
    resumes; a key this version does not know is an error naming it."""
    pretrain.train(make_cfg(prepared, tmp_path / "run", "run.max_updates=1"))
    last = tmp_path / "run/checkpoints/checkpoint_last.pt"
    state = torch.load(last, weights_only=False)
    del state["model_config"]["teacher"]["masks_per_sample"], state["model_config"]["teacher"]["ema_per_micro_batch"]
    torch.save(state, last)
    assert pretrain.train(make_cfg(prepared, tmp_path / "run", "run.max_updates=2"))["num_updates"] == 2
    state = torch.load(last, weights_only=False)
    state["model_config"]["teacher"]["from_the_future"] = 1
    torch.save(state, last)
    with pytest.raises(InputError, match=r"checkpoint_last.pt: model_config.teacher: unknown key\(s\) \['from_the_future'\]"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "run", "run.max_updates=3"), distributed.Dist())


def test_checkpoint_survives_a_kill_during_save(tmp_path):
    child = textwrap.dedent(f"""
        import time, torch
        from mt4ssl.train.checkpoint import CheckpointDir
        ckpt = CheckpointDir({str(tmp_path)!r})
        ckpt.save({{"num_updates": 1, "w": torch.ones(1000)}}, 1, numbered=True)
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"x" * 100000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        torch.save = slow_save
        ckpt.save({{"num_updates": 2, "w": torch.zeros(1000)}}, 2, numbered=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL in the middle of writing checkpoint 2
    proc.wait()
    state = CheckpointDir(tmp_path).load_last()
    assert state["num_updates"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_1.pt", "checkpoint_last.pt"]
    assert len(list(tmp_path.glob(".checkpoint_*.tmp"))) == 1  # the killed writer's partial file
    # the next save cleans nothing it should not and keeps the first and the last
    ckpt = CheckpointDir(tmp_path, keep_last=1)
    for n in (2, 3, 4):
        ckpt.save({"num_updates": n}, n, numbered=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == [
        "checkpoint_1.pt", "checkpoint_4.pt", "checkpoint_last.pt"]
    assert CheckpointDir(tmp_path).load_last()["num_updates"] == 4
    assert not list(tmp_path.glob(".*.tmp"))  # the next save removed it


# ---------------------------------------------------------------------------- precision, guard


def test_fp16_overflow_skips_the_update_and_counts_it(prepared, tmp_path):
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "fp16", "run.precision=fp16"), distributed.Dist())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 gradients overflow
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batches = fixed_batches(trainer, [0, 1], 2)
    trainer.train_step(batches)
    assert trainer.overflows == 1 and trainer.num_updates == 0
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert trainer.scaler.get_scale() == 2.0 ** 119  # halved after the overflow
    trainer.scaler.update(new_scale=1.0)  # skip the halvings: a scale that fits goes through
    trainer.train_step(batches)
    assert trainer.num_updates == 1 and trainer.overflows == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("per_micro_batch", [False, True])
def test_an_fp16_overflow_steps_the_teacher_only_in_fairseqs_mode(prepared, tmp_path, per_micro_batch):
    """fairseq steps the EMA in every micro-batch's train_step, before it knows the update will
    overflow: with ema_per_micro_batch the teacher takes k steps towards the unchanged student;
    by default a skipped update moves nothing."""
    k = 2
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "fp16", "run.precision=fp16", f"run.update_freq={k}",
                                        f"model.teacher.ema_per_micro_batch={str(per_micro_batch).lower()}",
                                        "model.teacher.ema_decay=0.9", "model.teacher.ema_end_decay=0.99",
                                        "model.teacher.ema_anneal_updates=10"), distributed.Dist())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 gradients overflow
    teacher = trainer.model.targets["teacher"]
    with torch.no_grad():
        for p in teacher.ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before, student = teacher_params(teacher), {n: p.detach().clone() for n, p in trainer.model.encoder.named_parameters()}
    trainer.train_step(fixed_batches(trainer, [0, 1], 1))
    assert trainer.overflows == 1 and trainer.num_updates == 0
    for n, p in trainer.model.encoder.named_parameters():
        assert torch.equal(p, student[n]), n
    expected = ema_by_hand(before, student, 0.9, k if per_micro_batch else 0)  # the decay at update 0
    after = teacher_params(teacher)
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (sum(not torch.equal(after[n], before[n]) for n in before) > 10) == per_micro_batch


def test_bf16_autocast_run(prepared, tmp_path):
    result = pretrain.train(make_cfg(prepared, tmp_path / "bf16", "run.precision=bf16", "run.max_updates=2"))
    assert result["num_updates"] == 2
    assert all(math.isfinite(v) for v in losses(tmp_path / "bf16").values())


def test_collapse_guard_saves_then_stops(prepared, tmp_path):
    cfg = make_cfg(prepared, tmp_path / "collapse", "run.collapse_after=1", "run.min_target_std=100.0")
    with pytest.raises(TrainingCollapsed, match="target_std"):
        pretrain.train(cfg)
    assert torch.load(tmp_path / "collapse/checkpoints/checkpoint_last.pt", weights_only=True)["num_updates"] == 2


# ---------------------------------------------------------------------------- validation


def test_validation_rows_and_checkpoint_best_across_a_resume(prepared, tmp_path):
    cfg = make_cfg(prepared, tmp_path / "run", "run.valid_interval=2", "run.log_interval=2", "run.max_updates=5")
    assert pretrain.train(cfg)["num_updates"] == 5
    lines = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in lines] == [2, 4, 5]  # one row per update: training and validation merged
    assert "loss" in lines[0] and "loss" not in lines[2]  # 5: the last update, validated, not a log step
    valid = {r["update"]: r for r in read_log(tmp_path / "run/log.jsonl") if "valid_loss" in r}
    assert sorted(valid) == [2, 4, 5]
    for r in valid.values():
        for key in ("valid_loss", "valid_loss_kmeans", "valid_loss_teacher", "valid_acc_km", "valid_target_std"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["valid_masked_frames"] == valid[2]["valid_masked_frames"] > 0  # the same masks every time
    folder = tmp_path / "run/checkpoints"
    best_update = min(valid, key=lambda u: valid[u]["valid_loss"])
    best = torch.load(folder / "checkpoint_best.pt", weights_only=True)
    assert best["num_updates"] == best_update and best["best_valid_loss"] == valid[best_update]["valid_loss"]
    if best_update == 5:  # written at the update of a numbered checkpoint: a hard link to it
        assert (folder / "checkpoint_best.pt").samefile(folder / "checkpoint_5.pt")
    assert plot_curves.main([str(tmp_path / "run/log.jsonl"), "--out", str(tmp_path / "c.png")]) == 0

    # resumed with a stored best lower than anything it will reach: checkpoint_best stays
    last = torch.load(folder / "checkpoint_last.pt", weights_only=True)
    assert last["best_valid_loss"] == valid[best_update]["valid_loss"]
    write_state(folder / "checkpoint_last.pt", {**last, "best_valid_loss": -1.0})
    assert pretrain.train(cfg.replace(run=dataclasses.replace(cfg.run, max_updates=7)))["num_updates"] == 7
    rows = {r["update"]: r for r in read_log(tmp_path / "run/log.jsonl")}
    assert math.isfinite(rows[6]["valid_loss"]) and math.isfinite(rows[7]["valid_loss"])
    assert torch.load(folder / "checkpoint_best.pt", weights_only=True)["num_updates"] == best_update
    assert torch.load(folder / "checkpoint_last.pt", weights_only=True)["best_valid_loss"] == -1.0


def test_validation_masks_are_fixed(prepared, tmp_path):
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "a", "run.valid_interval=2"), distributed.Dist())
    first = trainer.validate()
    rng = torch.get_rng_state()
    again = trainer.validate()
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is left alone
    assert again == first  # exactly: the same masks, no dropout
    torch.manual_seed(99)
    trainer.num_updates = 1234  # another update, the same weights
    assert trainer.validate() == first
    # an utterance's mask depends on (seed, utterance) only, not on the batches it is in
    ones = pretrain.Trainer(make_cfg(prepared, tmp_path / "b", "run.valid_interval=2", "data.max_tokens=60000"),
                            distributed.Dist())
    assert trainer.valid_batches == [[0, 1], [2]] and ones.valid_batches == [[0], [1], [2]]
    pair = trainer.task.valid_mask([0, 1])
    assert torch.equal(pair[0, :num_frames(33001)], ones.task.valid_mask([0])[0]) and not pair[0, num_frames(33001):].any()
    assert torch.equal(pair[1], ones.task.valid_mask([1])[0])
    assert ones.validate()["valid_masked_frames"] == first["valid_masked_frames"]
    other_seed = pretrain.Trainer(make_cfg(prepared, tmp_path / "c", "run.valid_interval=2", "run.seed=2"),
                                  distributed.Dist())
    assert not torch.equal(other_seed.task.valid_mask([1]), ones.task.valid_mask([1]))


def test_missing_valid_split_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(InputError, match=r"m/dev\.tsv: not found; validation .*set run\.valid_interval=0"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "a", "data.valid_split=dev"), distributed.Dist())
    lab = tmp_path / "lab"  # train labels only
    lab.mkdir()
    for name in ("train.km", "dict.km.txt"):
        (lab / name).write_bytes((prepared / "lab" / name).read_bytes())
    with pytest.raises(InputError, match=r"lab/valid\.km: not found"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "b", f"data.labels={{km: {lab}}}"), distributed.Dist())
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "c", f"data.labels={{km: {lab}}}", "run.valid_interval=0"),
                               distributed.Dist())
    assert trainer.valid_set is None and not trainer.valid_due()
    with pytest.raises(InputError, match=r"run\.valid_interval: -1 must be at least 0"):
        make_cfg(prepared, tmp_path / "d", "run.valid_interval=-1")


# ---------------------------------------------------------------------------- run.init_from


def test_init_from_takes_weights_with_a_fresh_optimizer_and_resumes_exactly(prepared, tmp_path, monkeypatch):
    src = pretrain.train(make_cfg(prepared, tmp_path / "src", "run.max_updates=2"))["checkpoint"]
    source = torch.load(src, weights_only=True)
    cfg = make_cfg(prepared, tmp_path / "straight", f"run.init_from={src}")
    trainer = pretrain.Trainer(cfg, distributed.Dist())
    assert trainer.num_updates == 0 and trainer.optimizer.state_dict()["state"] == {}
    assert trainer.scheduler.last_epoch == 0 and trainer.sampler.state_dict()["consumed"] == 0
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, source["model"][name], rtol=0, atol=0, msg=name)

    assert pretrain.train(cfg)["num_updates"] == 6
    real_step = signal_after(monkeypatch, 3)
    resumed = make_cfg(prepared, tmp_path / "resumed", f"run.init_from={src}")
    with pytest.raises(pretrain.Preempted):
        pretrain.train(resumed)
    monkeypatch.setattr(pretrain.Trainer, "train_step", real_step)
    os.replace(src, tmp_path / "moved.pt")  # a resumed run reads checkpoint_last, not init_from
    assert pretrain.train(resumed)["num_updates"] == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    first = losses(tmp_path / "straight")[1]
    assert first < losses(tmp_path / "src")[1]  # it started from the trained weights, not from scratch


def test_init_from_a_converted_encoder_and_bad_sources(prepared, tmp_path):
    from mt4ssl.models.checkpoint import save_checkpoint
    from mt4ssl.models.mt4ssl import MT4SSL

    base = make_cfg(prepared, tmp_path / "x")
    torch.manual_seed(5)  # a data2vec-like model (teacher only), as `mt4ssl convert fairseq` writes one
    d2v = MT4SSL(dataclasses.replace(pretrain.model_config(base, pretrain.Pretraining(base).train_set),
                                     targets=("teacher",)))
    save_checkpoint(tmp_path / "d2v.pt", d2v, converted_from="data2vec.pt")
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "a", f"run.init_from={tmp_path / 'd2v.pt'}"),
                               distributed.Dist())
    theirs, mine = d2v.state_dict(), trainer.model.state_dict()
    fresh = pretrain.Trainer(make_cfg(prepared, tmp_path / "b"), distributed.Dist()).model.state_dict()
    for name, value in mine.items():
        if name.startswith("targets.kmeans."):  # not in the source: as a fresh run initialises it
            torch.testing.assert_close(value, fresh[name], rtol=0, atol=0, msg=name)
        else:  # encoder, regression head and EMA teacher
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)

    small = make_cfg(prepared, tmp_path / "c", "model.embed_dim=64", "model.ffn_dim=128",
                     f"run.init_from={tmp_path / 'd2v.pt'}")
    with pytest.raises(InputError, match=r"d2v\.pt: run\.init_from has no weights of the same shape"):
        pretrain.Trainer(small, distributed.Dist())
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "d", f"run.init_from={tmp_path / 'nope.pt'}"),
                         distributed.Dist())
