import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mt4ssl.cli import main
from mt4ssl.data.labels import read_dict, read_labels
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.kmeans.apply import nearest
from mt4ssl.kmeans.learn import (KMeansModel, Nearest, blocks, fit_lloyd, kmeans_plusplus, learn,
                                 lloyd_step, read_rows, resolve_device, sample_frames)
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


@pytest.mark.parametrize("backend", ["lloyd", "sklearn"])
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


@pytest.mark.parametrize("engine", ["faiss", "torch"])  # torch: the GPU path, here on CPU
def test_nearest_matches_brute_force(engine):
    rng = np.random.default_rng(3)
    x, c = rng.standard_normal((1000, 5)), rng.standard_normal((17, 5))
    brute = ((x[:, None] - c[None]) ** 2).sum(-1)
    idx, dist = nearest(x, c, return_distances=True, chunk=128, engine=engine)
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


def test_lloyd_stops_on_relative_inertia_change():
    _, x, _ = planted(seed=1)
    stats = {}
    fit_lloyd(x, 6, seed=0, tol=1e-4, points_per_centroid=0, stats=stats)  # 0: iterate on all
    trace = stats["inertia_trace"]
    assert stats["converged"] and stats["iterations"] == len(trace) < 100
    assert stats["full_passes"] == 0 and stats["subsample"] == len(x)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(trace, trace[1:]))  # Lloyd never goes up
    assert trace[-2] - trace[-1] <= 1e-4 * trace[-1]  # stopped at the first step below tol
    assert all(a - b > 1e-4 * b for a, b in zip(trace[:-2], trace[1:-1]))
    capped = {}  # structureless data: Lloyd is still moving after 3 iterations
    noise = np.random.default_rng(0).standard_normal((3000, 8))
    fit_lloyd(noise, 20, seed=0, tol=0.0, max_iter=3, points_per_centroid=0, stats=capped)
    assert capped["iterations"] == 3 and not capped["converged"]


def test_lloyd_subsample_then_one_full_pass():
    centers, x, _ = planted(seed=2)
    sub_only, full = {}, {}
    c0 = fit_lloyd(x, 6, seed=4, points_per_centroid=40, full_passes=0, stats=sub_only)
    c1 = fit_lloyd(x, 6, seed=4, points_per_centroid=40, full_passes=1, stats=full)
    assert sub_only["subsample"] == full["subsample"] == 240 and full["full_passes"] == 1
    # the full pass is exactly one Lloyd step over all frames from the sub-sample's centroids
    step, counts, obj, _ = lloyd_step(x, torch.from_numpy(c0), block=1000)
    np.testing.assert_allclose(c1, step.numpy(), rtol=1e-5, atol=1e-5)
    assert counts.sum() == len(x) and full["inertia_trace"][-1] == pytest.approx(obj / len(x))
    d = ((c1[:, None] - centers[None]) ** 2).sum(-1)
    assert d.min(1).max() < 0.01  # each planted center within 0.1 units


