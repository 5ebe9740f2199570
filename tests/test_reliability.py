"""The training loop under non-finite values and damaged checkpoints (issue 10's defects):
a NaN/Inf loss or gradient skips the update (counted, logged, weights untouched), too many in
a row stop the run keeping the last good checkpoint, NaN statistics are a collapse, no
checkpoint is written from non-finite weights; a damaged checkpoint_last falls back to the
newest usable numbered checkpoint. For pretraining and CTC fine-tuning (the same loop)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from mt4ssl.cli import main
from mt4ssl.data.manifest import write_split
from mt4ssl.errors import InputError
from mt4ssl.finetune import train as ft
from mt4ssl.targets import CollapseGuard, TrainingCollapsed
from mt4ssl.train import distributed, loop, pretrain
from tests.conftest import write_tree
from tests.test_train import fixed_batches, make_cfg, prepared  # noqa: F401  (the module fixture)

INF, NAN = float("inf"), float("nan")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class Inject:
    """Wraps a task's loss: the calls whose index (0-based) is in `bad` get their loss
    multiplied by `value` (NaN / Inf) or, with `grad=True`, a finite loss whose backward puts
    `value` into one parameter's gradient."""

    def __init__(self, task, bad, value: float, grad: bool = False):
        self.real, self.calls, self.bad, self.value, self.grad = task.loss, 0, bad, value, grad

    def __call__(self, net, batch):
        loss, size, logs = self.real(net, batch)
        hit, self.calls = self.calls in self.bad, self.calls + 1
        if hit and self.grad:
            param = next(p for p in net.parameters() if p.requires_grad)
            piece = param.flatten()[:1]
            piece.register_hook(lambda g: torch.full_like(g, self.value))  # this graph only
            loss = loss + (piece * 0).sum()  # the same (finite) loss value
        elif hit:
            loss = loss * self.value
        return loss, size, logs


def inject(monkeypatch, task_cls, **kw) -> list:
    """Wrap the loss of every `task_cls` object built from now on (e.g. by the CLI)."""
    made, real_init = [], task_cls.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.loss = Inject(self, **kw)
        made.append(self)

    monkeypatch.setattr(task_cls, "__init__", init)
    return made


# ---------------------------------------------------------------------------- one update


@pytest.mark.parametrize("value,grad", [(NAN, False), (INF, False), (INF, True), (NAN, True)],
                         ids=["nan-loss", "inf-loss", "inf-grad", "nan-grad"])
def test_a_nonfinite_update_is_skipped_and_changes_nothing(prepared, tmp_path, value, grad):  # noqa: F811
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "run"), distributed.Dist())
    assert trainer.cfg.optim.clip_norm == 0  # no clipping: clip_grad_norm_ at inf made every gradient NaN
    trainer.task.loss = Inject(trainer.task, bad={0}, value=value, grad=grad)
    before, batches = weights(trainer.model), fixed_batches(trainer, [0, 1], 2)
    stats = trainer.train_step(batches)
    assert stats["nonfinite"] == 1
    assert math.isfinite(stats["loss"]) != (not grad) and not (grad and math.isfinite(stats["grad_norm"]))
    assert (trainer.nonfinite, trainer.skipped_in_a_row, trainer.num_updates) == (1, 1, 0)
    assert_same(weights(trainer.model), before)  # student, heads and EMA teacher
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.scheduler.last_epoch == 0
    assert all(p.grad is None for p in trainer.params)
    stats = trainer.train_step(batches)  # the next one is applied
    assert stats["nonfinite"] == 0 and trainer.num_updates == 1 and trainer.skipped_in_a_row == 0
    after = weights(trainer.model)
    assert finite(after) and any(not torch.equal(after[k], before[k]) for k in before)
    assert trainer.state()["nonfinite"] == 1


def test_fp16_nonfinite_loss_is_skipped_too(prepared, tmp_path):  # noqa: F811
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "fp16", "run.precision=fp16"), distributed.Dist())
    trainer.task.loss = Inject(trainer.task, bad={0}, value=NAN)
    before, batches = weights(trainer.model), fixed_batches(trainer, [0, 1], 2)
    trainer.train_step(batches)
    assert (trainer.nonfinite, trainer.overflows, trainer.num_updates) == (1, 0, 0)
    assert_same(weights(trainer.model), before)
    trainer.scaler.update(new_scale=1.0)
    trainer.train_step(batches)  # the scaler's per-update state was reset: the next one goes through
    assert trainer.num_updates == 1


# ---------------------------------------------------------------------------- the stop


