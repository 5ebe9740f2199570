"""A malicious pickle (a checkpoint whose unpickling would run code writing a marker file)
is refused by default by every entry point that loads a checkpoint, and its payload never
runs: extract, probe, purity, the s3prl upstream (tests/test_superb_upstream.py has its own
test) and `mt4ssl superb`, pretraining and fine-tuning run.init_from, resume, decode, export,
convert fairseq (without --trust-pickle) and convert hf (a pickled pytorch_model.bin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mt4ssl.cli import main
from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from mt4ssl.models.mt4ssl import MT4SSL
from tests.conftest import small_model_config
from tools import bad_inputs

REFUSED = "not an mt4ssl checkpoint (it does not load with weights_only=True"


class Payload:
    """Unpickling this runs code that writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Path]:
    """(a real mt4ssl checkpoint plus a payload, the marker the payload would write)."""
    d = tmp_path_factory.mktemp("evil")
    torch.manual_seed(0)
    save_checkpoint(d / "good.pt", MT4SSL(small_model_config()))
    state = torch.load(d / "good.pt", weights_only=True)
    marker = d / "marker"
    torch.save({**state, "extra": Payload(marker)}, d / "evil.pt")
    return d / "evil.pt", marker


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Manifests (train, valid) with .wrd/.ltr, a lexicon and CTM alignments of the valid split."""
    d = tmp_path_factory.mktemp("data")
    m = bad_inputs.manifests(d, ("train", "valid"))
    (d / "lexicon.txt").write_text("".join(f"{w} AH0 B K\n" for w in bad_inputs.WORDS))  # ARPAbet phones
    from mt4ssl.data.manifest import read_manifest

    valid = read_manifest(m / "valid.tsv")
    (d / "valid.ctm").write_text("".join(f"{Path(f).stem} 1 0.000 {n / 16000:.3f} AH\n"
                                         for f, n in zip(valid.files, valid.sizes)))
    return d


def refused(capsys, argv: list[str], marker: Path, message: str = REFUSED) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """The test's own check: unpickling without weights_only runs the payload."""
    marker = tmp_path / "marker"
    torch.save({"extra": Payload(marker)}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.read_text() == "payload ran"


def test_loaders(evil):
    path, marker = evil
    for load in (load_checkpoint, load_model):
        with pytest.raises(InputError, match=r"evil\.pt: not an mt4ssl checkpoint \(it does not load with weights_only"):
            load(path)
    from mt4ssl.finetune.model import load_ctc_model

    with pytest.raises(InputError, match=r"evil\.pt: not an mt4ssl checkpoint"):
        load_ctc_model(path)
    assert not marker.exists()


def test_extract(evil, data, tmp_path, capsys):
    path, marker = evil
    audio = bad_inputs.first_audio(data)
    refused(capsys, ["extract", str(path), str(audio), "--out", str(tmp_path / "x")], marker)
    refused(capsys, ["extract", str(path), str(data / "m" / "valid.tsv"), "--out", str(tmp_path / "y")], marker)


def test_probe(evil, data, tmp_path, capsys):
    path, marker = evil
    refused(capsys, ["probe", "--ckpt", str(path), "--manifest-dir", str(data / "m"), "--lexicon",
                     str(data / "lexicon.txt"), "--out", str(tmp_path / "r.json"), "--test-split", "valid"], marker)


def test_purity(evil, data, tmp_path, capsys):
    path, marker = evil
    refused(capsys, ["purity", "--manifest", str(data / "m" / "valid.tsv"), "--alignments", str(data / "valid.ctm"),
                     "--ckpt", str(path), "--fit-manifest", str(data / "m" / "valid.tsv"), "-k", "2",
                     "--out", str(tmp_path / "r.json")], marker)


def test_superb(evil, tmp_path, capsys):
    path, marker = evil
    refused(capsys, ["superb", "--task", "ks", "--ckpt", str(path), "--data", str(tmp_path / "ks"),
                     "--out", str(tmp_path / "exp")], marker)


def test_finetune_init_from(evil, data, tmp_path, capsys):
    path, marker = evil
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("run: {device: cpu, max_updates: 2, valid_interval: 0}\ndata: {num_workers: 0}\n")
    refused(capsys, ["finetune", str(cfg), f"data.manifest_dir={data / 'm'}", f"run.out_dir={tmp_path / 'ft'}",
                     f"run.init_from={path}"], marker)


def _pretrain_argv(d: Path, out: Path, *extra: str) -> list[str]:
    bad_inputs.pretrain_data(d)
    return bad_inputs.pretrain_argv(d, f"run.out_dir={out}", *extra)


def test_pretrain_init_from_and_resume(evil, tmp_path, capsys):
    path, marker = evil
    refused(capsys, _pretrain_argv(tmp_path, tmp_path / "a", f"run.init_from={path}"), marker)
    # a malicious checkpoint_last (no numbered one beside it): refused, never a fresh start
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "checkpoint_last.pt").write_bytes(path.read_bytes())
    refused(capsys, _pretrain_argv(tmp_path, tmp_path / "b"), marker, "can be resumed from (")
    assert not (tmp_path / "b" / "log.jsonl").exists()


def test_decode(evil, data, tmp_path, capsys):
    path, marker = evil
    refused(capsys, ["decode", "--ckpt", str(path), "--manifest-dir", str(data / "m"), "--subsets", "valid",
                     "--out", str(tmp_path / "dec")], marker)


def test_export(evil, tmp_path, capsys):
    path, marker = evil
    refused(capsys, ["export", "hf", str(path), str(tmp_path / "hf")], marker)
    assert not (tmp_path / "hf").exists()


def test_convert_fairseq_needs_trust_pickle(evil, tmp_path, capsys):
    _, marker = evil
    fairseq = tmp_path / "fs.pt"
    torch.save({"cfg": {"model": {"_name": "hubert"}}, "model": {}, "args": Payload(marker)}, fairseq)
    refused(capsys, ["convert", "fairseq", str(fairseq), str(tmp_path / "o.pt")], marker,
            "fs.pt: this fairseq checkpoint is a pickle that runs code when loaded; if you trust the file, "
            "rerun with --trust-pickle")
    assert not (tmp_path / "o.pt").exists()


def test_convert_hf_pickled_weights(tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    marker = tmp_path / "marker"
    cfg = transformers.Data2VecAudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=5,
                                           num_conv_pos_embedding_groups=4)
    transformers.Data2VecAudioModel(cfg).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({**weights, "extra": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    refused(capsys, ["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "o.pt")], marker,
            "hf: its weights are a pickle that would run code when loaded (refused")
