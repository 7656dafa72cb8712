"""Stage 3: train students from cached teacher coordinates (no teacher in the loop).

- ``students``: the student networks (``--student``), each a backbone to a penultimate feature.
- ``head``: the TCS head (classifier, projector, coordinate mask and importance gate).
- ``losses``: CE + lambda * mimic + mu * eLSH, as pure functions.
- ``selection``: tailoring (iterative coordinate selection) schedule.
- ``targets``: rows, views and targets from the cache; the datasets and sampler.
- ``config``: ``TrainConfig`` / ``EvalConfig`` (every option declared once; ``validate``, the tailor presets).
- ``loop``: ``train(cfg) -> final.json dict`` (one explicit loop).
- ``export``: a run's student as TorchScript returning logits.
- ``evaluate``: kNN and linear-probe accuracy of features.
- ``commands``: the click commands ``train``, ``eval``, ``export`` and ``report``.

This package never imports ``tcskd.teachers`` unless the method is ``online``.
"""