def test_pretraining_stops_after_skips_in_a_row_keeping_the_good_checkpoint(prepared, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    cfg = make_cfg(prepared, out, "run.save_interval=2", "run.max_skipped_in_a_row=3")
    trainer = pretrain.Trainer(cfg, distributed.Dist())
    # calls 0-2: updates 1-3; 3, 4 skipped; 5: update 4; from 6 on every one is NaN
    trainer.task.loss = Inject(trainer.task, bad={3, 4, *range(6, 100)}, value=NAN)
    with caplog.at_level(logging.WARNING, "mt4ssl.train"):
        with pytest.raises(loop.TrainingStopped, match=r"3 updates in a row were skipped \(run\.max_skipped_in_a_row\)"
                                                       r".*5 non-finite .*holds update 4, the last finite one"):
            trainer.fit()
    assert sum("skipped: non-finite loss nan" in r.getMessage() for r in caplog.records) == 5
    folder = out / "checkpoints"
    last = ckpt(folder / "checkpoint_last.pt")
    assert last["num_updates"] == 4 and last["nonfinite"] == 2 and finite(last["model"])
    assert_same(last["model"], weights(trainer.model))  # the weights of update 4, untouched since
    assert (folder / "checkpoint_last.pt").samefile(folder / "checkpoint_4.pt")
    assert ckpt(folder / "checkpoint_2.pt")["num_updates"] == 2
    log_rows = rows(out)
    assert [r["update"] for r in log_rows] == [1, 2, 3, 4, 4]
    assert log_rows[-1]["nonfinite"] == 5 and log_rows[-1]["skipped_in_a_row"] == 3 and "loss" not in log_rows[-1]
    assert log_rows[3]["nonfinite"] == 2 and math.isfinite(log_rows[3]["loss"])  # skipped ones left out of averages


def cli_overrides(prepared: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    from tests.test_train import SMALL_MODEL

    return [f"data.manifest_dir={prepared / 'm'}", f"data.labels={{km: {prepared / 'lab'}}}", "data.max_tokens=100000",
            "data.num_workers=0", f"run.out_dir={out}", "run.max_updates=6", "run.log_interval=1",
            "run.save_interval=100", "run.device=cpu", "optim.lr=1e-3", "optim.phase_ratio=[0.5,0.3,0.2]",
            *SMALL_MODEL, *extra]


def test_cli_stop_message_then_resume(prepared, tmp_path, monkeypatch, capsys):  # noqa: F811
    out, cfg_file = tmp_path / "run", tmp_path / "c.yaml"
    cfg_file.write_text("run: {max_skipped_in_a_row: 2}\n")
    made = inject(monkeypatch, pretrain.Pretraining, bad={2, 3}, value=INF, grad=True)
    assert main(["pretrain", str(cfg_file), *cli_overrides(prepared, out)]) == 4
    err = capsys.readouterr().err
    assert "mt4ssl pretrain: stopped: 2 updates in a row were skipped" in err and "Traceback" not in err
    assert "gradient norm (inf)" in err and f"{out / 'checkpoints' / 'checkpoint_last.pt'} holds update 2" in err
    assert made and ckpt(out / "checkpoints" / "checkpoint_last.pt")["num_updates"] == 2
    monkeypatch.undo()
    assert main(["pretrain", str(cfg_file), *cli_overrides(prepared, out)]) == 0  # resumed
    assert ckpt(out / "checkpoints" / "checkpoint_last.pt")["num_updates"] == 6


def ft_cfg(data: Path, ckpt: Path, out: Path, *overrides: str):
    from mt4ssl.config import load_config
    from mt4ssl.finetune.config import FinetuneConfig

    return load_config(FinetuneConfig, None, [
        f"data.manifest_dir={data}", "data.valid_split=valid", "data.max_tokens=100000", "data.num_workers=0",
        f"run.out_dir={out}", f"run.init_from={ckpt}", "run.max_updates=6", "run.log_interval=1",
        "run.save_interval=2", "run.valid_interval=0", "run.device=cpu", "optim.lr=1e-3",
        "model.mask_channel_length=8", "model.layerdrop=0.0", *overrides])


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> tuple[Path, Path]:
    from mt4ssl.models.checkpoint import save_checkpoint
    from mt4ssl.models.mt4ssl import MT4SSL
    from tests.conftest import small_model_config

    root = tmp_path_factory.mktemp("ftrel")
    tree = write_tree(root / "libri", {"train": [32001, 40007, 48319, 35555, 57603, 33333], "valid": [40000, 40000]})
    write_split(tree / "train", root / "m", "train")
    write_split(tree / "valid", root / "m", "valid")
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pt", MT4SSL(small_model_config()))
    return root / "m", root / "tiny.pt"


@pytest.mark.parametrize("grad", [False, True], ids=["nan-loss", "inf-grad"])
def test_finetuning_skips_then_stops_keeping_the_good_checkpoint(ft_data, tmp_path, grad):
    data, tiny = ft_data
    out = tmp_path / "ft"
    cfg = ft_cfg(data, tiny, out, "run.max_skipped_in_a_row=3")
    trainer = loop.Trainer(cfg, distributed.Dist(), ft.CTCFinetuning(cfg))
    trainer.task.loss = Inject(trainer.task, bad=range(3, 100), value=INF if grad else NAN, grad=grad)
    good, real_step = {}, trainer.step

    def step(stats):
        real_step(stats)
        good.setdefault(trainer.num_updates, weights(trainer.model))

    trainer.step = step
    with pytest.raises(loop.TrainingStopped, match="3 updates in a row were skipped.*holds update 3"):
        trainer.fit()
    assert (trainer.nonfinite, trainer.num_updates) == (3, 3)
    assert_same(weights(trainer.model), good[3])
    folder = out / "checkpoints"
    last = ckpt(folder / "checkpoint_last.pt")
    assert last["num_updates"] == 3 and last["nonfinite"] == 3
    assert finite(last["model"]) and finite(last["ctc"]["head"])
    assert_same({**last["model"], **{f"ctc.{k}": v for k, v in last["ctc"]["head"].items()}},
                {**{k[len("encoder."):]: v for k, v in good[3].items() if k.startswith("encoder.")},
                 **{f"ctc.{k[len('proj.'):]}": v for k, v in good[3].items() if k.startswith("proj.")}})
    assert ckpt(folder / "checkpoint_2.pt")["num_updates"] == 2  # the numbered one before survives
    assert rows(out)[-1]["nonfinite"] == 3


# ---------------------------------------------------------------------------- guard, saves


def test_nan_statistics_are_a_collapse():
    guard = CollapseGuard(min_target_std=0.1, min_pred_std=0.01, after_updates=10)
    guard.check({"target_std": NAN, "pred_std": NAN}, 10)  # not checked yet
    with pytest.raises(TrainingCollapsed, match=r"target_std = nan is NaN \(the EMA teacher targets are not finite"):
        guard.check({"target_std": NAN, "pred_std": 1.0}, 11)
    with pytest.raises(TrainingCollapsed, match=r"pred_std = nan is NaN"):
        guard.check({"target_std": 1.0, "pred_std": torch.tensor(NAN)}, 11)
    guard.check({"target_std": 1.0, "pred_std": 1.0}, 11)


def test_no_checkpoint_is_written_from_nonfinite_weights(prepared, tmp_path):  # noqa: F811
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "run"), distributed.Dist())
    trainer.train_step(fixed_batches(trainer, [0, 1], 2))
    good = trainer.save(numbered=True)
    before = good.read_bytes()
    with torch.no_grad():
        trainer.model.targets["teacher"].ema.layers[0].fc1.weight[0, 0] = NAN  # even in the EMA teacher
    trainer.num_updates += 1
    with pytest.raises(loop.TrainingStopped, match=r"not saving update 2: weight targets\.teacher\.ema\.layers\.0"
                                                   r"\.fc1\.weight holds NaN .*the last good one: .*checkpoint_last\.pt"):
        trainer.save(numbered=True)
    with pytest.raises(loop.TrainingStopped, match="not saving update 2"):
        trainer.save_best(None)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_1.pt", "checkpoint_last.pt"]
    assert good.read_bytes() == before and not list(folder.glob(".*"))


