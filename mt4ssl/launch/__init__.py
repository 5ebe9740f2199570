"""Where jobs run: this process, or SLURM through submitit (checkpoint + requeue), and stage chains.

    launch(cfg)                          pretraining here (launch.launcher=local) or on SLURM
    executor_for(cfg.launch, folder)     a submitit executor from slurm/<profile>.yaml + launch.*
    submit_chain([Stage(...), ...], ex)  recipe stages as dependent jobs / job arrays

Names are imported on first use, so `python -m mt4ssl.launch.submit` (the plain-sbatch task
runner) does not import its own module twice.
"""

import importlib

_EXPORTS = {
    "mt4ssl.launch.submit": ["DEFAULT_TARGET", "SlurmProfile", "TrainJob", "distributed_env", "executor_for",
                             "launch", "load_profile"],
    "mt4ssl.launch.chain": ["CliJob", "PlannedJob", "Stage", "StageError", "run_cli", "submit_chain"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
