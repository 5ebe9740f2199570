"""`precision: auto`: bf16 only where the device runs it natively; explicit choices kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mt4ssl.config import load_config
from mt4ssl.errors import InputError
from mt4ssl.train.config import PretrainConfig
from mt4ssl.utils import precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend to be a CPU with the given native bf16 support."""

    def set_kind(amx: bool, avx512_bf16: bool, capability: str = "AVX2"):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return set_kind


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_kind):
    cpu_kind(amx=False, avx512_bf16=False, capability="AVX2")
    name, why = precision.resolve_precision("auto", CPU)
    assert name == "fp32"
    assert "AVX2" in why and "emulated" in why


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, False, "AMX"), (False, True, "AVX-512 BF16")])
def test_auto_is_bf16_with_amx_or_avx512_bf16(cpu_kind, amx, avx512_bf16, native):
    cpu_kind(amx=amx, avx512_bf16=avx512_bf16, capability="AVX512")
    name, why = precision.resolve_precision("auto", CPU)
    assert name == "bf16" and native in why and "AVX512" in why


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_choices_are_kept(cpu_kind, explicit):
    for amx in (False, True):
        cpu_kind(amx=amx, avx512_bf16=False)
        assert precision.resolve_precision(explicit, CPU) == (explicit, "set explicitly")


def test_cpuinfo_fallback_without_torch_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "fma"})
    assert precision.resolve_precision("auto", CPU)[0] == "fp32"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert precision.resolve_precision("auto", CPU)[0] == "bf16"


def test_auto_never_picks_fp16_and_bad_names_fail(cpu_kind):
    cpu_kind(amx=True, avx512_bf16=True)
    assert precision.resolve_precision("auto", CPU)[0] != "fp16"
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        precision.resolve_precision("fp8", CPU)


def test_config_accepts_auto_and_the_recipes_use_it():
    cfg = load_config(PretrainConfig, Path(__file__).parents[1] / "recipes/tiny/pretrain.yaml", [])
    assert cfg.run.precision == "auto"
    with pytest.raises(InputError, match=r"run\.precision: 'half' is not one of"):
        load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "run.precision=half"])


def test_trainer_runs_what_auto_resolved_to(cpu_kind, monkeypatch):
    """The trainer's autocast dtype and gradient scaler follow the resolved precision."""
    from mt4ssl.train import loop, pretrain

    seen = {}

    class Probe(Exception):
        pass

    def stop(self, *a, **k):  # stop the trainer's constructor right after the precision was chosen
        trainer = sys._getframe(1).f_locals["self"]
        seen.update(precision=trainer.precision, dtype=trainer.dtype, scaler=trainer.scaler.is_enabled())
        raise Probe

    monkeypatch.setattr(loop.BucketBatchSampler, "__init__", stop)
    monkeypatch.setattr(pretrain, "PretrainDataset", _FakeDataset)
    cfg = load_config(PretrainConfig, None, ["data.manifest_dir=m", "run.out_dir=o", "run.precision=auto",
                                             "model.preset=tiny", "model.targets=[teacher]",
                                             "run.valid_interval=0"])
    for amx, expected in ((False, (("fp32", None, False))), (True, ("bf16", torch.bfloat16, False))):
        cpu_kind(amx=amx, avx512_bf16=False)
        with pytest.raises(Probe):
            pretrain.Trainer(cfg, pretrain.distributed.Dist())
        assert (seen["precision"], seen["dtype"], seen["scaler"]) == expected


class _FakeDataset:
    sizes = [32000]

    def __init__(self, *args, **kwargs):
        pass

    def where(self, i):
        return "fake"