def test_the_loop_never_saves_nonfinite_weights(prepared, tmp_path, capsys):  # noqa: F811
    cfg = make_cfg(prepared, tmp_path / "run", "run.save_interval=1")
    trainer = pretrain.Trainer(cfg, distributed.Dist())
    real_after = trainer.task.after_update

    def after_update(model, n):  # the EMA step goes wrong at update 2
        real_after(model, n)
        if n == 2:
            with torch.no_grad():
                model.targets["teacher"].ema.layers[0].fc1.weight.fill_(NAN)

    trainer.task.after_update = after_update
    with pytest.raises(loop.TrainingStopped, match=r"not saving update 2: weight targets\.teacher\.ema\.layers\.0"):
        trainer.fit()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_1.pt", "checkpoint_last.pt"]
    last = ckpt(folder / "checkpoint_last.pt")
    assert last["num_updates"] == 1 and finite(last["model"])


def test_init_from_nonfinite_weights_is_refused(prepared, tmp_path):  # noqa: F811
    src = pretrain.train(make_cfg(prepared, tmp_path / "src", "run.max_updates=1"))["checkpoint"]
    state = ckpt(src)
    state["model"]["mask_emb"][0] = INF
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(InputError, match=r"bad\.pt: run\.init_from: weight mask_emb holds NaN or infinite"):
        pretrain.Trainer(make_cfg(prepared, tmp_path / "run", f"run.init_from={bad}"), distributed.Dist())


# ---------------------------------------------------------------------------- damaged checkpoint_last


