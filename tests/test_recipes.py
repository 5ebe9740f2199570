"""The recipes' configs load, and the LibriSpeech chain plans the right jobs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt4ssl.config import load_config
from mt4ssl.train.config import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,targets,layers", [
    ("librispeech/mt4ssl_base.yaml", ("kmeans", "teacher"), 12),
    ("librispeech/hubert_like_base.yaml", ("kmeans",), 12),
    ("librispeech/data2vec_like_base.yaml", ("teacher",), 12),
    ("librispeech/hubert_iter1_base.yaml", ("kmeans",), 12),
    ("tiny/pretrain.yaml", ("kmeans", "teacher"), 4),
])
def test_recipe_configs(name, targets, layers):
    cfg = load_config(PretrainConfig, ROOT / "recipes" / name)
    model = cfg.model_config()
    assert model.targets == targets and model.num_layers == layers
    if name.startswith("librispeech/") and name != "librispeech/hubert_iter1_base.yaml":
        # the paper's recipe: 400k updates, lr 5e-4, tri-stage 3/90/7, 3.8M samples per GPU, 16 GPUs
        assert cfg.run.max_updates == 400_000 and cfg.optim.lr == 5e-4
        assert cfg.optim.phase_ratio == (0.03, 0.9, 0.07) and cfg.data.max_tokens == 3_800_000
        assert cfg.launch.nodes * cfg.launch.gpus_per_node * cfg.run.update_freq == 16
        assert model.mask_prob == 0.65 and model.layerdrop == 0.05 and model.teacher.top_k == 8


def test_librispeech_chain_dry_run(tmp_path):
    """The plan prints on any machine: here no SLURM command is on PATH, and nothing is written."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/librispeech/submit.py"), "--librispeech",
                           "/data/LibriSpeech", "--work", str(tmp_path / "w"), "--dry-run"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.startswith("stage ")]
    assert [line.split(":")[0].split()[1] for line in lines] == [
        "manifests", "mfcc", "mfcc-valid", "kmeans-mfcc", "labels-mfcc-train", "labels-mfcc-valid",
        "hubert-iter1", "layer6", "layer6-valid", "kmeans-layer6", "labels-hubert500-train",
        "labels-hubert500-valid", "mt4ssl"]
    assert "array mfcc (100 tasks) after manifests" in lines[1]
    assert "--nshard 1 " in lines[5] and "valid" in lines[5]
    assert "after labels-hubert500-valid" in lines[-1] and "mt4ssl_base.yaml" in lines[-1]


@pytest.mark.parametrize("split,updates,lr,channel_prob,layerdrop,freeze", [
    ("10m", 13000, 5e-5, 0.25, 0.1, 10000),
    ("1h", 13000, 5e-5, 0.25, 0.1, 10000),
    ("10h", 20000, 5e-5, 0.5, 0.05, 0),  # the official MT4SSL 10 h config
    ("100h", 80000, 3e-5, 0.5, 0.1, 0),
])
def test_finetune_recipe_configs(split, updates, lr, channel_prob, layerdrop, freeze):
    from mt4ssl.finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, ROOT / "recipes" / "librispeech" / f"finetune_{split}.yaml")
    assert (cfg.run.max_updates, cfg.optim.lr, cfg.model.mask_channel_prob, cfg.model.layerdrop,
            cfg.model.freeze_finetune_updates) == (updates, lr, channel_prob, layerdrop, freeze)
    assert cfg.data.train_split == {"100h": "train-clean-100"}.get(split, f"train-{split}")
    assert cfg.data.valid_split == "dev-other" and cfg.data.max_tokens == 3_200_000
    assert cfg.launch.nodes * cfg.launch.gpus_per_node * cfg.run.update_freq == 8  # 2 GPUs x update_freq 4
    assert (cfg.optim.optimizer, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ("adam", (0.9, 0.98), 1e-8, 0.0)
    assert cfg.optim.phase_ratio == (0.1, 0.4, 0.5) and cfg.optim.final_lr_scale == 0.05
    assert (cfg.model.mask_prob, cfg.model.mask_length, cfg.model.mask_channel_length) == (0.65, 10, 64)
    assert cfg.model.activation_dropout == 0.1 and cfg.model.dropout == 0.0
    assert cfg.run.out_dir.endswith(f"ft{split}")
    tiny = load_config(FinetuneConfig, ROOT / "recipes/tiny/finetune.yaml")
    assert tiny.run.init_from == "exp/tiny/pretrain/checkpoints/checkpoint_last.pt"


def test_tiny_finetune_and_decode_recipes():
    """The settings recipes/tiny/finetune.yaml documents as measured, its decode settings, and
    the script that runs the comparison parses."""
    from mt4ssl.finetune.config import FinetuneConfig
    from mt4ssl.finetune.decode import BeamConfig

    tiny = load_config(FinetuneConfig, ROOT / "recipes/tiny/finetune.yaml")
    assert (tiny.model.mask_prob, tiny.model.mask_channel_prob, tiny.model.freeze_finetune_updates) == (0.0, 0.0, 0)
    assert tiny.model.cache_cnn and tiny.run.best_metric == "valid_uer" and tiny.optim.lr == 1e-3
    assert load_config(BeamConfig, ROOT / "recipes/tiny/decode.yaml") == BeamConfig(beam=500)
    assert load_config(BeamConfig, ROOT / "recipes/librispeech/decode_4gram.yaml") == BeamConfig()
    for script in ("finetune.sh", "reproduce.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "recipes/tiny" / script)], check=True)
