"""CTC pieces, the phone probe, and the demo table / curve tools."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from mt4ssl.data.manifest import write_split
from mt4ssl.errors import InputError
from mt4ssl.finetune import ctc
from mt4ssl.probes import ctc as probe
from mt4ssl.models.checkpoint import save_checkpoint
from mt4ssl.models.mt4ssl import MT4SSL, model_config
from mt4ssl.targets import TeacherConfig
from tests.conftest import WORDS, write_tree
from tools import demo_table, plot_curves

# --------------------------------------------------------------------------- ctc.py


def test_dictionary_blank_first_encode_decode():
    d = ctc.Dictionary.from_symbols(["a", "b", "c"])
    assert d.symbols == ("<blank>", "a", "b", "c") and d.blank == 0 and len(d) == 4
    assert d.encode(["c", "a", "a"]) == [3, 1, 1]
    assert d.decode([3, 0, 1, 1]) == ["c", "a", "a"]  # blanks dropped, no collapse
    with pytest.raises(KeyError, match="'z'"):
        d.encode(["a", "z"])
    with pytest.raises(KeyError):
        d.encode(["<blank>"])
    with pytest.raises(ValueError, match="reserved"):
        ctc.Dictionary.from_symbols(["a", "<blank>"])
    with pytest.raises(ValueError, match="duplicate"):
        ctc.Dictionary.from_symbols(["a", "a"])


def test_collapse_and_greedy_decode():
    a, b, _ = 1, 2, 0
    assert ctc.collapse([a, a, _, a, b, b]) == [a, a, b]
    assert ctc.collapse([_, _, _]) == []
    assert ctc.collapse([b, _, _, b, b, a, _]) == [b, b, a]
    # best paths [a a _ a b b] and [b b 0 ...padding]: padding frames must be ignored
    paths = torch.tensor([[a, a, _, a, b, b], [b, b, _, a, a, a]])
    logits = torch.nn.functional.one_hot(paths, 3).float() * 5
    assert ctc.greedy_decode(logits, [6, 3]) == [[a, a, b], [b]]
    assert ctc.greedy_decode(logits) == [[a, a, b], [b, a]]


@pytest.mark.parametrize("use_dp", [True, False])
def test_edit_distance_and_error_rate(monkeypatch, use_dp):
    if use_dp:
        monkeypatch.setattr(ctc, "_editdistance", None)
    assert ctc.edit_distance(list("kitten"), list("sitting")) == 3  # 2 substitutions + 1 insertion
    assert ctc.edit_distance([], list("abc")) == 3
    assert ctc.edit_distance(list("abc"), []) == 3
    assert ctc.edit_distance(list("abc"), list("abc")) == 0
    assert ctc.edit_distance(["AH", "B"], ["B", "AH"]) == 2
    # (1 deletion) + (1 insertion) over 4 reference tokens
    assert ctc.error_rate([["a", "b", "c"], ["d"]], [["a", "c"], ["d", "e"]]) == 0.5
    # word level: one substitution in 6 words
    ref, hyp = "THE CAT SAT ON THE MAT".split(), "THE CAT SAT IN THE MAT".split()
    assert ctc.error_rate([ref], [hyp]) == pytest.approx(1 / 6)
    assert ctc.error_rate([[1, 2]], [[3, 4, 5, 6]]) == 2.0  # can exceed 1
    with pytest.raises(ValueError):
        ctc.error_rate([[]], [["a"]])
    with pytest.raises(ValueError):
        ctc.error_rate([["a"]], [])


# --------------------------------------------------------------------------- targets


def test_lexicon_strips_stress_and_names_bad_lines(tmp_path):
    lex = tmp_path / "lexicon.txt"
    lex.write_text("HELLO\tHH AH0 L OW1\nworld  W ER1 L D\nHELLO\tHH EH0 L OW1\n\n")  # first entry wins
    lexicon = probe.read_lexicon(lex)
    assert lexicon == {"HELLO": ("HH", "AH", "L", "OW"), "WORLD": ("W", "ER", "L", "D")}
    assert len(probe.PHONE_DICT) == 40 and probe.PHONE_DICT.blank == 0

    lex.write_text("HELLO\tHH AH0 L OW1\nBAD\tB AX1 D\n")
    with pytest.raises(InputError, match=rf"{lex}:2: AX1 not among the 39"):
        probe.read_lexicon(lex)
    lex.write_text("LONELY\n")
    with pytest.raises(InputError, match=rf"{lex}:1: expected 'WORD<TAB>PHONES'"):
        probe.read_lexicon(lex)


def test_phone_targets_unknown_word_names_wrd_line(tmp_path):
    lexicon = {"HELLO": ("HH", "AH", "L", "OW"), "WORLD": ("W", "ER", "L", "D")}
    wrd = tmp_path / "train.wrd"
    wrd.write_text("HELLO WORLD\nWORLD\n")
    assert probe.phone_targets(wrd, lexicon, 2) == [
        ["HH", "AH", "L", "OW", "W", "ER", "L", "D"], ["W", "ER", "L", "D"]]
    wrd.write_text("HELLO WORLD\nHELLO THERE\n")
    with pytest.raises(InputError, match=rf"{wrd}:2: word 'THERE' is not in lex.txt"):
        probe.phone_targets(wrd, lexicon, 2, "lex.txt")
    with pytest.raises(InputError, match="2 lines, but its manifest has 3"):
        probe.phone_targets(wrd, lexicon, 3)


# --------------------------------------------------------------------------- training


def _synthetic_split(name: str, n: int, rng: random.Random, noise: float = 0.1) -> probe.Split:
    """Each phone is 3 frames of its one-hot code (+ noise), phones separated by a silent
    frame: a linear CTC head can read the sequence off exactly."""
    feats, targets = [], []
    dim = len(probe.PHONE_DICT)
    for _ in range(n):
        ids = [rng.randrange(1, dim) for _ in range(rng.randint(3, 8))]
        frames = []
        for i in ids:
            frames += [torch.nn.functional.one_hot(torch.tensor(i), dim).float()] * 3
            frames.append(torch.zeros(dim))
        x = torch.stack(frames) + noise * torch.randn(len(frames), dim)
        feats.append(x.unsqueeze(1).half())
        targets.append(torch.tensor(ids))
    return probe.Split(name, feats, targets, seconds=0.0)


def test_probe_head_learns_a_phone_code_to_zero_per():
    torch.manual_seed(0)
    rng = random.Random(0)
    train, test = _synthetic_split("train", 256, rng), _synthetic_split("test", 32, rng)
    mean, std = probe.feature_stats(train.feats)
    probe.standardize_(train, mean, std)
    probe.standardize_(test, mean, std)
    head = probe.ProbeHead(1, len(probe.PHONE_DICT), len(probe.PHONE_DICT))
    before = probe.evaluate(head, test, torch.device("cpu"))
    loss = probe.train_head(head, train, updates=300, batch_size=8, lr=0.1, seed=0,
                            device=torch.device("cpu"))
    after = probe.evaluate(head, test, torch.device("cpu"))
    assert before > 0.9 and loss < 0.1
    assert after < 0.03, after


def test_layer_weights_learn_to_pick_the_informative_layer():
    torch.manual_seed(0)
    rng = random.Random(1)
    train = _synthetic_split("train", 256, rng)
    # layer 0 is pure noise, layer 1 carries the code
    train.feats = [torch.cat([torch.randn_like(x.float()).half() * 3, x], dim=1) for x in train.feats]
    mean, std = probe.feature_stats(train.feats)
    probe.standardize_(train, mean, std)
    head = probe.ProbeHead(2, len(probe.PHONE_DICT), len(probe.PHONE_DICT))
    probe.train_head(head, train, updates=300, batch_size=8, lr=0.1, seed=0, device=torch.device("cpu"))
    weights = head.layer_weights()
    assert weights.shape == (2,) and weights[1] > 0.6, weights


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    """Manifests (train, valid, test) of conftest's tone tree and a lexicon for its words.
    The audio does not say the words: this checks the plumbing, not the PER."""
    tmp = tmp_path_factory.mktemp("probe")
    tree = write_tree(tmp / "libri", {"train": [32001, 40007, 35555, 33333], "dev": [32999, 41601]})
    out = tmp / "manifests"
    write_split(tree / "train", out, "train")
    write_split(tree / "dev", out, "valid")
    write_split(tree / "dev", out, "test")
    phones = ["HH AH0 L OW1", "W ER1 L D", "S P IY1 CH", "M AA1 D AH0 L", "K L AH1 S T ER0",
              "L EY1 B AH0 L", "F R EY1 M"]
    (tmp / "lexicon.txt").write_text("".join(f"{w}\t{p}\n" for w, p in zip(WORDS, phones)))
    return tmp


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    probe.add_args(p)
    return p.parse_args(list(argv))


def test_probe_command_writes_result_json(probe_data, capsys):
    out = probe_data / "probe_mfcc.json"
    args = _args("--manifest-dir", str(probe_data / "manifests"), "--lexicon", str(probe_data / "lexicon.txt"),
                 "--mfcc", "--updates", "5", "--out", str(out))
    assert probe.run(args) == 0
    result = json.loads(out.read_text())
    assert result["features"] == "mfcc" and result["ckpt"] is None and result["layer"] is None
    assert result["feature_dim"] == 78 and result["updates"] == 5 and result["train_utterances"] == 4
    assert set(result["per"]) == {"valid", "test"} and all(v >= 0 for v in result["per"].values())
    assert "PER valid" in capsys.readouterr().out
    # a 4.8 s budget holds 2 of the 2.0-2.5 s training utterances
    args = _args("--manifest-dir", str(probe_data / "manifests"), "--lexicon", str(probe_data / "lexicon.txt"),
                 "--mfcc", "--updates", "2", "--train-minutes", "0.08", "--out", str(out))
    assert probe.run(args) == 0
    result = json.loads(out.read_text())
    assert result["train_utterances"] == 2 and result["train_minutes"] <= 0.08


def test_subset_and_feature_stats():
    class FakeManifest:
        sizes = (16000, 32000, 48000, 16000, 80000)

        def __len__(self):
            return len(self.sizes)

    keep = probe.subset(FakeManifest(), 7.0, seed=3)
    assert keep == sorted(keep) and sum(FakeManifest.sizes[i] for i in keep) <= 7 * 16000
    assert keep == probe.subset(FakeManifest(), 7.0, seed=3)
    assert len(probe.subset(FakeManifest(), 0.1, seed=0)) == 1  # at least one utterance
    x = torch.stack([torch.arange(6.0), torch.full((6,), 2.0)], dim=1).reshape(6, 1, 2)
    mean, std = probe.feature_stats([x[:3], x[3:]])
    assert torch.allclose(mean, torch.tensor([[2.5, 2.0]]))
    assert std[0, 0] == pytest.approx(torch.arange(6.0).std(unbiased=False).item())
    assert std[0, 1] == pytest.approx(1e-3 * std[0, 0].item())  # constant dimension: floored


def test_probe_command_on_a_checkpoint(probe_data):
    ckpt = probe_data / "tiny.pt"
    torch.manual_seed(0)
    cfg = model_config("tiny", num_layers=2, embed_dim=64, ffn_dim=128, num_heads=2, pos_conv_groups=4,
                       conv_layers=tuple((32, k, s) for _, k, s in model_config("tiny").conv_layers),
                       teacher=TeacherConfig(top_k=2))
    save_checkpoint(ckpt, MT4SSL(cfg))
    common = ["--manifest-dir", str(probe_data / "manifests"), "--lexicon", str(probe_data / "lexicon.txt"),
              "--ckpt", str(ckpt), "--updates", "3"]
    out = probe_data / "probe_w.json"
    assert probe.run(_args(*common, "--out", str(out))) == 0
    result = json.loads(out.read_text())
    assert result["layer"] == "weighted" and len(result["layer_weights"]) == 3
    assert result["feature_dim"] == 64
    out = probe_data / "probe_l1.json"
    assert probe.run(_args(*common, "--layer", "1", "--out", str(out))) == 0
    assert json.loads(out.read_text())["layer"] == 1
    with pytest.raises(InputError, match="--layer 3: .* has hidden states 0..2"):
        probe.run(_args(*common, "--layer", "3", "--out", str(out)))


def test_probe_command_input_errors(probe_data):
    common = ["--manifest-dir", str(probe_data / "manifests"), "--out", str(probe_data / "x.json")]
    with pytest.raises(InputError, match="--layer and --random-init need --ckpt"):
        probe.run(_args(*common, "--lexicon", str(probe_data / "lexicon.txt"), "--mfcc", "--layer", "1"))
    partial = probe_data / "partial.txt"
    partial.write_text("HELLO\tHH AH0 L OW1\n")
    with pytest.raises(InputError, match=r"train\.wrd:\d+: word '\w+' is not in .*partial\.txt"):
        probe.run(_args(*common, "--lexicon", str(partial), "--mfcc"))
    with pytest.raises(SystemExit):  # --ckpt and --mfcc are exclusive
        _args(*common, "--lexicon", "l", "--mfcc", "--ckpt", "c.pt")


# --------------------------------------------------------------------------- tools

LOG_ROWS = [
    {"update": 10, "loss": 9.0, "valid_loss_kmeans": 5.5, "loss_kmeans": 6.2, "loss_teacher": 2.8, "lr": 1e-4, "target_std": 0.9,
     "pred_std": 0.5, "audio_s_per_s": 3.0, "time": 1000.0},
    {"update": 20, "loss": 8.0, "loss_kmeans": 5.5, "loss_teacher": 2.5, "lr": 2e-4, "target_std": 0.8,
     "pred_std": 0.6, "audio_s_per_s": 12.0, "time": 1060.0},
    {"update": 20, "loss": 7.5, "loss_kmeans": 5.25, "loss_teacher": 2.25, "lr": 2e-4, "target_std": 0.75,
     "pred_std": 0.6, "audio_s_per_s": 14.0, "time": 1070.0},  # re-logged after a resume: wins
    {"update": 30, "loss": 7.0, "loss_kmeans": 4.75, "loss_teacher": 2.125, "lr": 3e-4,
     "target_std": 0.625, "pred_std": 0.7, "audio_s_per_s": 16.0, "time": 1180.0, "mem_gb": 0.1,
     "acc_km100": 0.25, "valid_loss_kmeans": 4.5},
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG_ROWS))
    return run


def test_demo_table_has_the_numbers(run_dir, tmp_path, capsys):
    mfcc = tmp_path / "mfcc.json"
    mfcc.write_text(json.dumps({"features": "mfcc", "ckpt": None, "layer": None, "updates": 1500,
                                "per": {"valid": 0.4123, "test": 0.4256}, "train_utterances": 268,
                                "seconds": 61.5, "targets": "39 ARPAbet phones"}))
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"features": "mt4ssl", "ckpt": "run/checkpoint_last.pt", "layer": "weighted",
                                 "layer_weights": [0.1, 0.2, 0.7], "updates": 1500,
                                 "per": {"valid": 0.3012, "test": 0.3187}}))
    frames = tmp_path / "frames.json"
    frames.write_text(json.dumps({"aligned": 18, "utterances": 57, "results": [
        {"layer": 0, "phone_purity": 0.25, "cluster_purity": 0.125, "pnmi": 0.3,
         "classifier": {"accuracy": 0.2734}},
        {"layer": None, "phone_purity": 0.4, "cluster_purity": 0.3, "pnmi": 0.45}]}))
    random_init = tmp_path / "random.json"
    random_init.write_text(json.dumps({"features": "mt4ssl", "ckpt": "run/checkpoint_last.pt", "init": "random",
                                       "layer": 2, "per": {"valid": 0.9, "test": 0.91}}))
    out = tmp_path / "demo.md"
    assert demo_table.main(["--run", str(run_dir), "--probe", f"MFCC={mfcc}", "--probe", f"tiny={model}",
                            "--probe", f"untrained={random_init}", "--command", "make demo",
                            "--frames", f"tiny layers={frames}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    md = out.read_text()
    assert "Command: `make demo`" in md and "Machine:" in md and "Date:" in md
    assert "30 updates (3 log rows)" in md
    assert "| k-means cross-entropy, per masked frame | 6.2 (update 10) | 4.75 (update 30) |" in md
    assert "| teacher regression (L2), per masked frame | 2.8 (update 10) | 2.125 (update 30) |" in md
    assert "| teacher target std | 0.9 | 0.625 |" in md
    assert "| update | 10 | 30 |" in md and "| k-means accuracy (km100), masked frames | 0.25 | 0.25 |" in md
    assert "throughput 15.0 s of audio per second" in md  # median of 14 and 16, first left out
    assert "| MFCC | mfcc | – | 41.2 % | 42.6 % | 1500 | 268 | 61.5 |" in md
    assert "| tiny | mt4ssl (`run/checkpoint_last.pt`) | weighted: 0.10 0.20 0.70 | 30.1 % | 31.9 % |" in md
    assert "(18 of 57 utterances" in md
    assert "| tiny layers | 0 | 27.3 % | 0.250 | 0.125 | 0.300 |" in md
    assert "| tiny layers | – | – | 0.400 | 0.300 | 0.450 |" in md
    assert "| validation (fixed masks): k-means cross-entropy | 5.5 | 4.5 |" in md
    # the untrained row names what it is: fresh weights, only the architecture from the checkpoint
    assert ("| untrained | mt4ssl, random init (architecture of `run/checkpoint_last.pt`) | 2 | 90.0 % | 91.0 % |"
            in md)
    assert "3.4 %" in md and "9.6 %" in md and "Not comparable" in md


def test_demo_table_target_off_and_bad_input(run_dir, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k not in ("loss_teacher", "target_std", "pred_std")} for r in LOG_ROWS]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "demo.md"
    assert demo_table.main(["--run", str(run_dir), "--command", "c", "--out", str(out)]) == 0
    md = out.read_text()
    assert "| teacher regression (L2) | off | off |" in md and "target std" not in md
    (run_dir / "log.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    assert demo_table.main(["--run", str(run_dir), "--command", "c", "--out", str(out)]) == 2
    assert f"{run_dir / 'log.jsonl'}:2: not JSON" in capsys.readouterr().err
    assert demo_table.main(["--run", str(tmp_path), "--probe", "x", "--command", "c", "--out", str(out)]) == 2


def test_plot_curves_writes_a_png(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert plot_curves.main([str(run_dir / "log.jsonl"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # a HuBERT-like run: no teacher loss, no std panel data
    rows = [{k: v for k, v in r.items() if k not in ("loss_teacher", "target_std", "pred_std")} for r in LOG_ROWS]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_curves.main([str(run_dir / "log.jsonl")]) == 0
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
