"""``tcskd bench``: how fast each stage runs, against the figure it should be compared with.

Every comparison is measured in one process (the training methods: one child
process each, so that a CPU peak RSS belongs to one method) on the same inputs,
and every figure is the median of ``repeats`` runs after ``warmup`` runs:

- cache (:mod:`.forward`, :mod:`.cache`): end-to-end rows/s of
  :func:`tcskd.cache.build.build_cache` (what ``tcskd cache`` runs: teacher
  load, store creation, input pipeline, forward, writes) versus the teacher's
  forward alone on the same device and batch size, on pre-decoded inputs
  already on the device -> ``cache_vs_forward``; the input pipeline alone (the
  cache's DataLoader without the teacher); and rows/s at N, 2N and 4N rows with
  a linear fit (fixed seconds + marginal rows/s), whose per-row cost must not
  grow with N.
- basis (:mod:`.basis`): :func:`tcskd.subspace.fit.fit_basis` versus one plain
  sequential read of ``features`` -> ``basis_vs_read``; the streamed moments
  alone as well; the parts of the fit from the timings ``fit_basis`` returns.
- train (:mod:`.train`): :func:`tcskd.train.loop.train` for ``ce``, ``tcs``
  (cached targets) and ``online`` (teacher in the loop) with the same student,
  batch and steps: img/s (the loop's own per-epoch figure; epoch 1 is the
  warm-up) and peak memory (CUDA max allocated, or the child process's peak RSS).
- dataloading: per training method, the time the loop waits for its next batch,
  and the DataLoader alone.

The stages are measured through what they return (``CacheResult.timings``,
``fit_basis(...)["timings"]``, the training run's ``metrics.jsonl``), never by
patching their internals. Profiles: :mod:`.profiles`; inputs made at run time:
:mod:`.synthetic`; the whole run: :mod:`.run`; the JSON's goals and the Markdown
table: :mod:`.report`; the click command: :mod:`.cli` (``python -m tcskd.bench``
runs it too).

This module imports nothing, so that a training child process
(:func:`tcskd.bench.train.train_child`) loads only what training needs.
"""