def test_lloyd_torch_engine_equals_faiss_engine():
    """The path a GPU runs (torch distances), on CPU: the same centroids as faiss."""
    _, x, _ = planted(seed=3, dim=16)
    a = fit_lloyd(x, 6, seed=0, engine="faiss")
    b = fit_lloyd(x, 6, seed=0, engine="torch")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_empty_cluster_restarts_at_the_farthest_frame():
    centers, x, _ = planted(seed=5)
    init = centers.copy()
    init[0] = 1e4  # nothing is near it: empty after the first assignment
    init[1] = centers[2] + 0.01  # two seeds in one planted cluster, none in cluster 0
    c = fit_lloyd(x, 6, seed=0, init=init)
    d = ((c[:, None] - centers[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(d)
    assert d[rows, cols].max() < 0.01


def test_kmeans_plusplus_picks_distinct_rows_one_per_planted_cluster():
    centers, x, truth = planted(seed=6)
    seeds = kmeans_plusplus(torch.from_numpy(x.astype(np.float32)), 6, seed=0).numpy()
    hit = [int(np.flatnonzero((x.astype(np.float32) == s).all(1))[0]) for s in seeds]
    assert sorted(truth[hit]) == list(range(6))  # well-separated clusters: one seed in each
    again = kmeans_plusplus(torch.from_numpy(x.astype(np.float32)), 6, seed=0).numpy()
    np.testing.assert_array_equal(seeds, again)


def test_lloyd_streams_the_sample_without_copying_it():
    x = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    for xb in blocks(x, torch.device("cpu"), 300):
        assert np.shares_memory(xb.numpy(), x)  # a view, not a copy
    ro = np.lib.stride_tricks.as_strided(x)  # a read-only array (as a memory map of a shard)
    ro.flags.writeable = False
    assert not any(np.shares_memory(xb.numpy(), x) for xb in blocks(ro, torch.device("cpu"), 300))


def test_sample_is_read_once_into_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (1500, 1250, 1550, 1450) * 2]
    for i, p in enumerate(parts):
        write_features(tmp_path / "f", "train", p, [len(p)], shard=i, nshard=8, start=i)
    tracemalloc.start()
    x, meta = sample_frames(tmp_path / "f", "train", 8, fraction=0.7, seed=3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The same frames as an independent reference draw (per-shard, sorted, same RNG stream)...
    ref_rng = np.random.default_rng(3)
    ref = np.concatenate([p[np.sort(ref_rng.choice(len(p), size=round(len(p) * 0.7), replace=False))]
                          for p in parts])
    np.testing.assert_array_equal(x, ref)
    assert x.base is None and x.dtype == np.float32 and meta["dim"] == 64
    # ...in one array: no per-shard parts concatenated into a second copy (that peaks at 2x).
    assert peak < 1.3 * x.nbytes


def test_read_rows_spans_buffers_and_reports_truncated_files(tmp_path):
    a = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    np.save(tmp_path / "a.npy", a)
    rows = np.array([0, 1, 7, 8, 9, 30, 49])
    out = np.empty((len(rows), 3), np.float32)
    read_rows(tmp_path / "a.npy", rows, out, buffer_bytes=4 * 3 * 5)  # 5 rows a read
    np.testing.assert_array_equal(out, a[rows])
    out[:] = 0  # gaps of more than 4 rows are skipped: reads 0-1, 7-9, 30, 49 only
    assert read_rows(tmp_path / "a.npy", rows, out, skip_bytes=4 * 3 * 4) == 4 * 3 * 7
    np.testing.assert_array_equal(out, a[rows])
    assert read_rows(tmp_path / "a.npy", rows, out) == 4 * 3 * 50  # default: one span, 0..49
    np.testing.assert_array_equal(out, a[rows])
    (tmp_path / "b.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-20])
    with pytest.raises(InputError, match="b.npy: truncated"):
        read_rows(tmp_path / "b.npy", rows, out)
    np.save(tmp_path / "c.npy", a.astype(np.float64))
    with pytest.raises(InputError, match="c.npy: expected a C-order float32"):
        read_rows(tmp_path / "c.npy", rows, out)


def test_device_and_backend_options_are_checked(tmp_path, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: no such CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="--device gpu0"):
        resolve_device("gpu0")
    write_features(tmp_path / "f", "train", planted()[1], [3000])
    assert main(["kmeans", str(tmp_path / "f"), "train", str(tmp_path / "km.npz"), "-k", "6",
                 "--backend", "sklearn", "--device", "cuda"]) == 2
    assert "--backend sklearn runs on CPU only" in capsys.readouterr().err
    assert main(["kmeans", str(tmp_path / "f"), "train", str(tmp_path / "km.npz"), "-k", "6",
                 "--fraction", "1", "--tol", "1e-3", "--points-per-centroid", "50"]) == 0
    meta = KMeansModel.load(tmp_path / "km.npz").meta
    assert meta["backend"] == "lloyd" and meta["options"]["points_per_centroid"] == 50
    assert meta["full_passes"] == 1 and meta["converged"]


def utterance_shards(feat_dir, nshard=3, utts=40, seed=0):
    """Shards of utterances of random lengths whose frames say where they come from:
    column 0 = the frame's global index, column 1 = its utterance's global index."""
    rng, frame, utt, lens_all = np.random.default_rng(seed), 0, 0, []
    for s in range(nshard):
        lens = rng.integers(1, 30, size=utts + s).tolist()
        rows = []
        for n in lens:
            rows.append(np.stack([np.arange(frame, frame + n), np.full(n, utt), rng.standard_normal(n)], 1))
            frame, utt = frame + n, utt + 1
        write_features(feat_dir, "train", np.concatenate(rows), lens, shard=s, nshard=nshard, start=utt - len(lens))
        lens_all.append(lens)
    return lens_all


def test_utterance_sampling_takes_whole_utterances(tmp_path):
    lens = utterance_shards(tmp_path / "f")
    x, _ = sample_frames(tmp_path / "f", "train", 3, fraction=0.3, seed=5, unit="utterances")
    frame, utt = x[:, 0].astype(int), x[:, 1].astype(int)
    assert (np.diff(frame) > 0).all()  # in file order, no frame twice
    flat = sum(lens, [])
    drawn = np.unique(utt)
    assert len(x) == sum(flat[u] for u in drawn)  # every frame of every drawn utterance...
    assert all(np.count_nonzero(utt == u) == flat[u] for u in drawn)
    bounds = np.cumsum([0] + [len(s) for s in lens])
    per_shard = [np.count_nonzero((drawn >= a) & (drawn < b)) for a, b in zip(bounds, bounds[1:])]
    assert per_shard == [int(np.ceil(len(s) * 0.3)) for s in lens]  # ...ceil(fraction x utterances) a shard
    again, _ = sample_frames(tmp_path / "f", "train", 3, fraction=0.3, seed=6, unit="utterances")
    assert set(again[:, 1].astype(int)) != set(drawn)  # the seed draws
    frames, _ = sample_frames(tmp_path / "f", "train", 3, fraction=0.3, seed=5)  # the default: frames
    assert len(frames) == sum(round(sum(s) * 0.3) for s in lens)
    assert any(np.count_nonzero(frames[:, 1] == u) < flat[u] for u in np.unique(frames[:, 1]).astype(int))
    with pytest.raises(InputError, match="--sample words"):
        sample_frames(tmp_path / "f", "train", 3, fraction=0.3, seed=5, unit="words")


def test_utterance_sampling_draws_what_fairseq_learn_kmeans_draws(tmp_path):
    """The same frames as fairseq's own learn_kmeans.load_feature, for the same seed."""
    import importlib.util
    import logging

    spec = importlib.util.find_spec("fairseq")
    if spec is None:
        pytest.skip("fairseq (the optional extra) is not installed")
    path = Path(spec.origin).parent / "examples/hubert/simple_kmeans/learn_kmeans.py"
    fairseq_km = importlib.util.spec_from_file_location("fairseq_learn_kmeans", path)
    module = importlib.util.module_from_spec(fairseq_km)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        fairseq_km.loader.exec_module(module)  # the file alone, not fairseq's package
    finally:  # it calls logging.basicConfig: leave the other tests' logging as it was
        root.handlers[:] = handlers
        root.setLevel(level)
    utterance_shards(tmp_path / "f")
    for seed, fraction in [(0, 0.3), (7, 0.05), (3, 1.0)]:
        np.random.seed(seed)  # as fairseq's learn_kmeans() does before load_feature
        ref = module.load_feature(str(tmp_path / "f"), "train", 3, seed, fraction)
        ours, _ = sample_frames(tmp_path / "f", "train", 3, fraction, seed, unit="utterances")
        np.testing.assert_array_equal(ours, ref[np.argsort(ref[:, 0], kind="stable")])


def test_kmeans_cli_samples_utterances(tmp_path):
    utterance_shards(tmp_path / "f", nshard=1, utts=200)
    assert main(["kmeans", str(tmp_path / "f"), "train", str(tmp_path / "km.npz"), "-k", "4",
                 "--sample", "utterances", "--fraction", "0.25", "--seed", "2"]) == 0
    meta = KMeansModel.load(tmp_path / "km.npz").meta
    x, _ = sample_frames(tmp_path / "f", "train", 1, 0.25, 2, unit="utterances")
    assert meta["sample"] == "utterances" and meta["frames"] == len(x)
