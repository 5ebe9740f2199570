"""CTC fine-tuning (`mt4ssl finetune`) on the training loop: runs, WER validation and
checkpoint_best, exact resume, the frozen CNN and Transformer, masking rates, the tri-stage
schedule, config and data errors, the checkpoint format and its readers, the Libri-light
manifests."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mt4ssl.cli import main
from mt4ssl.config import load_config
from mt4ssl.data.manifest import read_manifest, write_split
from mt4ssl.errors import InputError
from mt4ssl.finetune import train as ft
from mt4ssl.finetune.config import FinetuneConfig
from mt4ssl.finetune.ctc import Dictionary
from mt4ssl.finetune.model import CTCModel, load_ctc_model, save_ctc_model
from mt4ssl.models.checkpoint import load_model
from mt4ssl.train import distributed, loop
from mt4ssl.train.schedule import lr_multiplier
from tests.conftest import WORDS, small_model_config, write_tree

ROOT_TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "finetune.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Manifests with .wrd/.ltr of conftest's tone tree (train, valid of two equal lengths)."""
    root = tmp_path_factory.mktemp("ft")
    tree = write_tree(root / "libri", {"train": [32001, 40007, 48319, 35555, 57603, 33333],
                                       "valid": [40000, 40000]})
    write_split(tree / "train", root / "m", "train")
    write_split(tree / "valid", root / "m", "valid")
    return root / "m"


def make_cfg(data: Path, ckpt: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"data.manifest_dir={data}", "data.valid_split=valid", "data.max_tokens=100000", "data.num_workers=0",
        f"run.out_dir={out}", f"run.init_from={ckpt}", "run.max_updates=6", "run.log_interval=1",
        "run.valid_interval=3", "run.save_interval=100", "run.device=cpu", "optim.lr=1e-3",
        "model.freeze_finetune_updates=2", "model.mask_channel_length=8", "model.layerdrop=0.0", *overrides])


def trainer(cfg: FinetuneConfig) -> loop.Trainer:
    return loop.Trainer(cfg, distributed.Dist(), ft.CTCFinetuning(cfg))


def rows(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["update"], {}).update(row)
    return out


# ---------------------------------------------------------------------------- running


def test_finetune_command_validates_by_wer_and_keeps_the_best(data, tiny_ckpt, tmp_path, capsys):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"data: {{manifest_dir: {data}, valid_split: valid, max_tokens: 100000, num_workers: 0}}\n"
                   f"run: {{out_dir: {tmp_path / 'run'}, init_from: {tiny_ckpt}, max_updates: 6, log_interval: 2, "
                   f"valid_interval: 3, save_interval: 100, device: cpu}}\n"
                   "model: {freeze_finetune_updates: 2, mask_channel_length: 8}\n")
    assert main(["finetune", str(cfg), "optim.lr=1e-3"]) == 0
    assert "fine-tuning done: 6 updates" in capsys.readouterr().out
    log = rows(tmp_path / "run")
    assert [u for u in log if "valid_wer" in log[u]] == [3, 6]
    assert [log[u]["encoder_frozen"] for u in (2, 4)] == [1.0, 0.0]
    for u in (3, 6):
        assert 0 <= log[u]["valid_wer"] and math.isfinite(log[u]["valid_loss"]) and log[u]["valid_words"] == 6
    best_update = min((3, 6), key=lambda u: log[u]["valid_wer"])  # the first of equals: only a lower one replaces it
    folder = tmp_path / "run/checkpoints"
    best = torch.load(folder / "checkpoint_best.pt", weights_only=True)
    assert best["format"] == "mt4ssl" and best["num_updates"] == best_update
    assert best["best_valid_wer"] == log[best_update]["valid_wer"]
    model, dictionary = load_ctc_model(folder / "checkpoint_best.pt")
    assert dictionary.symbols[0] == "<blank>" and "|" in dictionary and model.proj.out_features == len(dictionary)


