"""Evaluation probes on frozen representations and frame labels.

- `purity`: phone purity, cluster purity and PNMI of frame labels (a label file, or the
  k-means clusters of a model layer or of MFCCs) against phone alignments, and a frame-level
  linear phone classifier (`mt4ssl purity`).

- `ctc`: the phone-recognition probe (`mt4ssl probe`): a linear CTC head per frozen layer
  (or on MFCCs) trained on features extracted once, PER per layer. It is the cheap probe of
  the CPU demo and `make reproduce`: s3prl's PR task (`mt4ssl superb --task pr`, the SUPERB
  protocol: a weighted sum of layers, the upstream run at every step) is the standard one and
  costs about 50x more per update on the tiny model here.
"""
