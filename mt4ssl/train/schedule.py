"""Learning-rate schedules as multipliers of the peak lr, for `torch.optim.lr_scheduler.LambdaLR`.

tri_stage (fairseq's, the paper's): linear warm-up from init_lr_scale to 1 over the first
  phase, hold, then exponential decay to final_lr_scale over the last phase, then constant.
polynomial: linear warm-up from 0, then linear decay to final_lr_scale (power 1).
cosine: linear warm-up from 0, then half a cosine down to final_lr_scale.
constant: linear warm-up from 0, then 1.
"""

from __future__ import annotations

import math
from typing import Callable

from mt4ssl.train.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, max_updates: int) -> Callable[[int], float]:
    if cfg.schedule == "tri_stage":
        warmup, hold, decay = (round(r * max_updates) for r in cfg.phase_ratio)

        def tri_stage(step: int) -> float:
            if step < warmup:
                return cfg.init_lr_scale + (1 - cfg.init_lr_scale) * step / warmup
            step -= warmup
            if step < hold:
                return 1.0
            step -= hold
            if step <= decay and decay > 0:
                return math.exp(math.log(cfg.final_lr_scale) * step / decay)
            return cfg.final_lr_scale

        return tri_stage

    warmup = round(cfg.warmup_ratio * max_updates)
    rest = max(1, max_updates - warmup)

    def after_warmup(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / rest)
        if cfg.schedule == "polynomial":
            return 1 - (1 - cfg.final_lr_scale) * progress
        if cfg.schedule == "cosine":
            return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return after_warmup
