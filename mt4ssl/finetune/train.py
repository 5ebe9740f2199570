"""`mt4ssl finetune CONFIG.yaml [key=value ...]`: CTC fine-tuning on letters (wav2vec 2.0 /
data2vec / MT4SSL style), on the project's one training loop (mt4ssl/train/loop.py).

What fine-tuning adds to the loop:
- model: `CTCModel` (mt4ssl/finetune/model.py), the encoder of `run.init_from` (a
  pretraining checkpoint, `mt4ssl convert fairseq` output, or a fine-tuned checkpoint) with
  the `model` section's dropout, layerdrop and masking, and a new Linear to the letters;
  the CNN frozen; the whole encoder frozen for the first `model.freeze_finetune_updates`
  updates (only the projection learns); `model.cache_cnn`: the frozen CNN's output of each
  training utterance is computed once and kept in memory (its frames do not depend on the
  batch; validation still runs the whole model);
- data: `{split}.tsv` + `{split}.ltr` (fairseq letters, `|` after each word); the dictionary
  has the CTC blank at 0, then `data.dictionary` (a fairseq dict.ltr.txt) or the letters of
  the train split, most frequent first; it is saved in every checkpoint;
- loss: CTC (summed, zero_infinity) over the batch; the sample size is the number of
  sentences (fairseq's sentence_avg), so the loop's update divides by the sentences of all
  micro-batches and workers;
- validation on `data.valid_split`: CTC loss per sentence, and greedy (Viterbi) decoding
  scored as WER (words: letters joined, split at `|`) and UER (letter tokens, `|` included),
  both in %; checkpoint_best.pt is kept by valid_wer (`run.best_metric`: or valid_uer, valid_loss).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mt4ssl.config import load_config
from mt4ssl.data.dataset import LetterDataset, collate_letters
from mt4ssl.errors import InputError
from mt4ssl.finetune.config import FinetuneConfig, FinetuneDataConfig, pretrained_config
from mt4ssl.finetune.ctc import Dictionary, edit_distance, greedy_decode
from mt4ssl.finetune.model import CTCModel, ctc_state
from mt4ssl.train import loop
from mt4ssl.train.loop import Preempted, on_preemption  # noqa: F401  (launch calls this module's hook)
from mt4ssl.utils.io import read_text

log = logging.getLogger("mt4ssl.finetune")

BOUNDARY = "|"


# ---------------------------------------------------------------------------- the dictionary


def read_fairseq_dict(path: str | Path) -> Dictionary:
    """A fairseq `dict.ltr.txt` ("SYMBOL COUNT" per line) -> blank + its symbols, in order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: dictionary not found (data.dictionary)")
    symbols = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
            raise InputError(f"{path}:{lineno}: expected 'SYMBOL COUNT', got {line!r}")
        if fields[0] in symbols:
            raise InputError(f"{path}:{lineno}: symbol {fields[0]!r} appears twice")
        symbols.append(fields[0])
    if not symbols:
        raise InputError(f"{path}: the dictionary is empty")
    try:
        return Dictionary.from_symbols(symbols)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def count_dictionary(ltr: str | Path) -> Dictionary:
    """Blank + the symbols of a `.ltr` file, most frequent first (ties: alphabetical)."""
    ltr = Path(ltr)
    if not ltr.is_file():
        raise InputError(f"{ltr}: letter transcripts not found (needed for the dictionary)")
    counts = Counter(read_text(ltr).split())
    return Dictionary.from_symbols(sorted(counts, key=lambda s: (-counts[s], s)))


def letter_dictionary(data: FinetuneDataConfig) -> Dictionary:
    default = Path(data.manifest_dir) / "dict.ltr.txt"
    if data.dictionary:
        return read_fairseq_dict(data.dictionary)
    if default.is_file():
        return read_fairseq_dict(default)
    return count_dictionary(Path(data.manifest_dir) / f"{data.train_split}.ltr")


def words(tokens) -> list[str]:
    """Letter tokens -> words (fairseq's "letter" post-processing)."""
    return "".join(tokens).replace(BOUNDARY, " ").split()


# ---------------------------------------------------------------------------- the task


