"""Stage 3: train students from cached teacher coordinates (no teacher in the loop).

- ``loop``: ``TrainConfig`` and ``train(cfg) -> final.json dict``, one page: prepare, build, restore, then per
  epoch train, evaluate, select, save; the final scores.
- ``inputs``: what a run reads before it starts (``RunInputs``): rows, targets and datasets.
- ``targets``: which rows of the dataset the cache holds, and their targets (bases, scale).
- ``data``: the datasets, the epoch sampler, augmentation and the DataLoaders (``train_loader``).
- ``students``: the student networks (``--student``), each a backbone to a penultimate feature.
- ``head``: the TCS head (classifier, projector, coordinate mask and importance gate).
- ``losses``: CE + lambda * mimic + mu * eLSH, as pure functions.
- ``selection``: tailoring (iterative coordinate selection) schedule.
- ``config``: ``TrainConfig`` / ``EvalConfig`` (every option declared once; ``validate``, the tailor presets).
- ``checkpoint``: the checkpoint's content, its atomic write, RNG state, resume checks.
- ``rundir``: the run directory and its files (atomic text writes, ``metrics.jsonl``).
- ``plots``: the learning curves (``curves.png``).
- ``evaluate``: kNN and linear-probe accuracy of features; a student's final scores.
- ``export``: a run's student as a ``torch.export`` program (``.pt2``) or ONNX model returning logits.
- ``logger``: ``--log``: metrics.jsonl mirrored to TensorBoard and/or wandb (``MetricsLogger``).
- ``report``: tables and plots over many runs.
- ``commands``: the click commands ``train``, ``eval``, ``export`` and ``report``.

This package never imports ``tcskd.teachers`` unless the method is ``online``.
"""
