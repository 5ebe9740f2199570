"""mt4ssl: multi-target self-supervised speech pretraining recipes."""

__version__ = "0.1.0"