def test_best_checkpoint_by_another_metric(data, tiny_ckpt, tmp_path, capsys):
    assert main(["finetune", str(ROOT_TINY), f"data.manifest_dir={data}", "data.valid_split=valid",
                 "data.max_tokens=100000", "data.num_workers=0", f"run.out_dir={tmp_path / 'run'}",
                 f"run.init_from={tiny_ckpt}", "run.max_updates=4", "run.valid_interval=2", "run.log_interval=2",
                 "run.save_interval=100", "run.best_metric=valid_uer", "model.freeze_finetune_updates=1",
                 "model.mask_channel_length=8", "run.precision=fp32"]) == 0
    assert "best valid UER" in capsys.readouterr().out
    log = rows(tmp_path / "run")
    best_update = min((2, 4), key=lambda u: log[u]["valid_uer"])
    best = torch.load(tmp_path / "run/checkpoints/checkpoint_best.pt", weights_only=True)
    assert best["num_updates"] == best_update and best["best_valid_uer"] == log[best_update]["valid_uer"]
    assert "best_valid_wer" not in best
    with pytest.raises(InputError, match="run.best_metric: 'wer' must be one of valid_wer, valid_uer, valid_loss"):
        make_cfg(data, tiny_ckpt, tmp_path / "x", "run.best_metric=wer")


class FixedLogits(nn.Module):
    """A stand-in model whose greedy paths spell given letter strings (one frame per letter)."""

    def __init__(self, dictionary: Dictionary, hyps: list[str]):
        super().__init__()
        self.dictionary, self.hyps = dictionary, hyps

    def forward(self, wav, padding_mask, cnn=None):
        T = 2 * max(len(h) for h in self.hyps) + 1
        logits = torch.zeros(len(self.hyps), T, len(self.dictionary))
        logits[:, :, 0] = 1.0  # blank everywhere ...
        for b, hyp in enumerate(self.hyps):
            for t, ids in enumerate(self.dictionary.encode(hyp)):  # ... but a letter at every other frame
                logits[b, 2 * t + 1, 0], logits[b, 2 * t + 1, ids] = 0.0, 5.0
        return logits, None


class GivenLogits(nn.Module):
    """A stand-in model that returns fixed logits and frame padding."""

    def __init__(self, logits: torch.Tensor, frame_padding: torch.Tensor | None):
        super().__init__()
        self.logits, self.frame_padding = logits, frame_padding

    def forward(self, wav, padding_mask, cnn=None):
        return self.logits, self.frame_padding


def test_ctc_loss_of_the_task_on_hand_made_cases(data, tiny_ckpt, tmp_path):
    """The task's CTC loss is -log of the summed probability of every path that collapses to
    the target, enumerated by hand; padding frames are not read; an impossible target costs 0
    (zero_infinity) instead of inf; the sample size is the number of sentences."""
    task = ft.CTCFinetuning(make_cfg(data, tiny_ckpt, tmp_path / "x"))
    a, b = task.dictionary.symbols[1], task.dictionary.symbols[2]
    ia, ib = task.dictionary.encode([a, b])
    V = len(task.dictionary)
    probs = torch.full((3, 3, V), 1e-4)  # (utterance, frame, token), renormalized below
    q = [(0.5, 0.3, 0.2), (0.6, 0.3, 0.1), (0.2, 0.7, 0.1)]  # frames: (blank, a, b)
    for t, (pb, pa, pbb) in enumerate(q):
        probs[:, t, 0], probs[:, t, ia], probs[:, t, ib] = pb, pa, pbb
    probs = probs / probs.sum(-1, keepdim=True)
    p = probs[0]
    A, Bk = ia, ib
    # target "a" in 3 frames: a--, -a-, --a, aa-, -aa, aaa
    want_a = (p[0, A] * p[1, 0] * p[2, 0] + p[0, 0] * p[1, A] * p[2, 0] + p[0, 0] * p[1, 0] * p[2, A]
              + p[0, A] * p[1, A] * p[2, 0] + p[0, 0] * p[1, A] * p[2, A] + p[0, A] * p[1, A] * p[2, A])
    # target "a b" in 2 frames (the third is padding): only a b
    want_ab = p[0, A] * p[1, Bk]
    # target "a a" in 2 frames: impossible (a blank must separate them) -> 0, not inf
    logits = probs.log()
    frame_padding = torch.tensor([[False, False, False], [False, False, True], [False, False, True]])
    batch = {"wav": torch.zeros(3, 960), "padding_mask": None,
             "targets": torch.tensor([ia, ia, ib, ia, ia]), "target_lengths": torch.tensor([1, 2, 2])}
    loss, sentences, logs = task.loss(GivenLogits(logits, frame_padding), batch)
    assert float(sentences) == 3 and int(logs["frames"]) == 7 and int(logs["letters"]) == 5
    torch.testing.assert_close(loss, -(want_a.log() + want_ab.log()), rtol=1e-5, atol=1e-5)
    # each alone, and the padding frame of row 1 changes nothing
    one, _, _ = task.loss(GivenLogits(logits[:1], None), {**batch, "wav": torch.zeros(1, 960),
                          "targets": torch.tensor([ia]), "target_lengths": torch.tensor([1])})
    torch.testing.assert_close(one, -want_a.log(), rtol=1e-5, atol=1e-5)
    moved = logits.clone()
    moved[1, 2] = torch.randn(V)
    again, _, _ = task.loss(GivenLogits(moved, frame_padding), batch)
    torch.testing.assert_close(again, loss, rtol=0, atol=0)


