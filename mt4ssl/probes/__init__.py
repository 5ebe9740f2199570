"""Evaluation probes on frozen representations and frame labels.

- `purity`: phone purity, cluster purity and PNMI of frame labels (a label file, or the
  k-means clusters of a model layer or of MFCCs) against phone alignments, and a frame-level
  linear phone classifier (`mt4ssl purity`).

The CTC phone-recognition probe is `mt4ssl.finetune.probe` (`mt4ssl probe`).
"""
