"""The project's checkpoint format, `mt4ssl convert fairseq` and `mt4ssl extract`."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mt4ssl.cli import main
from mt4ssl.config import config_from_dict, config_to_dict
from mt4ssl.data.labels import read_labels
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.features.dump import load_shard
from mt4ssl.models import checkpoint
from mt4ssl.models.cnn import num_frames
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from tests.conftest import small_model_config

CONV = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"


def small(**kw) -> ModelConfig:
    return small_model_config(dim=32, classes=12, **kw)


def states(model, wav):
    with torch.no_grad():
        return model.eval().extract_features(wav)[0]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MT4SSL(small())
    model.update_targets(5)
    checkpoint.save_checkpoint(tmp_path / "m.pt", model, note="x")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # no code is unpickled
    assert raw["format"] == "mt4ssl" and raw["note"] == "x"
    loaded = checkpoint.load_model(tmp_path / "m.pt")
    assert loaded.cfg == model.cfg
    wav = torch.randn(1, 8000)
    for a, b in zip(states(model, wav), states(loaded, wav)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    model = MT4SSL(small())
    checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    before = (tmp_path / "m.pt").read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    assert (tmp_path / "m.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_bad_checkpoints_and_config_keys(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.pt: not an mt4ssl checkpoint"):
        checkpoint.load_model(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt: not an mt4ssl checkpoint"):
        checkpoint.load_model(tmp_path / "other.pt")
    data = config_to_dict(small())
    data["teacher"]["topk"] = 3
    with pytest.raises(InputError, match=r"model_config\.teacher: unknown key\(s\) \['topk'\]"):
        config_from_dict(ModelConfig, data, "model_config")


def fairseq_model_cfg(name, cfg: ModelConfig):
    return {
        "_name": name, "extractor_mode": cfg.extractor_mode, "conv_feature_layers": CONV,
        "encoder_embed_dim": cfg.embed_dim, "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_attention_heads": cfg.num_heads, "encoder_layers": cfg.num_layers,
        "conv_pos": cfg.pos_conv_kernel * (cfg.pos_conv_depth if cfg.pos_conv_depth > 1 else 1),
        "pos_conv_depth": cfg.pos_conv_depth, "conv_pos_groups": cfg.pos_conv_groups,
        "layer_norm_first": False, "instance_norm_target_layer": True, "average_top_k_layers": 2,
        "ema_decay": 0.999, "ema_end_decay": 0.9999, "ema_anneal_end_step": "${optimization.max_update}",
        "encoder_layerdrop": 0.05, "mask_prob": 0.65, "mask_length": 10,
    }


def test_convert_official_mt4ssl_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    ours = MT4SSL(small())
    for step in range(3):  # the teacher drifts away from a plain copy of the student
        for p in ours.encoder.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
        ours.update_targets(step)
    sd = ours.state_dict()
    fairseq_sd = {k: v for k, v in sd.items() if not k.startswith("targets.")}
    fairseq_sd["final_proj.weight"] = sd["targets.teacher.head.weight"]
    fairseq_sd["final_proj.bias"] = sd["targets.teacher.head.bias"]
    specials = torch.randn(4, ours.cfg.embed_dim)
    fairseq_sd["final_proj_hubert.weight"] = torch.cat([specials, sd["targets.kmeans.heads.km.weight"]])
    fairseq_sd["final_proj_hubert.bias"] = torch.cat([torch.randn(4), sd["targets.kmeans.heads.km.bias"]])
    fairseq_sd["_ema"] = {k[len("targets.teacher.ema."):]: v for k, v in sd.items()
                          if k.startswith("targets.teacher.ema.")}
    cfg = OmegaConf.create({"model": fairseq_model_cfg("multi2vec", ours.cfg),
                            "optimization": {"max_update": 1234}, "task": {"normalize": True}})
    torch.save({"cfg": cfg, "model": fairseq_sd, "optimizer_history": []}, tmp_path / "fs.pt")

    assert main(["convert", "fairseq", str(tmp_path / "fs.pt"), str(tmp_path / "ours.pt")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["convert", "fairseq", str(tmp_path / "fs.pt"), str(tmp_path / "ours.pt"),
                 "--trust-pickle"]) == 0
    out = capsys.readouterr().out
    assert "nothing left out" in out and "targets ['kmeans', 'teacher']" in out

    converted = checkpoint.load_model(tmp_path / "ours.pt")
    assert converted.cfg.kmeans.num_classes == (12,) and converted.cfg.teacher.ema_anneal_updates == 1234
    assert converted.cfg.pos_conv_kernel == ours.cfg.pos_conv_kernel and converted.cfg.pos_conv_depth == 5
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=key)
    wav = torch.randn(2, 9000)
    for a, b in zip(states(ours, wav), states(converted, wav)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_hubert_leaves_out_its_cosine_head(tmp_path, capsys):
    torch.manual_seed(2)
    ours = MT4SSL(small(extractor_mode="default", pos_conv_depth=1, pos_conv_kernel=16, targets=(),
                        normalize=False))
    sd = dict(ours.state_dict())
    sd["final_proj.weight"] = torch.randn(8, ours.cfg.embed_dim)
    sd["final_proj.bias"] = torch.randn(8)
    sd["label_embs_concat"] = torch.randn(12, 8)
    # newer torch stores weight norm as parametrizations
    sd["encoder.pos_conv.0.parametrizations.weight.original0"] = sd.pop("encoder.pos_conv.0.weight_g")
    sd["encoder.pos_conv.0.parametrizations.weight.original1"] = sd.pop("encoder.pos_conv.0.weight_v")
    model_cfg = fairseq_model_cfg("hubert", ours.cfg)
    model_cfg.update(conv_pos=16, pos_conv_depth=1, ema_anneal_end_step=0)
    torch.save({"cfg": {"model": model_cfg, "task": {"normalize": False}}, "model": sd}, tmp_path / "hubert.pt")
    assert main(["convert", "fairseq", str(tmp_path / "hubert.pt"), str(tmp_path / "ours.pt"),
                 "--trust-pickle"]) == 0
    out = capsys.readouterr().out
    assert "left out: final_proj.weight, final_proj.bias, label_embs_concat" in out
    converted = checkpoint.load_model(tmp_path / "ours.pt")
    assert converted.cfg.targets == () and not converted.cfg.normalize
    wav = torch.randn(1, 7000)
    for a, b in zip(states(ours, wav), states(converted, wav)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_refuses_unknown_models_and_pre_ln(tmp_path, capsys):
    for model_cfg, message in [({"_name": "wav2vec_ctc"}, "only ('data2vec_audio', 'hubert', 'multi2vec')"),
                               ({"_name": "data2vec_audio", "layer_norm_first": True}, "pre-LN")]:
        torch.save({"cfg": {"model": model_cfg}, "model": {}}, tmp_path / "x.pt")
        assert main(["convert", "fairseq", str(tmp_path / "x.pt"), str(tmp_path / "o.pt")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_extract_file_and_manifest_then_second_iteration_labels(libri_tree, tmp_path, capsys):
    torch.manual_seed(3)
    model = MT4SSL(small())
    checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    m = tmp_path / "manifests"
    assert main(["manifest", str(libri_tree), "--out", str(m), "--splits", "train"]) == 0
    manifest = read_manifest(m / "train.tsv")

    # one audio file -> (layers, frames, dim)
    audio = manifest.audio_path(0)
    assert main(["extract", str(tmp_path / "m.pt"), str(audio), "--out", str(tmp_path / "one")]) == 0
    got = np.load(tmp_path / "one" / f"{audio.stem}.npy")
    want = states(model, torch.from_numpy(manifest.read(0))[None])
    assert got.shape == (4, num_frames(manifest.sizes[0]), 32)
    np.testing.assert_allclose(got, torch.stack(want)[:, 0].numpy(), rtol=1e-5, atol=1e-5)

    # a manifest -> per-layer shards, then k-means + labels at 50 Hz with no rate reduction
    feats = tmp_path / "feats"
    assert main(["extract", str(tmp_path / "m.pt"), str(m / "train.tsv"), "--out", str(feats),
                 "--layers", "1", "3", "--nshard", "2", "--all-shards"]) == 0
    shard = load_shard(feats / "layer3", "train", 1, 2)
    assert shard.meta["rate"] == 50 and shard.lens[-1] == num_frames(manifest.sizes[-1])
    np.testing.assert_allclose(shard.feats[-shard.lens[-1]:],
                               states(model, torch.from_numpy(manifest.read(len(manifest) - 1))[None])[3][0].numpy(),
                               rtol=1e-5, atol=1e-5)
    assert main(["kmeans", str(feats / "layer1"), "train", str(tmp_path / "km.npz"), "--nshard", "2",
                 "-k", "4", "--fraction", "1"]) == 0
    assert main(["labels", str(feats / "layer1"), "train", str(tmp_path / "km.npz"), "--nshard", "2",
                 "--manifest-dir", str(m), "--out", str(tmp_path / "lab")]) == 0
    labels = read_labels(tmp_path / "lab" / "train.km", manifest)
    assert [len(x) for x in labels] == [num_frames(n) for n in manifest.sizes]

    assert main(["extract", str(tmp_path / "m.pt"), str(audio), "--out", str(tmp_path / "x"),
                 "--layers", "4"]) == 2
    assert "--layers [4]: this model has layers 0..3" in capsys.readouterr().err
