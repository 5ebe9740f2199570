import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mt4ssl.cli import main
from mt4ssl.data.labels import read_dict, read_labels
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.kmeans.apply import nearest
from mt4ssl.kmeans.learn import KMeansModel, learn
from mt4ssl.models.cnn import num_frames
from tests.conftest import LENGTHS


def write_features(feat_dir, split, feats, lens, rate=50, shard=0, nshard=1, start=0):
    """A feature shard as `mt4ssl features` writes it."""
    feat_dir.mkdir(parents=True, exist_ok=True)
    prefix = feat_dir / f"{split}_{shard}_{nshard}"
    np.save(prefix.with_suffix(".npy"), feats.astype(np.float32))
    prefix.with_suffix(".len").write_text("".join(f"{n}\n" for n in lens))
    prefix.with_suffix(".json").write_text(json.dumps({
        "kind": "test", "rate": rate, "dim": feats.shape[1], "entries": [start, start + len(lens)],
        "shard": shard, "nshard": nshard}))


def planted(seed=0, k=6, dim=8, per=500):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, size=(k, dim))
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] + 0.3 * rng.standard_normal((k * per, dim))
    order = rng.permutation(len(x))
    return centers, x[order], truth[order]


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_recovers_planted_clusters(tmp_path, backend):
    centers, x, truth = planted()
    half = len(x) // 2
    write_features(tmp_path / "f", "train", x[:half], [half], shard=0, nshard=2)
    write_features(tmp_path / "f", "train", x[half:], [len(x) - half], shard=1, nshard=2, start=1)
    model = learn(tmp_path / "f", "train", 2, k=6, out=tmp_path / "km.npz", backend=backend,
                  fraction=0.5, seed=0)
    dist = ((model.centroids[:, None] - centers[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(dist)
    assert dist[rows, cols].max() < 0.1  # each planted center found within 0.3 units
    mapping = dict(zip(rows, cols))
    pred = np.array([mapping[i] for i in nearest(x, model.centroids)])
    assert (pred == truth).mean() == 1.0
    loaded = KMeansModel.load(tmp_path / "km.npz")
    np.testing.assert_array_equal(loaded.centroids, model.centroids)
    assert loaded.meta["backend"] == backend and loaded.meta["frames"] == 1500
    assert loaded.meta["inertia_per_frame"] == pytest.approx(8 * 0.3 ** 2, rel=0.15)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(3)
    x, c = rng.standard_normal((1000, 5)), rng.standard_normal((17, 5))
    brute = ((x[:, None] - c[None]) ** 2).sum(-1)
    idx, dist = nearest(x, c, return_distances=True, chunk=128)
    np.testing.assert_array_equal(idx, brute.argmin(1))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-4)


def test_too_few_frames_and_bad_model_file(tmp_path):
    write_features(tmp_path / "f", "train", np.zeros((10, 3)), [10])
    with pytest.raises(InputError, match="10 sampled frames are fewer than k=50"):
        learn(tmp_path / "f", "train", 1, k=50, out=tmp_path / "km.npz", fraction=1.0)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.npz: not a k-means model"):
        KMeansModel.load(tmp_path / "junk.npz")


def test_mfcc_pipeline_labels_match_cnn_frames_for_odd_lengths(libri_tree, tmp_path):
    m, f, lab = tmp_path / "m", tmp_path / "f", tmp_path / "lab"
    assert main(["manifest", str(libri_tree), "--out", str(m), "--splits", "train"]) == 0
    assert main(["features", "mfcc", str(m), "train", str(f), "--nshard", "2", "--all-shards"]) == 0
    assert main(["kmeans", str(f), "train", str(lab / "km.npz"), "--nshard", "2", "-k", "8",
                 "--fraction", "0.5"]) == 0
    assert main(["labels", str(f), "train", str(lab / "km.npz"), "--nshard", "2",
                 "--manifest-dir", str(m), "--out", str(lab)]) == 0
    manifest = read_manifest(m / "train.tsv")
    labels = read_labels(lab / "train.km", manifest)
    assert [len(x) for x in labels] == [num_frames(n) for n in manifest.sizes]
    assert sorted(manifest.sizes) == sorted(LENGTHS["train"]) and all(n % 2 for n in manifest.sizes[:3])
    assert read_dict(lab / "dict.km.txt") == [str(i) for i in range(8)]
    # Label t is the cluster of MFCC frame 2t (same 400-sample window as CNN frame t).
    from mt4ssl.features.dump import load_shard
    shard0 = load_shard(f, "train", 0, 2)
    centroids = KMeansModel.load(lab / "km.npz").centroids
    np.testing.assert_array_equal(labels[0], nearest(shard0.feats[:shard0.lens[0]:2], centroids))


def test_labels_refuse_features_that_do_not_fit_the_manifest(libri_tree, tmp_path, capsys):
    m = tmp_path / "m"
    main(["manifest", str(libri_tree), "--out", str(m), "--splits", "train"])
    manifest = read_manifest(m / "train.tsv")
    # 40 Hz features cannot be reduced to 50 Hz; 50 Hz features of the wrong length are refused.
    lens = [num_frames(n) for n in manifest.sizes]
    write_features(tmp_path / "f40", "train", np.zeros((sum(lens), 4)), lens, rate=40)
    write_features(tmp_path / "bad", "train", np.zeros((sum(lens) + 1, 4)),
                   [lens[0] + 1] + lens[1:], rate=50)
    write_features(tmp_path / "km_src", "train", np.random.default_rng(0).standard_normal((50, 4)), [50])
    learn(tmp_path / "km_src", "train", 1, k=2, out=tmp_path / "km.npz", fraction=1.0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.km").write_text("previous\n")
    for feats, message in [("f40", "features at 40 Hz cannot be reduced"),
                           ("bad", f"{lens[0] + 1} labels at 50 Hz, but the model has {lens[0]} frames")]:
        assert main(["labels", str(tmp_path / feats), "train", str(tmp_path / "km.npz"),
                     "--manifest-dir", str(m), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert (tmp_path / "out" / "train.km").read_text() == "previous\n"  # never half-written
