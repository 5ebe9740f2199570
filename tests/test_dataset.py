import logging
from collections import Counter
from functools import partial

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from mt4ssl.cli import main
from mt4ssl.data.dataset import PretrainDataset, bucket_length, collate
from mt4ssl.data.labels import read_labels
from mt4ssl.data.manifest import read_manifest
from mt4ssl.data.sampler import BucketBatchSampler
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import ConvFeatureEncoder, frame_padding_mask
from tests.conftest import LENGTHS, write_tree


def frames(n):
    """CNN frames of n samples: frame t covers samples [320t, 320t + 400)."""
    return (n - 400) // 320 + 1 if n >= 400 else 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny LibriSpeech tree -> manifest -> MFCC features -> k-means -> 50 Hz labels."""
    tmp = tmp_path_factory.mktemp("corpus")
    root, m, f, lab = write_tree(tmp / "libri"), tmp / "m", tmp / "f", tmp / "lab"
    assert main(["manifest", str(root), "--out", str(m), "--splits", "train"]) == 0
    assert main(["features", "mfcc", str(m), "train", str(f), "--all-shards"]) == 0
    assert main(["kmeans", str(f), "train", str(lab / "km.npz"), "-k", "8", "--fraction", "1.0"]) == 0
    assert main(["labels", str(f), "train", str(lab / "km.npz"), "--manifest-dir", str(m),
                 "--out", str(lab)]) == 0
    return m / "train.tsv", lab / "train.km"


def test_items_are_the_cropped_audio_and_labels_of_the_kept_utterances(corpus, caplog):
    tsv, km = corpus
    caplog.set_level(logging.INFO, logger="mt4ssl.data.dataset")
    ds = PretrainDataset(tsv, {"mfcc8": km}, min_samples=33000, max_samples=48000)
    manifest = read_manifest(tsv)
    full_labels = read_labels(km, manifest)
    kept = [j for j, n in enumerate(manifest.sizes) if n >= 33000]
    assert len(kept) == len(LENGTHS["train"]) - 1  # 32001 is the only one under 33000
    messages = [r.getMessage() for r in caplog.records if r.name == "mt4ssl.data.dataset"]
    assert messages == [f"{tsv}: skipped 1 of 6 utterances shorter than 33000 samples"]

    assert len(ds) == len(kept) and ds.num_classes("mfcc8") == 8 and ds.label_names == ("mfcc8",)
    np.testing.assert_array_equal(ds.sizes, [min(manifest.sizes[j], 48000) for j in kept])
    assert sum(manifest.sizes[j] > 48000 for j in kept) == 2  # two are cropped
    for i, j in enumerate(kept):
        item = ds[i]
        n = min(manifest.sizes[j], 48000)
        audio, sr = sf.read(manifest.root / manifest.files[j], dtype="float32")
        assert item["id"] == i and sr == 16000
        assert item["wav"].dtype == torch.float32 and item["wav"].shape == (n,)
        np.testing.assert_array_equal(item["wav"].numpy(), audio[:n])
        lab = item["labels"]["mfcc8"]
        assert lab.dtype == torch.int64 and lab.shape == (frames(n),)
        np.testing.assert_array_equal(lab.numpy(), full_labels[j][:frames(n)])
        assert ds.where(i) == f"{tsv}:{j + 2} ({manifest.files[j]})"
    with pytest.raises(KeyError, match="no label set 'hubert500'"):
        ds.num_classes("hubert500")


def test_no_labels_and_nothing_skipped_logs_nothing(corpus, caplog):
    caplog.set_level(logging.INFO, logger="mt4ssl.data.dataset")
    ds = PretrainDataset(corpus[0])
    assert len(ds) == 6 and ds[0]["labels"] == {} and not caplog.records


