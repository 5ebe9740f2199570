"""Prediction targets: one module per kind behind the `Target` interface (see base.py).

`kmeans` (offline cluster ids, HuBERT-like), `teacher` (online EMA teacher, data2vec-like);
both together are MT4SSL. A model config lists the enabled kinds; each kind reads its own
config section of the same name.
"""

from mt4ssl.targets.base import Target, TargetBatch
from mt4ssl.targets.kmeans import KMeansConfig, KMeansTarget
from mt4ssl.targets.teacher import CollapseGuard, TeacherConfig, TeacherTarget, TrainingCollapsed

TARGET_KINDS: dict[str, type[Target]] = {
    "kmeans": KMeansTarget,
    "teacher": TeacherTarget,
}

__all__ = [
    "TARGET_KINDS",
    "CollapseGuard",
    "KMeansConfig",
    "KMeansTarget",
    "Target",
    "TargetBatch",
    "TeacherConfig",
    "TeacherTarget",
    "TrainingCollapsed",
]
