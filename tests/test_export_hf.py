"""`mt4ssl export hf`: the folder loads with transformers' own classes and computes the
project's hidden states; it converts back to the same weights; unsupported configs, foreign
files and occupied destinations are clear errors that write nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mt4ssl.cli import main
from mt4ssl.errors import InputError
from mt4ssl.export import hf as export_hf
from mt4ssl.models.checkpoint import load_model, save_checkpoint
from mt4ssl.models.cnn import num_frames
from mt4ssl.models.convert import convert_hf
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from tests.conftest import small_model_config

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

# geometry -> (ModelConfig overrides, transformers class, feat_extract_norm or None)
GEOMETRIES = {
    # data2vec-audio / MT4SSL: LayerNorm CNN, 5 stacked positional convs, normalized input
    "data2vec": (dict(), "Data2VecAudioModel", None),
    # HuBERT Base: GroupNorm CNN, one weight-normed positional conv (even kernel), raw input
    "hubert": (dict(extractor_mode="default", pos_conv_depth=1, pos_conv_kernel=16, normalize=False,
                    conv_bias=True), "HubertModel", "group"),
    # HuBERT Large's CNN (LayerNorm) with an odd positional kernel, normalized input
    "hubert_ln": (dict(extractor_mode="layer_norm", pos_conv_depth=1, pos_conv_kernel=15), "HubertModel",
                  "layer"),
}
LENGTHS = [8000, 5000, 6403]


def random_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A small model whose every parameter (LayerNorm gains and biases included) is random, so
    that any two swapped weights would show in the outputs."""
    torch.manual_seed(seed)
    model = MT4SSL(small_model_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():  # gains and biases off 1 and 0, every matrix perturbed
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def exported(request, tmp_path_factory):
    """(geometry, checkpoint, exported folder) through the command line."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    ckpt = random_checkpoint(root / "model.pt", **GEOMETRIES[request.param][0])
    out = root / "hf"
    assert main(["export", "hf", str(ckpt), str(out)]) == 0
    return request.param, ckpt, out


def waveforms(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # a DC offset and unequal loudness, so that do_normalize matters
    return [(0.05 + 0.3 * (i + 1) * rng.standard_normal(n)).astype(np.float32) for i, n in enumerate(LENGTHS)]


def padded(wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(w) for w in wavs)
    wav = torch.zeros(len(wavs), T)
    for i, w in enumerate(wavs):
        wav[i, : len(w)] = torch.from_numpy(w)
    pad = torch.arange(T)[None, :] >= torch.tensor([len(w) for w in wavs])[:, None]
    return wav, pad


def test_folder_layout_and_config(exported):
    geometry, ckpt, out = exported
    _, cls, norm = GEOMETRIES[geometry]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary left beside it
    config = json.loads((out / "config.json").read_text())
    cfg = load_model(ckpt).cfg
    assert config["architectures"] == [cls]
    assert config["hidden_size"] == cfg.embed_dim and config["num_hidden_layers"] == cfg.num_layers
    assert config["conv_dim"] == [d for d, _, _ in cfg.conv_layers]
    if norm is not None:
        assert config["feat_extract_norm"] == norm and config["do_stable_layer_norm"] is False
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    assert pre["do_normalize"] is cfg.normalize and pre["return_attention_mask"] is True
    assert pre["sampling_rate"] == 16000
    with safetensors.safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("targets") for k in keys) and "masked_spec_embed" in keys


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_transformers_hidden_states_equal_ours(exported, loader):
    geometry, ckpt, out = exported
    cls = getattr(transformers, GEOMETRIES[geometry][1])
    if loader == "class":
        hf, info = cls.from_pretrained(out, local_files_only=True, output_loading_info=True)
        assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched weight
        extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(out, local_files_only=True)
    else:
        hf = transformers.AutoModel.from_pretrained(out, local_files_only=True)
        assert type(hf) is cls
        extractor = transformers.AutoFeatureExtractor.from_pretrained(out, local_files_only=True)
    hf.eval()
    ours = load_model(ckpt)
    wavs = waveforms()

    # a padded batch of different lengths, prepared by the exported feature extractor from the
    # raw waveforms; ours gets the same raw waveforms and the padding mask
    inputs = extractor(wavs, sampling_rate=16000, padding=True, return_tensors="pt")
    assert inputs["attention_mask"].sum(1).tolist() == LENGTHS
    wav, pad = padded(wavs)
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
        states, frame_pad = ours.extract_features(wav, pad)
    assert len(ref.hidden_states) == len(states) == ours.cfg.num_layers + 1
    valid = ~frame_pad
    assert valid.sum(1).tolist() == [num_frames(n) for n in LENGTHS]
    diffs = [(a - b)[valid].abs().max().item() for a, b in zip(ref.hidden_states, states, strict=True)]
    print(f"{geometry} ({loader}) padded batch, max abs diff per hidden state: {diffs}")
    assert max(diffs) < 1e-4
    assert states[-1][valid].abs().mean() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(ref.last_hidden_state[valid], states[-1][valid], atol=1e-4, rtol=0)

    # one utterance alone, no padding anywhere
    one = extractor(wavs[2], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**one, output_hidden_states=True)
        states, frame_pad = ours.extract_features(torch.from_numpy(wavs[2])[None])
    assert frame_pad is None
    diffs = [(a - b).abs().max().item() for a, b in zip(ref.hidden_states, states, strict=True)]
    assert max(diffs) < 1e-4, diffs


def test_round_trip_through_convert_hf_gives_equal_weights(exported, tmp_path):
    geometry, ckpt, out = exported
    original = load_model(ckpt)
    back = convert_hf(out)  # the existing HF -> mt4ssl converter
    for field in ("conv_layers", "extractor_mode", "conv_bias", "embed_dim", "ffn_dim", "num_heads",
                  "num_layers", "pos_conv_depth", "pos_conv_kernel", "pos_conv_groups"):
        assert getattr(back.cfg, field) == getattr(original.cfg, field), field
    theirs = back.state_dict()
    ours = {k: v for k, v in original.state_dict().items() if not k.startswith("targets.")}
    assert set(theirs) == set(ours)
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, unequal
    # and through the command line, into a checkpoint that loads like any other
    assert main(["convert", "hf", str(out), str(tmp_path / "back.pt")]) == 0
    again = load_model(tmp_path / "back.pt").state_dict()
    assert all(torch.equal(again[k], ours[k]) for k in ours)


# ---------------------------------------------------------------------------- errors


def _nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in parent.iterdir())


def test_unsupported_config_is_an_error_naming_the_setting(tmp_path, capsys):
    # HuBERT's GroupNorm CNN with data2vec's stacked positional convs: no transformers class
    ckpt = random_checkpoint(tmp_path / "mixed.pt", extractor_mode="default", pos_conv_depth=5)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "mt4ssl export: error:" in err and "extractor_mode='default'" in err and "pos_conv_depth=5" in err
    assert _nothing_written(tmp_path, out)


def test_a_setting_the_exporter_does_not_know_is_an_error():
    # a field added to ModelConfig later (say a pre-LN switch) must not be exported silently
    Extended = dataclasses.make_dataclass("Extended", [("layer_norm_first", bool, False)],
                                          bases=(ModelConfig,), frozen=True)
    with pytest.raises(InputError, match="layer_norm_first=False: no known transformers equivalent"):
        export_hf.hf_config_kwargs(Extended(**dataclasses.asdict(small_model_config())))


def test_not_an_mt4ssl_file_is_an_error(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)  # loads safely, but no format marker
    for src in (text, foreign, tmp_path / "missing.pt"):
        out = tmp_path / f"hf_{src.stem}"
        assert main(["export", "hf", str(src), str(out)]) == 2
        err = capsys.readouterr().err
        assert str(src) in err and ("not an mt4ssl checkpoint" in err or "not found" in err), err
        assert _nothing_written(tmp_path, out)


def test_destination_rules_and_atomic_replace(tmp_path, capsys, monkeypatch):
    ckpt = random_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "hf"
    out.mkdir()
    assert main(["export", "hf", str(ckpt), str(out)]) == 0  # an empty folder is fine
    first = (out / "model.safetensors").read_bytes()

    assert main(["export", "hf", str(ckpt), str(out)]) == 2  # not empty, no --force
    assert "not empty (use --force" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["export", "hf", str(ckpt), str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err

    # a failure half-way through writing leaves the previous export as it was, and no temporary
    (out / "README.md").write_text("mine")
    other = random_checkpoint(tmp_path / "other.pt", seed=1)

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "preprocessor_config.json").write_text("{")  # half-written
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(transformers.Wav2Vec2FeatureExtractor, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            main(["export", "hf", str(other), str(out), "--force"])
    assert (out / "model.safetensors").read_bytes() == first and (out / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "model.pt", "other.pt"]

    assert main(["export", "hf", str(other), str(out), "--force"]) == 0  # replaced as a whole
    assert not (out / "README.md").exists() and (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "model.pt", "other.pt"]
    assert transformers.AutoModel.from_pretrained(out, local_files_only=True) is not None


# ---------------------------------------------------------------------------- fine-tuned CTC models

LETTERS = tuple("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")  # fairseq's dict.ltr.txt order


def ctc_checkpoint(path: Path, seed: int = 0, symbols=LETTERS, **overrides) -> Path:
    from mt4ssl.finetune.ctc import Dictionary
    from mt4ssl.finetune.model import CTCModel, save_ctc_model

    torch.manual_seed(seed)
    dictionary = Dictionary.from_symbols(symbols)
    model = CTCModel(small_model_config(**overrides), len(dictionary), final_dropout=0.1)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(1 + 0.1 * torch.randn_like(p))
        # a head whose per-frame argmax varies: its bias centres each token's logit on the test
        # waveforms (blank and `|` a little above), so blanks, letters and word boundaries occur
        model.proj.weight.normal_(0.0, 1.0)
        model.proj.bias.zero_()
        wav, pad = padded(waveforms(seed=3))
        logits, frame_pad = model.eval()(wav, pad)
        model.proj.bias.copy_(-logits[~frame_pad].mean(0))
        model.proj.bias[dictionary.blank] += 0.5 * logits[~frame_pad].std(0).mean()
        if "|" in dictionary:
            model.proj.bias[dictionary.encode("|")[0]] += 0.5 * logits[~frame_pad].std(0).mean()
    save_ctc_model(path, model, dictionary)
    return path


def letters_to_text(tokens: list[str]) -> str:
    """fairseq's letter post-processing of a decoded token sequence (`|` = word boundary)."""
    return "".join(tokens).replace("|", " ").strip()


@pytest.fixture(scope="module", params=["data2vec", "hubert"])
def exported_ctc(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export_ctc_{request.param}")
    ckpt = ctc_checkpoint(root / "ctc.pt", **GEOMETRIES[request.param][0])
    out = root / "hf"
    assert main(["export", "hf", str(ckpt), str(out)]) == 0
    return request.param, ckpt, out


def test_ctc_folder_loads_as_transformers_ctc_model_with_processor(exported_ctc):
    from mt4ssl.finetune.model import load_ctc_model

    geometry, ckpt, out = exported_ctc
    base = GEOMETRIES[geometry][1]
    cls = getattr(transformers, base.replace("Model", "ForCTC"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
    hf, info = cls.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert type(transformers.AutoModelForCTC.from_pretrained(out, local_files_only=True)) is cls
    processor = transformers.AutoProcessor.from_pretrained(out, local_files_only=True)
    assert isinstance(processor, transformers.Wav2Vec2Processor)
    assert isinstance(processor.tokenizer, transformers.Wav2Vec2CTCTokenizer)
    assert isinstance(transformers.AutoFeatureExtractor.from_pretrained(out, local_files_only=True),
                      transformers.Wav2Vec2FeatureExtractor)

    ours, dictionary = load_ctc_model(ckpt)
    tokenizer = processor.tokenizer
    # the vocabulary is the project's dictionary index for index; blank = pad = id 0
    assert tokenizer.get_vocab() == {s: i for i, s in enumerate(dictionary.symbols)}
    assert len(tokenizer) == len(dictionary) == hf.config.vocab_size
    assert tokenizer.pad_token_id == hf.config.pad_token_id == dictionary.blank == 0
    assert tokenizer.word_delimiter_token == "|"
    assert processor.feature_extractor.do_normalize is ours.encoder.cfg.normalize
    assert processor.feature_extractor.return_attention_mask is True

    hf.eval()
    wavs = waveforms(seed=3)
    inputs = processor(wavs, sampling_rate=16000, padding=True, return_tensors="pt")
    wav, pad = padded(wavs)
    with torch.no_grad():
        ref = hf(**inputs).logits
        logits, frame_pad = ours(wav, pad)
    valid = ~frame_pad
    lengths = valid.sum(1).tolist()
    assert lengths == [num_frames(n) for n in LENGTHS]
    diff = (ref - logits)[valid].abs().max().item()
    print(f"{geometry} CTC logits, padded batch: max abs diff {diff:.2e} (logit std {logits[valid].std():.2f})")
    assert diff < 1e-4
    torch.testing.assert_close(ref[valid].argmax(-1), logits[valid].argmax(-1), rtol=0, atol=0)

    # greedy decoding: transformers' tokenizer on the per-frame argmax == the project's greedy decode
    from mt4ssl.finetune.ctc import greedy_decode

    ours_text = [letters_to_text(dictionary.decode(ids)) for ids in greedy_decode(logits, lengths)]
    best = ref.argmax(-1)
    hf_text = processor.batch_decode([best[b, :n].tolist() for b, n in enumerate(lengths)])
    print(f"{geometry} greedy: {hf_text}")
    assert hf_text == ours_text
    # the paths really exercise the decoding: blanks, repeated frames and word boundaries occur
    paths = [best[b, :n].tolist() for b, n in enumerate(lengths)]
    assert any(i == 0 for path in paths for i in path)
    assert any(a == b != 0 for path in paths for a, b in zip(path, path[1:]))
    assert sum(t.count(" ") for t in ours_text) >= 1
    # and a hand-made path: repeats merge, a blank keeps a doubled letter, `| |` and edges
    blank, ids = dictionary.blank, {s: i for i, s in enumerate(dictionary.symbols)}
    path = [blank, ids["|"]] + [ids[c] if c != "_" else blank for c in "TT_HHEE||_LL_LOO_O_K|"] + [blank]
    hand = letters_to_text(dictionary.decode(greedy_decode(torch.eye(len(dictionary))[path][None])[0]))
    assert hand == "THE LLOOK"
    assert processor.batch_decode([path]) == [hand]
    # and a text goes through the tokenizer into the dictionary's ids
    assert tokenizer("THE CAT").input_ids == dictionary.encode(list("THE|CAT"))


def test_ctc_round_trip_of_the_encoder(exported_ctc):
    from mt4ssl.finetune.model import load_ctc_model

    _, ckpt, out = exported_ctc
    ours, _ = load_ctc_model(ckpt)
    hf = transformers.AutoModelForCTC.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(hf.lm_head.weight, ours.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(hf.lm_head.bias, ours.proj.bias, rtol=0, atol=0)
    assert hf.config.final_dropout == pytest.approx(0.1)


def test_ctc_dictionary_transformers_cannot_tokenize_is_an_error(tmp_path, capsys):
    # phones: multi-character symbols and no word delimiter
    ckpt = ctc_checkpoint(tmp_path / "phones.pt", symbols=("AH", "B", "SIL"))
    out = tmp_path / "hf"
    assert main(["export", "hf", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "'AH'" in err and "single non-space character" in err
    assert _nothing_written(tmp_path, out)
    ckpt = ctc_checkpoint(tmp_path / "nodelim.pt", symbols=tuple("ABC"))
    assert main(["export", "hf", str(ckpt), str(out)]) == 2
    assert "no word delimiter '|'" in capsys.readouterr().err
    assert _nothing_written(tmp_path, out)


def test_ctc_unsupported_encoder_config_is_an_error(tmp_path, capsys):
    ckpt = ctc_checkpoint(tmp_path / "mixed.pt", extractor_mode="default", pos_conv_depth=5)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(ckpt), str(out)]) == 2
    assert "extractor_mode='default' with pos_conv_depth=5" in capsys.readouterr().err
    assert _nothing_written(tmp_path, out)