def test_bad_label_files_fail_at_construction_naming_the_file(corpus, tmp_path):
    tsv, km = corpus
    lines = km.read_text().splitlines()
    bad = tmp_path / "bad" / "train.km"
    bad.parent.mkdir()
    (bad.parent / "dict.km.txt").write_text((km.parent / "dict.km.txt").read_text())
    bad.write_text("\n".join(lines[:2] + [lines[2].rsplit(" ", 1)[0]] + lines[3:]) + "\n")
    with pytest.raises(InputError, match=rf"{bad}:3 \(.*\): {len(lines[2].split()) - 1} labels, "
                                         rf"but the model has {len(lines[2].split())} frames"):
        PretrainDataset(tsv, {"good": km, "bad": bad})
    bad.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match=rf"{bad}: 5 lines, but {tsv} has 6 entries"):
        PretrainDataset(tsv, {"bad": bad})


def test_impossible_length_limits_are_input_errors(corpus):
    with pytest.raises(InputError, match="min_samples=50000 is larger than max_samples=40000"):
        PretrainDataset(corpus[0], min_samples=50000, max_samples=40000)
    with pytest.raises(InputError, match="max_samples=399: must be at least 400"):
        PretrainDataset(corpus[0], min_samples=0, max_samples=399)
    with pytest.raises(InputError, match="every utterance is shorter than min_samples=60000"):
        PretrainDataset(corpus[0], min_samples=60000, max_samples=320000)


def synthetic_items(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": 10 + b, "wav": torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
             "labels": {"a": torch.from_numpy(rng.integers(0, 100, frames(n))),
                        "b": torch.from_numpy(rng.integers(0, 7, frames(n)))}}
            for b, n in enumerate(lengths)]


def test_crop_collate_keeps_each_frame_with_its_label():
    lengths = [16719, 12345, 20000]
    items = synthetic_items(lengths)
    batch = collate(items, mode="crop")
    m = min(lengths)
    t = frames(m)
    assert batch["padding_mask"] is None and batch["samples"] == 3 * m
    assert batch["ids"].tolist() == [10, 11, 12] and batch["ids"].dtype == torch.int64
    assert batch["wav"].shape == (3, m) and batch["wav"].dtype == torch.float32
    for name in ("a", "b"):
        assert batch["labels"][name].shape == (3, t) and batch["labels"][name].dtype == torch.int64
    for b, item in enumerate(items):
        torch.testing.assert_close(batch["wav"][b], item["wav"][:m], rtol=0, atol=0)
        for name in ("a", "b"):
            assert batch["labels"][name][b].tolist() == item["labels"][name][:t].tolist()
    # Why label t stays right: the CNN frames of the crop are the first t frames of the whole
    # utterance (with per-frame LayerNorm, frame t only sees samples [320t, 320t + 400)).
    torch.manual_seed(0)
    cnn = ConvFeatureEncoder(mode="layer_norm").eval()
    with torch.no_grad():
        whole = cnn(items[2]["wav"][None])
        cropped = cnn(batch["wav"][2:3])
    assert cropped.shape[-1] == t
    torch.testing.assert_close(cropped, whole[..., :t], rtol=1e-4, atol=1e-4)


def test_bucket_length_rounds_down_to_a_multiple():
    assert [bucket_length(n, 4000) for n in (3999, 4000, 4001, 7999, 8000, 320000)] == \
        [3999, 4000, 4000, 4000, 8000, 320000]
    assert bucket_length(12345, 1) == 12345
    with pytest.raises(ValueError):
        bucket_length(100, 0)
    # between 2 s and 20 s, 250 ms buckets leave at most 73 crop lengths, whatever the data
    rng = np.random.default_rng(0)
    assert len({bucket_length(int(n), 4000) for n in rng.integers(32000, 320001, 5000)}) <= 73


def test_crop_collate_rounds_the_crop_down_to_the_multiple():
    lengths = [16719, 12345, 20000]
    items = synthetic_items(lengths)
    batch = collate(items, mode="crop", crop_multiple=4000)
    m = 12000
    assert batch["wav"].shape == (3, m) and batch["samples"] == 3 * m
    for b, item in enumerate(items):
        torch.testing.assert_close(batch["wav"][b], item["wav"][:m], rtol=0, atol=0)
        assert batch["labels"]["a"][b].tolist() == item["labels"]["a"][:frames(m)].tolist()
    assert collate(items, mode="pad", crop_multiple=4000)["wav"].shape == (3, 20000)  # "pad": unchanged