def test_validation_wer_and_uer_against_jiwer(data, tiny_ckpt, tmp_path):
    jiwer = pytest.importorskip("jiwer")
    letters = sorted(set("".join(WORDS))) + ["|"]
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{s} 1\n" for s in letters))
    task = ft.CTCFinetuning(make_cfg(data, tiny_ckpt, tmp_path / "x", f"data.dictionary={tmp_path / 'dict.ltr.txt'}"))
    refs = [" ".join(ft.words(task.valid_set.letters(i))) for i in range(2)]
    first, second = refs[0].split(), refs[1].split()
    hyps = [" ".join([first[0], first[1][:-1], *first[2:], second[0]]), " ".join(second[1:])]
    model = FixedLogits(task.dictionary, [h.replace(" ", "|") + "|" for h in hyps])
    batch = task.valid_batch([0, 1])
    stats = {k: float(v) for k, v in task.valid_stats(model, batch).items()}
    row = task.valid_row(stats)
    assert row["valid_wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert row["valid_wer"] > 0 and row["valid_sentences"] == 2
    # UER: letter tokens with the word boundaries: jiwer's CER of the letter strings with `|`
    letter_refs = ["".join(task.valid_set.letters(i)) for i in range(2)]
    assert row["valid_uer"] == pytest.approx(100 * jiwer.cer(letter_refs, [h.replace(" ", "|") + "|" for h in hyps]))


@pytest.mark.parametrize("extra", [(), ("model.cache_cnn=true",)], ids=["cnn", "cached_cnn"])
def test_interrupted_finetuning_resumes_exactly(data, tiny_ckpt, tmp_path, monkeypatch, extra):
    straight = ft.train(make_cfg(data, tiny_ckpt, tmp_path / "straight", *extra))
    assert straight["num_updates"] == 6
    real_step = loop.Trainer.train_step

    def step_then_signal(self, batches):
        stats = real_step(self, batches)
        if self.num_updates == 1:  # seen in the next update: it stops after update 2, the last frozen one
            os.kill(os.getpid(), signal.SIGUSR1)
        return stats

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
    cfg = make_cfg(data, tiny_ckpt, tmp_path / "resumed", *extra)
    with pytest.raises(ft.Preempted, match="stopped by SIGUSR1 at update 2"):
        ft.train(cfg)
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    assert ft.train(cfg)["num_updates"] == 6
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    for key in ("loss", "valid_loss", "valid_wer"):
        assert {u: r[key] for u, r in a.items() if key in r} == {u: r[key] for u, r in b.items() if key in r}
    wa = torch.load(tmp_path / "straight/checkpoints/checkpoint_last.pt", weights_only=True)
    wb = torch.load(tmp_path / "resumed/checkpoints/checkpoint_last.pt", weights_only=True)
    for name in wa["model"]:
        torch.testing.assert_close(wa["model"][name], wb["model"][name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(wa["ctc"]["head"], wb["ctc"]["head"], rtol=0, atol=0)


def test_cached_cnn_gives_the_models_numbers(data, tiny_ckpt, tmp_path):
    cfg = make_cfg(data, tiny_ckpt, tmp_path / "c", "model.cache_cnn=true", *DETERMINISTIC)
    t = trainer(cfg)
    batch = t.task.collate([t.dataset[i] for i in (0, 4, 2)])  # three lengths: two padded rows
    assert batch["padding_mask"] is not None
    t.model.eval()
    with torch.no_grad():
        want, frames = t.model(batch["wav"], batch["padding_mask"])
        got, _ = t.model(batch["wav"], batch["padding_mask"], cnn=t.task.cached_cnn(batch))
    assert sorted(t.task.cnn_cache) == [0, 2, 4]
    valid = ~frames
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)
    # one utterance's cached frames are its CNN output alone, whatever batch it came in
    alone = t.model.encoder.cnn_features(t.dataset[2]["wav"].unsqueeze(0))[0]
    torch.testing.assert_close(t.task.cnn_cache[2], alone, rtol=0, atol=0)
    # training: the loss of the cached path is the loss of the model, and a second use hits the cache
    t.model.train()
    with torch.no_grad():
        loss, sentences, _ = t.task.loss(t.model, batch)
        ref, _, _ = t.task._ctc(t.model, batch)
    cached = dict(t.task.cnn_cache)
    t.task.cached_cnn(batch)
    assert all(t.task.cnn_cache[i] is cached[i] for i in cached)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-3)
    assert float(sentences) == 3


def fixed_items(t: loop.Trainer) -> list[dict]:
    """Four training items cut to one length (no padding: DDP and one process see the same)."""
    return [{"id": i, "wav": t.dataset[i]["wav"][:32000], "target": t.dataset[i]["target"]} for i in range(4)]


DETERMINISTIC = ("model.mask_prob=0.0", "model.mask_channel_prob=0.0", "model.activation_dropout=0.0",
                 "model.freeze_finetune_updates=1")


def _ddp_worker(rank: int, data: str, ckpt: str, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = distributed.setup("cpu")
    t = loop.Trainer(make_cfg(Path(data), Path(ckpt), Path(out) / "ddp", *DETERMINISTIC), d,
                     ft.CTCFinetuning(make_cfg(Path(data), Path(ckpt), Path(out) / "ddp", *DETERMINISTIC)))
    batch = t.task.collate(fixed_items(t)[2 * rank:2 * rank + 2])
    grads = []
    for _ in range(2):  # update 0: the encoder is frozen; update 1: it trains
        stats = t.accumulate([batch])
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        t.step(stats)
    torch.save({"grads": grads, "params": t.model.state_dict()}, Path(out) / f"rank{rank}.pt")
    distributed.teardown(d)


def test_ddp_two_gloo_workers_equal_one_process(data, tiny_ckpt, tmp_path):
    import torch.multiprocessing as mp

    port = 29500 + (os.getpid() + 7) % 1000
    mp.spawn(_ddp_worker, args=(str(data), str(tiny_ckpt), str(tmp_path), port), nprocs=2, join=True)
    single = trainer(make_cfg(data, tiny_ckpt, tmp_path / "single", *DETERMINISTIC))
    batch = single.task.collate(fixed_items(single))
    want = []
    for _ in range(2):
        stats = single.accumulate([batch])
        want.append({n: p.grad.clone() for n, p in single.model.named_parameters() if p.grad is not None})
        single.step(stats)
    assert set(want[0]) == {"proj.weight", "proj.bias"} and len(want[1]) > 10
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for update in range(2):
        for rank in range(2):
            assert got[rank]["grads"][update].keys() == want[update].keys()
            for name, g in want[update].items():
                torch.testing.assert_close(got[rank]["grads"][update][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(got[0]["params"][name], got[1]["params"][name], rtol=0, atol=0, msg=name)
        if not name.endswith("k_proj.bias"):  # its gradient is 0 up to rounding (softmax ignores it): Adam's step is noise
            torch.testing.assert_close(got[0]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------- what trains


def test_cnn_frozen_transformer_frozen_then_trained(data, tiny_ckpt, tmp_path):
    t = trainer(make_cfg(data, tiny_ckpt, tmp_path / "a"))
    model = t.model
    cnn = {n: p.detach().clone() for n, p in model.encoder.feature_extractor.named_parameters()}
    rest = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if not n.startswith("feature_extractor.")}
    head = model.proj.weight.detach().clone()
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.encoder.feature_extractor.parameters())
    batch = t.task.collate([t.dataset[i] for i in range(2)])

    def changed(before: dict, module) -> list[str]:
        now = dict(module.named_parameters())
        return [n for n, p in before.items() if not torch.equal(now[n], p)]

    for update in range(2):  # freeze_finetune_updates=2: only the projection learns
        stats = t.accumulate([batch])
        assert all(p.grad is None for p in model.encoder.parameters())
        assert model.proj.weight.grad is not None
        t.step(stats)
    assert not changed(rest, model.encoder) and not torch.equal(model.proj.weight, head)
    stats = t.accumulate([batch])  # update 3: the Transformer, feature projection and mask_emb learn too
    assert all(p.grad is None for p in model.encoder.feature_extractor.parameters())
    assert all(p.grad is not None for n, p in model.encoder.named_parameters()
               if n.startswith(("encoder.layers.", "post_extract_proj.", "layer_norm.")))
    t.step(stats)
    moved = changed(rest, model.encoder)
    assert any(n.startswith("encoder.layers.") for n in moved) and "post_extract_proj.weight" in moved
    assert not [n for n, p in model.encoder.feature_extractor.named_parameters() if not torch.equal(p, cnn[n])]


def expected_span_fraction(n: int, prob: float, length: int, min_spans: int) -> float:
    """E[masked fraction] of one row: k = floor(prob n / length + U) spans (at least
    min_spans) of `length`, distinct starts uniform in [0, n - length)."""
    starts = n - length
    base, frac = divmod(prob * n / length, 1.0)
    total = 0.0
    for k, weight in ((int(base), 1 - frac), (int(base) + 1, frac)):
        k = max(min_spans, k)
        for t in range(n):
            window = min(t, starts - 1) - max(0, t - length + 1) + 1  # starts that cover frame t
            total += weight * (1 - math.comb(starts - max(window, 0), k) / math.comb(starts, k))
    return total / n


def test_masks_at_the_configured_rates():
    torch.manual_seed(0)
    cfg = small_model_config(dropout=0.0, attention_dropout=0.0, layerdrop=0.0, mask_prob=0.4, mask_length=5,
                             mask_channel_prob=0.25, mask_channel_length=8)
    model = CTCModel(cfg, 5)
    wav = torch.randn(1, 16000 * 2)
    seen = []
    model.encoder.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        clean = model.encoder.features(wav)[0][0]
        T, C = clean.shape
        model.train()
        time_frac, chan_frac = [], []
        for _ in range(300):
            model(wav)
            x = seen.pop()[0]
            channels = (x == 0).all(0)  # zeroed at every frame
            frames = (x[:, ~channels] == model.encoder.mask_emb[~channels]).all(1)
            assert torch.equal(x[~frames][:, ~channels], clean[~frames][:, ~channels])  # nothing else changed
            time_frac.append(frames.float().mean().item())
            chan_frac.append(channels.float().mean().item())
        model.eval()
        model(wav)
        assert torch.equal(seen.pop()[0], clean)  # eval: no masks
    assert np.mean(time_frac) == pytest.approx(expected_span_fraction(T, 0.4, 5, 1), abs=0.02)
    assert np.mean(chan_frac) == pytest.approx(expected_span_fraction(C, 0.25, 8, 0), abs=0.02)
    assert 0.2 < np.mean(time_frac) < 0.4 and 0.15 < np.mean(chan_frac) < 0.25  # overlaps: below prob


def test_tri_stage_schedule_by_hand(data, tiny_ckpt, tmp_path):
    cfg = make_cfg(data, tiny_ckpt, tmp_path / "a", "run.max_updates=20", "optim.lr=5e-5")
    assert cfg.optim.phase_ratio == (0.1, 0.4, 0.5) and cfg.optim.final_lr_scale == 0.05  # fine-tuning defaults
    t = trainer(cfg)
    batch = t.task.collate([t.dataset[0]])
    lrs = [t.optimizer.param_groups[0]["lr"]]
    for _ in range(3):
        t.train_step([batch])
        lrs.append(t.optimizer.param_groups[0]["lr"])
    # 2 warm-up updates from 0.01 x 5e-5, 8 at 5e-5, 10 of exponential decay to 0.05 x 5e-5
    assert lrs == pytest.approx([5e-7, 5e-7 + (5e-5 - 5e-7) / 2, 5e-5, 5e-5], rel=1e-9)
    f = lr_multiplier(cfg.optim, 20)
    assert [f(n) for n in (9, 10, 15, 20, 25)] == pytest.approx([1.0, 1.0, 0.05 ** 0.5, 0.05, 0.05])
    ten_h = load_config(FinetuneConfig, Path(__file__).parents[1] / "recipes/librispeech/finetune_10h.yaml")
    f = lr_multiplier(ten_h.optim, ten_h.run.max_updates)
    assert [ten_h.optim.lr * f(n) for n in (0, 1000, 2000, 9999, 10000, 15000, 20000)] == pytest.approx(
        [5e-7, 5e-7 + (5e-5 - 5e-7) / 2, 5e-5, 5e-5, 5e-5, 5e-5 * 0.05 ** 0.5, 2.5e-6])


# ---------------------------------------------------------------------------- errors


def test_bad_config_values_are_clear_errors(data, tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {{manifest_dir: {data}}}\nrun: {{out_dir: o, init_from: {tiny_ckpt}}}\n"
                   "model: {mask_probb: 0.5}\n")
    assert main(["finetune", str(bad)]) == 2
    assert "bad.yaml.model: unknown key(s) ['mask_probb']" in capsys.readouterr().err
    for override, message in [
        ("model.mask_prob=1.5", r"model\.mask_prob: 1\.5 must be in \[0, 1\)"),
        ("model.mask_channel_length=0", r"model\.mask_channel_length: 0 must be at least 1"),
        ("model.freeze_finetune_updates=6", r"model\.freeze_finetune_updates: 6 is not below run\.max_updates=6"),
        ("run.init_from=''", r"run\.init_from: missing"),
        ("optim.final_lr_scale=0", r"optim\.final_lr_scale: 0\.0 must be in \(0, 1\]"),
        ("optim.phase_ratio=[0.5,0.5,0.5]", r"optim\.phase_ratio .* must be non-negative and sum to 1"),
    ]:
        with pytest.raises(InputError, match=message):
            make_cfg(data, tiny_ckpt, tmp_path / "x", override)
    with pytest.raises(InputError, match=r"model\.mask_channel_length: 100 is more than the encoder's 64 channels"):
        trainer(make_cfg(data, tiny_ckpt, tmp_path / "y", "model.mask_channel_length=100"))
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        trainer(make_cfg(data, tiny_ckpt, tmp_path / "z", f"run.init_from={tmp_path / 'nope.pt'}"))


def test_bad_transcripts_and_dictionary_name_the_file(data, tiny_ckpt, tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    for name in ("train.tsv", "valid.tsv", "valid.ltr"):
        (m / name).write_bytes((data / name).read_bytes())
    lines = (data / "train.ltr").read_text().splitlines()
    (m / "train.ltr").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match=r"train\.ltr: 5 lines, but .*train\.tsv has 6 utterances"):
        ft.CTCFinetuning(make_cfg(m, tiny_ckpt, tmp_path / "a"))
    (m / "train.ltr").write_text("\n".join(lines) + "\n")
    (m / "dict.ltr.txt").write_text("| 10\nE 5\n")  # a fairseq dictionary that lacks letters
    with pytest.raises(InputError, match=r"train\.ltr:1: token '.' is not in the dictionary"):
        ft.CTCFinetuning(make_cfg(m, tiny_ckpt, tmp_path / "b"))
    (m / "dict.ltr.txt").write_text("| 10\nE\n")
    with pytest.raises(InputError, match=r"dict\.ltr\.txt:2: expected 'SYMBOL COUNT'"):
        ft.CTCFinetuning(make_cfg(m, tiny_ckpt, tmp_path / "c"))


def test_dictionary_from_letters_or_a_fairseq_file(data, tiny_ckpt, tmp_path):
    counts: dict[str, int] = {}
    for token in (data / "train.ltr").read_text().split():
        counts[token] = counts.get(token, 0) + 1
    d = ft.CTCFinetuning(make_cfg(data, tiny_ckpt, tmp_path / "a")).dictionary
    assert d.symbols[0] == "<blank>" and set(d.symbols[1:]) == set(counts)
    assert [counts[s] for s in d.symbols[1:]] == sorted(counts.values(), reverse=True)
    given = tmp_path / "dict.ltr.txt"
    given.write_text("".join(f"{s} 1\n" for s in sorted(counts)) + "Q 0\n")
    d = ft.CTCFinetuning(make_cfg(data, tiny_ckpt, tmp_path / "b", f"data.dictionary={given}")).dictionary
    assert d.symbols == ("<blank>", *sorted(counts), "Q")


# ---------------------------------------------------------------------------- checkpoints


def test_ctc_checkpoint_loads_as_an_encoder_and_pretrain_ones_are_refused(data, tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match=r"tiny\.pt: has no CTC head"):
        load_ctc_model(tiny_ckpt)
    ft.train(make_cfg(data, tiny_ckpt, tmp_path / "run", "run.max_updates=3"))
    ckpt = tmp_path / "run/checkpoints/checkpoint_last.pt"
    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == "mt4ssl" and tuple(raw["model_config"]["targets"]) == ()
    ctc, dictionary = load_ctc_model(ckpt)
    encoder = load_model(ckpt)
    wav = read_manifest(data / "valid.tsv")
    audio = torch.from_numpy(wav.read(0))[None]
    with torch.no_grad():
        want = ctc.encoder.extract_features(audio)[0]
        got = encoder.extract_features(audio)[0]
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    assert main(["extract", str(ckpt), str(wav.audio_path(0)), "--out", str(tmp_path / "feats")]) == 0
    states = np.load(tmp_path / "feats" / f"{wav.audio_path(0).stem}.npy")
    assert states.shape == (len(want), want[0].shape[1], want[0].shape[2])
    np.testing.assert_allclose(states, torch.stack(want)[:, 0].numpy(), rtol=0, atol=1e-6)

    pytest.importorskip("s3prl")
    from mt4ssl.superb.upstream import mt4ssl_local

    upstream = mt4ssl_local(str(ckpt)).eval()
    with torch.no_grad():
        hidden = upstream([audio[0]])["hidden_states"]
    assert len(hidden) == len(want)
    for a, b in zip(want, hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_init_from_a_finetuned_checkpoint_and_random_init(data, tiny_ckpt, tmp_path):
    first = ft.train(make_cfg(data, tiny_ckpt, tmp_path / "first", "run.max_updates=3"))["checkpoint"]
    source = torch.load(first, weights_only=True)
    t = trainer(make_cfg(data, tiny_ckpt, tmp_path / "second", f"run.init_from={first}"))
    assert t.num_updates == 0 and t.optimizer.state_dict()["state"] == {}
    for name, value in t.model.encoder.state_dict().items():
        torch.testing.assert_close(value, source["model"][name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(t.model.proj.state_dict(), source["ctc"]["head"], rtol=0, atol=0)
    # from a pretraining checkpoint: its encoder (no targets), a new head
    pre = torch.load(tiny_ckpt, weights_only=True)["model"]
    t = trainer(make_cfg(data, tiny_ckpt, tmp_path / "third"))
    for name, value in t.model.encoder.state_dict().items():
        torch.testing.assert_close(value, pre[name], rtol=0, atol=0, msg=name)
    rand = trainer(make_cfg(data, tiny_ckpt, tmp_path / "fourth", "model.random_init=true"))
    assert rand.model.encoder.cfg == t.model.encoder.cfg
    assert not torch.equal(rand.model.encoder.encoder.layers[0].fc1.weight, t.model.encoder.encoder.layers[0].fc1.weight)


def test_save_and_load_ctc_model_round_trip(tmp_path):
    torch.manual_seed(0)
    d = Dictionary.from_symbols(["|", "E", "T"])
    model = CTCModel(small_model_config(), len(d), final_dropout=0.1).eval()
    save_ctc_model(tmp_path / "m.pt", model, d, note="x")
    loaded, d2 = load_ctc_model(tmp_path / "m.pt")
    assert d2 == d and not loaded.training and loaded.final_dropout.p == 0.1
    wav = torch.randn(2, 12000)
    pad = torch.zeros(2, 12000, dtype=torch.bool)
    pad[1, 8000:] = True
    (a, pa), (b, pb) = model(wav, pad), loaded(wav, pad)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(pa, pb) and pa[1].sum() > 0 and a.shape == (2, pa.shape[1], 4)


# ---------------------------------------------------------------------------- Libri-light manifests


def test_manifest_limited_splits(tmp_path, capsys):
    ll, ls = tmp_path / "librispeech_finetuning", tmp_path / "LibriSpeech"
    for k in range(6):
        write_tree(ll / "1h" / str(k), {"clean": [16000 + k], "other": [17000 + k]}, seed=k)
    write_tree(ll / "9h", {"clean": [20000, 20001], "other": [21000]}, seed=9)
    write_tree(ls, {name: [18000] for name in ("dev-clean", "dev-other", "test-clean", "test-other")}, seed=7)
    out = tmp_path / "m"
    assert main(["manifest-limited", "--librilight", str(ll), "--librispeech", str(ls), "--out", str(out)]) == 0
    sizes = {name: sorted(read_manifest(out / f"{name}.tsv").sizes)
             for name in ("train-10m", "train-1h", "train-10h", "dev-other")}
    assert sizes["train-10m"] == [16000, 17000]
    assert sizes["train-1h"] == sorted([16000 + k for k in range(6)] + [17000 + k for k in range(6)])
    assert sizes["train-10h"] == sorted(sizes["train-1h"] + [20000, 20001, 21000])
    assert sizes["dev-other"] == [18000] and not (out / "train-clean-100.tsv").exists()
    ten_h = read_manifest(out / "train-10h.tsv")
    assert ten_h.root == ll.resolve() and all(ten_h.audio_path(i).is_file() for i in range(len(ten_h)))
    assert len((out / "train-10h.ltr").read_text().splitlines()) == len(ten_h)
    entries = [line.split() for line in (out / "dict.ltr.txt").read_text().splitlines()]
    symbols, counts = [e[0] for e in entries], [int(e[1]) for e in entries]
    assert counts == sorted(counts, reverse=True) and set(symbols) == set((out / "train-10h.ltr").read_text().split()) | set(
        (out / "dev-other.ltr").read_text().split() + (out / "test-clean.ltr").read_text().split())
    capsys.readouterr()
    assert main(["manifest-limited", "--librilight", str(ll / "1h"), "--librispeech", str(ls), "--out", str(out)]) == 2
    assert "1h/9h" in capsys.readouterr().err
