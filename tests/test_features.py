import json

import numpy as np
import pytest
import torch
import torchaudio

from mt4ssl.cli import main
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.features import dump, mfcc
from mt4ssl.models.cnn import num_frames


@pytest.fixture
def manifests(libri_tree, tmp_path):
    out = tmp_path / "manifests"
    assert main(["manifest", str(libri_tree), "--out", str(out)]) == 0
    return out


def deltas_reference(c: np.ndarray, n: int = 2) -> np.ndarray:
    """Regression deltas over time (axis 0), edges repeated: d_t = sum_k k (c_t+k - c_t-k) / 2 sum k^2."""
    padded = np.concatenate([np.repeat(c[:1], n, 0), c, np.repeat(c[-1:], n, 0)])
    t = len(c)
    num = sum(k * (padded[n + k:n + k + t] - padded[n - k:n - k + t]) for k in range(1, n + 1))
    return num / (2 * sum(k * k for k in range(1, n + 1)))


def test_mfcc39_matches_kaldi_mfcc_with_regression_deltas():
    rng = np.random.default_rng(1)
    wav = (0.1 * rng.standard_normal(16000 * 2 + 123)).astype(np.float32)
    ours = mfcc.mfcc39(wav)
    static = torchaudio.compliance.kaldi.mfcc(torch.from_numpy(wav)[None], sample_frequency=16000,
                                              use_energy=False).numpy()
    d1 = deltas_reference(static)
    d2 = deltas_reference(d1)
    ref = np.concatenate([static, d1, d2], axis=1)
    assert ours.shape == (mfcc.num_frames(len(wav)), 39) == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [400, 401, 559, 560, 32001, 48319])
def test_mfcc_frame_count_and_alignment_with_cnn(n):
    assert mfcc.num_frames(n) == len(mfcc.mfcc39(np.zeros(n, np.float32) + 0.01))
    # Every second MFCC frame starts where a CNN frame starts: the reduced count is exact.
    assert len(range(0, mfcc.num_frames(n), 2)) == num_frames(n)


def test_shards_concatenate_to_the_whole_and_match_per_utterance_mfcc(manifests, tmp_path):
    feats = tmp_path / "feats"
    for shard in range(3):
        assert main(["features", "mfcc", str(manifests), "train", str(feats),
                     "--shard", str(shard), "--nshard", "3"]) == 0
    whole = tmp_path / "whole"
    dump.dump_shard(dump.mfcc_kind(None), manifests / "train.tsv", whole, "train", progress=False)
    parts = list(dump.iter_shards(feats, "train", 3))
    np.testing.assert_array_equal(np.concatenate([p.feats for p in parts]),
                                  dump.load_shard(whole, "train", 0, 1).feats)
    m = read_manifest(manifests / "train.tsv")
    lens = [n for p in parts for n in p.lens]
    assert lens == [mfcc.num_frames(n) for n in m.sizes]
    i = 4  # an utterance in the last shard
    offset = sum(lens[:i]) - sum(parts[0].lens) - sum(parts[1].lens)
    np.testing.assert_array_equal(parts[2].feats[offset:offset + lens[i]], mfcc.mfcc39(m.read(i)))
    meta = json.loads((feats / "train_2_3.json").read_text())
    assert meta["rate"] == 100 and meta["dim"] == 39 and meta["entries"] == [4, 6]


def test_finished_shard_is_not_recomputed(manifests, tmp_path, monkeypatch):
    feats = tmp_path / "feats"
    kind = dump.mfcc_kind(None)
    dump.dump_shard(kind, manifests / "train.tsv", feats, "train", 0, 2, progress=False)
    before = (feats / "train_0_2.npy").stat().st_mtime_ns
    exploding = dump.FeatureKind("mfcc", 100, 39, mfcc.num_frames, lambda w: [1 / 0])
    dump.dump_shard(exploding, manifests / "train.tsv", feats, "train", 0, 2, progress=False)
    assert (feats / "train_0_2.npy").stat().st_mtime_ns == before


def test_interrupted_shard_leaves_nothing_and_reruns(manifests, tmp_path):
    feats = tmp_path / "feats"
    calls = []

    def flaky(wav):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [mfcc.mfcc39(wav)]

    kind = dump.FeatureKind("mfcc", 100, 39, mfcc.num_frames, flaky)
    with pytest.raises(KeyboardInterrupt):
        dump.dump_shard(kind, manifests / "train.tsv", feats, "train", progress=False)
    assert list(feats.iterdir()) == []
    dump.dump_shard(kind, manifests / "train.tsv", feats, "train", progress=False)
    assert dump.load_shard(feats, "train", 0, 1).feats.shape[0] > 0


def test_bad_shard_arguments_and_missing_shard(manifests, tmp_path, capsys):
    assert main(["features", "mfcc", str(manifests), "train", str(tmp_path / "f"),
                 "--shard", "3", "--nshard", "3"]) == 2
    assert "--shard 3 must be in [0, --nshard 3)" in capsys.readouterr().err
    dump.dump_shard(dump.mfcc_kind(None), manifests / "train.tsv", tmp_path / "f", "train", 0, 2,
                    progress=False)
    with pytest.raises(InputError, match="train_1_2.json: shard 1/2 of train is missing"):
        list(dump.iter_shards(tmp_path / "f", "train", 2))


def test_manifest_count_mismatch_names_line(manifests, tmp_path, capsys):
    tsv = manifests / "train.tsv"
    lines = tsv.read_text().splitlines()
    rel, n = lines[1].split("\t")
    lines[1] = f"{rel}\t{int(n) - 7}"
    tsv.write_text("\n".join(lines) + "\n")
    assert main(["features", "mfcc", str(manifests), "train", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert f"train.tsv:2 ({rel})" in err and f"has {n} samples, the manifest says {int(n) - 7}" in err
    assert not list((tmp_path / "f").glob("*.npy"))