def test_pad_collate_pads_waveforms_masks_and_labels():
    lengths = [16719, 12345, 20000]
    items = synthetic_items(lengths)
    batch = collate(items, mode="pad")
    s = max(lengths)
    t = frames(s)
    assert batch["wav"].shape == (3, s) and batch["samples"] == sum(lengths)
    mask = batch["padding_mask"]
    assert mask.dtype == torch.bool and mask.shape == (3, s)
    for b, (item, n) in enumerate(zip(items, lengths)):
        assert not mask[b, :n].any() and mask[b, n:].all()
        torch.testing.assert_close(batch["wav"][b, :n], item["wav"], rtol=0, atol=0)
        assert not batch["wav"][b, n:].any()
        for name in ("a", "b"):
            lab = batch["labels"][name]
            assert lab.shape == (3, t)
            assert lab[b, :frames(n)].tolist() == item["labels"][name].tolist()
            assert not lab[b, frames(n):].any()
    # the model's frame padding covers exactly the frames that got padded labels
    frame_pad = frame_padding_mask(mask, t)
    assert [int((~frame_pad[b]).sum()) for b in range(3)] == [frames(n) for n in lengths]
    same = collate(synthetic_items([16000, 16000]), mode="pad")
    assert same["padding_mask"] is None and same["wav"].shape == (2, 16000)
    with pytest.raises(ValueError, match="collate mode must be one of"):
        collate(items, mode="trim")


def test_utterance_longer_than_max_tokens_names_its_manifest_line(corpus):
    tsv, _ = corpus
    ds = PretrainDataset(tsv, max_samples=50000)
    manifest = read_manifest(tsv)
    j = int(np.argmax(manifest.sizes))  # 57603 samples, cropped to 50000; 48319 is also too long
    with pytest.raises(InputError, match=rf"{tsv}:{j + 2} \({manifest.files[j]}\): 50000 samples, "
                                         r"more than max_tokens=45000 \(and 1 more\)"):
        BucketBatchSampler(ds.sizes, 45000, where=ds.where)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_dataset_sampler_dataloader_end_to_end(corpus, mode):
    tsv, km = corpus
    ds = PretrainDataset(tsv, {"mfcc8": km}, min_samples=32000, max_samples=48000)
    reference = [ds[i] for i in range(len(ds))]
    max_tokens = 100000
    seen = Counter()
    counts = []
    for rank in range(2):
        sampler = BucketBatchSampler(ds.sizes, max_tokens, seed=7, rank=rank, world_size=2,
                                     where=ds.where)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=2,
                            collate_fn=partial(collate, mode=mode))
        batches = list(sampler.counted(loader))
        counts.append(len(batches))
        assert sampler.epoch == 1  # the whole epoch was taken
        for batch in batches:
            ids = batch["ids"].tolist()
            seen.update(ids)
            lengths = [len(reference[i]["wav"]) for i in ids]
            assert len(ids) * max(lengths) <= max_tokens
            s = min(lengths) if mode == "crop" else max(lengths)
            assert batch["wav"].shape == (len(ids), s)
            assert batch["labels"]["mfcc8"].shape == (len(ids), frames(s))
            assert batch["samples"] == (len(ids) * s if mode == "crop" else sum(lengths))
            for b, i in enumerate(ids):
                n = min(s, lengths[b])
                torch.testing.assert_close(batch["wav"][b, :n], reference[i]["wav"][:n], rtol=0, atol=0)
                assert (batch["labels"]["mfcc8"][b, :frames(n)].tolist()
                        == reference[i]["labels"]["mfcc8"][:frames(n)].tolist())
    assert counts[0] == counts[1] > 0
    assert seen == Counter(range(len(ds)))  # every utterance once over the two ranks
