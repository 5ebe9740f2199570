"""run.compile=true: the compiled training step gives the eager step's losses and weights, in
one graph without breaks (masks sampled outside the model, masked frames gathered), reused
for batches of other sizes (dynamic shapes); crop lengths repeat (data.crop_multiple_ms)."""

from __future__ import annotations

import pytest
import torch

from mt4ssl.errors import InputError
from mt4ssl.train import distributed, pretrain
from tests.test_train import make_cfg, prepared  # noqa: F401  (the fixture)

# batches of 2 utterances (ranks in length order) whose crops are 32000, 40000, 48000 and 36000
# samples: after the first two, a longer crop than any compiled for, then one in between
PAIRS = [(0, 1), (4, 5), (6, 7), (3, 4)]


def test_crop_lengths_are_multiples_of_crop_multiple_ms(prepared, tmp_path):  # noqa: F811
    trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / "run", "data.crop_multiple_ms=250"),
                               distributed.setup("cpu"))
    lengths = {batch["wav"].shape[1] for batch in trainer.loader}
    assert lengths and all(n % 4000 == 0 for n in lengths)
    assert len(lengths) <= len({n // 4000 for n in trainer.dataset.sizes})  # at most one shape per bucket
    exact = pretrain.Trainer(make_cfg(prepared, tmp_path / "run0", "data.crop_multiple_ms=0"),
                             distributed.setup("cpu"))
    assert {batch["wav"].shape[1] for batch in exact.loader} == {min(exact.dataset.sizes[b]) for b in exact.sampler.batches}
    # the default: exact crops when eager (fairseq's), 250 ms buckets under run.compile
    assert make_cfg(prepared, tmp_path / "d").crop_ms() == 0
    assert make_cfg(prepared, tmp_path / "d", "run.compile=true").crop_ms() == 250
    assert make_cfg(prepared, tmp_path / "d", "run.compile=true", "data.crop_multiple_ms=0").crop_ms() == 0
    with pytest.raises(InputError, match="data.crop_multiple_ms"):
        make_cfg(prepared, tmp_path / "bad", "data.crop_multiple_ms=-1")
    with pytest.raises(InputError, match="data.crop_multiple_ms"):
        make_cfg(prepared, tmp_path / "bad", "data.crop_multiple_ms=5000")  # longer than data.min_samples


@pytest.mark.compile
def test_compiled_step_equals_eager_in_one_graph(prepared, tmp_path, monkeypatch):  # noqa: F811
    from torch._dynamo.utils import counters

    # no cached graphs: checking a cached static graph's guards specialised the frame count
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)

    torch._dynamo.reset()
    counters.clear()
    results = {}
    for mode in ("eager", "compiled"):
        trainer = pretrain.Trainer(make_cfg(prepared, tmp_path / mode, f"run.compile={mode == 'compiled'}",
                                            "run.precision=fp32", "model.layerdrop=0.0",
                                            "data.crop_multiple_ms=250"),  # both modes: the same crops
                                   distributed.setup("cpu"))
        shapes, losses, order = [], [], trainer.dataset.sizes.argsort(kind="stable")
        for pair in PAIRS:
            batch = trainer.task.collate([trainer.dataset[int(order[r])] for r in pair])
            shapes.append(tuple(batch["wav"].shape))
            stats = trainer.train_step([batch])
            losses.append(stats["loss"] / stats["sample_size"])
        results[mode] = losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert len({n for _, n in shapes}) == len(PAIRS), shapes  # four crop lengths (and mask counts)
    torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for key, value in results["eager"][1].items():
        torch.testing.assert_close(results["compiled"][1][key], value, rtol=1e-3, atol=1e-5, msg=key)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # bounded recompilation: the first crop length compiles a static graph, the second one with
    # the changed dimensions dynamic (automatic dynamic shapes), which every later length reuses
    # (with inductor's layout optimization each longer crop compiled again, issue 11);
    # dynamo counts no recompiles itself, frames.ok counts compilations
    assert 1 <= counters["frames"]["ok"] <= 2, counters["frames"]["ok"]