class CTCFinetuning:
    """The fine-tuning task of the training loop (see mt4ssl/train/loop.py, `Task`)."""

    name = "finetune"
    log_keys = ("loss", "lr", "encoder_frozen", "audio_s_per_s")
    # frozen updates and layerdrop leave parameters without gradients
    find_unused_parameters = True

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.best_metric = cfg.run.best_metric  # valid_wer unless the config says otherwise
        data = cfg.data
        self.dictionary = letter_dictionary(data)
        self.train_set = self._dataset(data.train_split)
        self.valid_set = self._dataset(data.valid_split, drop_unknown=True) if cfg.run.valid_interval else None
        self.collate = collate_letters
        self.frozen = False
        self.model: CTCModel | None = None
        self.cnn_cache: dict[int, torch.Tensor] = {}  # train item -> its CNN output (T, C) (model.cache_cnn)

    def _dataset(self, split: str, drop_unknown: bool = False) -> LetterDataset:
        folder = Path(self.cfg.data.manifest_dir)
        return LetterDataset(folder / f"{split}.tsv", folder / f"{split}.ltr", self.dictionary,
                             self.cfg.data.min_samples, drop_unknown)

    # ------------------------------------------------------------------ model and checkpoints

    def build_model(self, source: dict | None) -> CTCModel:
        where = self.cfg.run.init_from
        if source is None:
            raise InputError("run.init_from: fine-tuning needs a pretrained checkpoint")
        encoder = self.cfg.model.encoder_config(pretrained_config(source["model_config"], where))
        self.model = CTCModel(encoder, len(self.dictionary), self.cfg.model.final_dropout)
        self.cnn_cache.clear()
        return self.model

    def checkpoint_state(self, model: CTCModel) -> dict:
        return ctc_state(model, self.dictionary)

    def load_state(self, model: CTCModel, state: dict, where: str) -> None:
        if state["ctc"]["dictionary"] != list(self.dictionary.symbols):
            raise InputError(f"{where}: made with another letter dictionary ({' '.join(state['ctc']['dictionary'])}) "
                             f"than this run's ({' '.join(self.dictionary.symbols)}); use a new run.out_dir")
        model.encoder.load_state_dict(state["model"])
        model.proj.load_state_dict(state["ctc"]["head"])

    def init_weights(self, model: CTCModel, state: dict, where: str) -> None:
        """The encoder of `state` (without pretraining heads and teacher); a fine-tuned source
        with the same dictionary gives its CTC head too. model.random_init: nothing."""
        if self.cfg.model.random_init:
            log.info("model.random_init: the architecture of %s with fresh weights (seed %d)", where,
                     self.cfg.run.seed)
            return
        encoder = {k: v for k, v in state["model"].items() if not k.startswith("targets.")}
        try:
            model.encoder.load_state_dict(encoder)
        except RuntimeError as e:
            raise InputError(f"{where}: its encoder weights do not load: {str(e).splitlines()[0]}") from None
        ctc = state.get("ctc")
        if isinstance(ctc, dict) and ctc.get("dictionary") == list(self.dictionary.symbols):
            model.proj.load_state_dict(ctc["head"])
            log.info("run.init_from %s: its CTC head too (same dictionary)", where)

    # ------------------------------------------------------------------ one update

    def before_update(self, model: CTCModel, num_updates: int) -> None:
        self.frozen = model.freeze_encoder = num_updates < self.cfg.model.freeze_finetune_updates

    def cached_cnn(self, batch: dict) -> torch.Tensor:
        """The frozen CNN's output (B, T, C) of a training batch, each utterance computed once
        (alone, see CTCModel.cnn_features) and kept; rows zero-padded (the Transformer zeroes
        padding frames anyway)."""
        wav, padding = batch["wav"], batch["padding_mask"]
        lengths = [wav.shape[1]] * len(wav) if padding is None else (~padding).sum(-1).tolist()
        rows = []
        for b, (i, n) in enumerate(zip(batch["ids"].tolist(), lengths)):
            if i not in self.cnn_cache:
                self.cnn_cache[i] = self.model.cnn_features(wav[b, :n])
            rows.append(self.cnn_cache[i])
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def _ctc(self, net, batch: dict, cnn: torch.Tensor | None = None):
        logits, frame_padding = net(batch["wav"], batch["padding_mask"], cnn=cnn)
        B, T = logits.shape[:2]
        lengths = torch.full((B,), T, device=logits.device) if frame_padding is None else (~frame_padding).sum(-1)
        log_probs = logits.float().log_softmax(-1)
        loss = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                          blank=self.dictionary.blank, reduction="sum", zero_infinity=True)
        return loss, log_probs, lengths

    def loss(self, net, batch: dict):
        loss, _, lengths = self._ctc(net, batch, self.cached_cnn(batch) if self.cfg.model.cache_cnn else None)
        sentences = torch.tensor(float(len(batch["target_lengths"])), device=loss.device)
        return loss, sentences, {"frames": lengths.sum(), "letters": batch["target_lengths"].sum()}

    def after_update(self, model: CTCModel, num_updates: int) -> None:
        pass

    def check(self, stats: dict[str, float], num_updates: int) -> None:
        pass

    def log_row(self, s: dict[str, float], updates: float) -> dict:
        return {"loss": s["loss"] / max(s["sample_size"], 1.0), "sentences": s["sample_size"] / updates,
                "frames": s["frames"] / updates, "encoder_frozen": float(self.frozen)}

    # ------------------------------------------------------------------ validation

    def valid_batch(self, ids: list[int]) -> dict:
        return collate_letters([self.valid_set[i] for i in ids])

    def valid_stats(self, model: CTCModel, batch: dict) -> dict[str, torch.Tensor]:
        loss, log_probs, lengths = self._ctc(model, batch)
        stats = {"loss": loss, "sentences": float(len(lengths)), "word_errors": 0.0, "words": 0.0,
                 "unit_errors": 0.0, "units": 0.0}
        for i, hyp in zip(batch["ids"].tolist(), greedy_decode(log_probs, lengths, self.dictionary.blank)):
            ref, hyp = self.valid_set.letters(i), self.dictionary.decode(hyp)
            stats["word_errors"] += edit_distance(words(ref), words(hyp))
            stats["words"] += len(words(ref))
            stats["unit_errors"] += edit_distance(ref, hyp)
            stats["units"] += len(ref)
        return stats

    def valid_row(self, s: dict[str, float]) -> dict:
        return {"valid_loss": s["loss"] / max(s["sentences"], 1.0),
                "valid_wer": 100 * s["word_errors"] / max(s["words"], 1.0),
                "valid_uer": 100 * s["unit_errors"] / max(s["units"], 1.0),
                "valid_sentences": s["sentences"], "valid_words": s["words"]}