def _run(prepared, out: Path, *extra: str) -> dict:  # noqa: F811
    return pretrain.train(make_cfg(prepared, out, "run.max_updates=4", "run.save_interval=2", "run.keep_last=3", *extra))


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "nan", "missing"])
def test_damaged_checkpoint_last_falls_back_to_the_newest_usable_one(prepared, tmp_path, caplog, damage):  # noqa: F811
    straight, out = tmp_path / "straight", tmp_path / "run"
    _run(prepared, straight)
    _run(prepared, out)
    folder = out / "checkpoints"
    last, newest = folder / "checkpoint_last.pt", folder / "checkpoint_4.pt"
    assert last.samefile(newest)  # a hard link: damaging its content damages both
    if damage == "truncated":
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size // 2)
        bad = [last, newest]
    elif damage == "corrupt":
        last.unlink()
        last.write_bytes(b"\0" * 1000)  # checkpoint_4 itself is intact
        bad = [last]
    elif damage == "nan":
        state = ckpt(last)
        state["model"]["post_extract_proj.weight"][:] = NAN
        last.unlink()
        torch.save(state, last)
        bad = [last]
    else:
        last.unlink()
        bad = [last]
    expected = folder / f"checkpoint_{2 if newest in bad else 4}.pt"
    with caplog.at_level(logging.WARNING, "mt4ssl.train"):
        trainer = pretrain.Trainer(make_cfg(prepared, out, "run.max_updates=4", "run.save_interval=2",
                                            "run.keep_last=3"), distributed.Dist())
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(str(p) in warning for p in bad) and f"resuming from {expected} instead" in warning
    assert trainer.resumed_from == expected and trainer.num_updates == (2 if newest in bad else 4)
    assert trainer.fit()["num_updates"] == 4
    for name, value in ckpt(straight / "checkpoints" / "checkpoint_last.pt")["model"].items():  # exact resume
        torch.testing.assert_close(ckpt(last)["model"][name], value, rtol=0, atol=0, msg=name)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(prepared, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _run(prepared, out, "run.max_updates=2")
    folder = out / "checkpoints"
    for p in folder.glob("checkpoint_*.pt"):
        with open(p, "r+b") as f:
            f.truncate(100)
    with pytest.raises(InputError, match=r"no checkpoint in .*checkpoints can be resumed from \(.*checkpoint_last\.pt: "
                                         r"not an mt4ssl checkpoint .*checkpoint_2\.pt: not an mt4ssl checkpoint"):
        pretrain.Trainer(make_cfg(prepared, out, "run.max_updates=4"), distributed.Dist())
    # a model checkpoint (no training state) in place of checkpoint_last is no training checkpoint
    for p in folder.glob("checkpoint_*.pt"):
        p.unlink()
    from mt4ssl.models.checkpoint import save_checkpoint

    save_checkpoint(folder / "checkpoint_last.pt", pretrain.Trainer(make_cfg(prepared, tmp_path / "x"),
                                                                    distributed.Dist()).model)
    with pytest.raises(InputError, match=r"checkpoint_last\.pt: not a training checkpoint \(no optimizer, scheduler"):
        pretrain.Trainer(make_cfg(prepared, out, "run.max_updates=4"), distributed.Dist())


def test_bad_audio_mid_run_saves_then_names_the_file(prepared, tmp_path, monkeypatch):  # noqa: F811
    from mt4ssl.data import dataset

    cfg = make_cfg(prepared, tmp_path / "run", "run.max_updates=4")
    trainer = pretrain.Trainer(cfg, distributed.Dist())
    real_getitem, calls = dataset.PretrainDataset.__getitem__, []

    def getitem(self, i):  # the file of item i is found broken at the third update
        calls.append(i)
        if trainer.num_updates == 2:
            raise InputError(f"{self.where(i)}: /data/x.flac: sample 7 is nan (1 non-finite sample(s))")
        return real_getitem(self, i)

    monkeypatch.setattr(dataset.PretrainDataset, "__getitem__", getitem)
    with pytest.raises(InputError, match=r"train\.tsv:\d+ .*x\.flac: sample 7 is nan .*\(the run stopped at update 2, "
                                         r"saved in .*checkpoint_last\.pt; fix the data"):
        trainer.fit()
    assert ckpt(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt")["num_updates"] == 2


def test_atomic_writes_keep_the_old_file_and_follow_the_umask(tmp_path):
    """A failed write leaves the old content and no temporary file; a written file has the
    permissions open() would give it (0666 minus the umask), not mkstemp's 0600."""
    import os

    from mt4ssl.utils.io import atomic_open, atomic_write_text

    path = tmp_path / "labels.km"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="cut"):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("cut")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["labels.km"]
    old = os.umask(0o027)
    try:
        atomic_write_text(path, "new\n")
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        atomic_write_text(tmp_path / "other", "x")
        assert (tmp_path / "other").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    assert path.read_text() == "new\n"