def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) the fine-tuning described by `cfg` in this process."""
    return loop.run(cfg, lambda d: loop.Trainer(cfg, d, CTCFinetuning(cfg)))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (recipes/librispeech/finetune_*.yaml, recipes/tiny/finetune.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. run.init_from=exp/pretrain/checkpoints/checkpoint_last.pt optim.lr=3e-5")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    from mt4ssl.launch import launch

    try:
        result = launch(cfg, target="mt4ssl.finetune.train:train")
    except Preempted as e:
        print(f"mt4ssl finetune: {e}")
        return 3
    except loop.TrainingStopped as e:  # skipped updates in a row, weights not finite: said what to do
        print(f"mt4ssl finetune: {e}", file=sys.stderr)
        return 4
    if isinstance(result, dict) and "checkpoint" not in result:  # nothing to do: the run had finished
        print(f"fine-tuning already finished: {result.get('num_updates')} updates; checkpoints in "
              f"{Path(cfg.run.out_dir) / 'checkpoints'} (checkpoint_best.pt by {cfg.run.best_metric})")
    elif isinstance(result, dict):
        metric = cfg.run.best_metric
        best = result.get(f"best_{metric}")
        what = {"valid_wer": "valid WER {:.2f} %", "valid_uer": "valid UER {:.2f} %", "valid_loss": "valid loss {:.4g}"}
        extra = f", best {what[metric].format(best)} (checkpoint_best.pt)" if best is not None and best < float("inf") else ""
        print(f"fine-tuning done: {result['num_updates']} updates; checkpoint {result.get('checkpoint')}{extra}")
    return 0
