"""Peer arms: tcskd's job trained by independently written distillation code (torchdistill, timm).

Each arm drives the peer framework's own machinery and losses (torchdistill's ``DistillationBox`` /
``TrainingBox`` with its registered losses and loss wrappers; timm's ``FeatureDistillationTask`` /
``ClassificationTask``); tcskd supplies only the glue (tcskd.bench.peers.glue): the cache's teacher on the
student's input, the student and head initialised as ``tcskd train`` does at the same seed, the held-out
split and labelled rows, the batches and augmentation, the optimiser and per-step schedule, and the scoring
(tcskd.bench.peers.run). The arms: :data:`~tcskd.bench.peers.arms.ARMS`; the options:
:class:`~tcskd.bench.peers.config.PeerConfig`; the command: ``python -m tcskd.bench.peers --arm ARM --cache
KEY ...`` (tcskd.bench.peers.__main__). They need the ``peers`` extra (``pip install 'tcskd[peers]'``).

The arms: ``torchdistill-fitnet`` and ``timm-fitnet`` (online FitNet from the cache's teacher as it is),
``torchdistill-ce`` and ``timm-ce`` (CE only), and the traditional KD pipeline: the teacher first fine-tuned
for the task (``python -m tcskd.bench.peers.finetune``: the whole teacher and a linear classifier, CE on the
run's labelled rows, BiT-HyperRule's recipe; tcskd.bench.peers.finetune), then distilled every step by
``torchdistill-kd`` (Hinton KD: ``KDLoss`` on its logits), ``torchdistill-crd`` (``CRDLoss``) or
``torchdistill-rkd`` (``RKDLoss`` on the global embeddings), each given ``--teacher-ckpt``; their final.json
adds the fine-tuning's cost (``teacher_finetune``, ``pipeline_train_seconds``).

Pitfalls met on the way, and what the harness does about each (tests/test_peers.py and
tests/test_peers_traditional.py check them):

- A batch without a labelled row (10 labels per class: about 1 batch in 18 at batch 128): torch's
  ``CrossEntropyLoss(ignore_index=-1)`` returns NaN (0 / 0), and the default ``ignore_index=-100`` of timm's and
  torchdistill's CE fails on the label -1. Both peers get tcskd's labelled CE (0 on such a batch; registered in
  torchdistill's low-level loss registry, passed to timm's tasks as their criterion); an epoch whose mean loss
  is not finite stops the run.
- torchdistill's scheduler steps once per epoch unless ``scheduling_step`` is set: it is 1 (per optimizer
  step, as tcskd's ``lr_at``); the learning rate of every step is checked against ``lr_at``.
- torchdistill's ``pre_epoch_process`` puts the student in train mode and never the teacher in eval mode, and
  a teacher without ``requires_grad: False`` is trained with the student (the optimizer gets its parameters)
  and run with gradients: the teacher is passed frozen and in eval mode, ``requires_grad: False`` is set, the
  optimizer is checked to hold no teacher parameter, and the teacher's weights and statistics are compared
  before and after training (the run fails if they changed or the teacher left eval mode).
- torchdistill 1.1.5 has no default forward process (a config without ``forward_proc`` fails with "No forward
  process function `None` registered"): ``forward_batch_only`` is named for teacher and student.
- timm's ``FeatureDistillationTask`` makes its projection with its own initialisation, and torchdistill's
  ``Linear4CCKD`` its regressor: both are overwritten with tcskd fitnet's initial projector, so all arms start
  from the same weights at the same seed (checked).
- timm normalises the teacher's input itself from the two models' ``pretrained_cfg`` (the student's: mean 0,
  std 1, tcskd's inputs being in [0, 1]); torchdistill does not (its examples give teacher and student the
  same normalised input): the teacher module normalises there, and not under timm, so the teacher sees its
  own normalisation once in both (checked against the cached features; a missing normalisation fails it).
- The cached targets are the teacher's features of the uint8-resized centre view (rounded to whole grey
  levels), the peers' those of the float-resized input: cosine >= 0.999 and norms within 2 % on the built-in
  teacher, and the first FitNet loss within 1e-3 relative of tcskd fitnet's.
- tcskd's fitnet divides its targets by one global scale (``--target-norm global``): the peers' teacher module
  divides by the same scale, read from the cache, so lambda means the same (``--target-norm none``: raw).
- KD's soft term belongs to every row (the teacher labels every image, labelled or not); torchdistill's
  ``KDLoss`` would also compute its hard CE with ``nn.CrossEntropyLoss`` (fails on the label -1, NaN with
  ``ignore_index=-1`` on a batch without labels): it runs with ``alpha`` 0 (it then returns its KL alone,
  without the T^2 factor), weighted (1 - alpha) T^2, beside tcskd's labelled CE weighted alpha (checked
  against ``kl_div`` by hand over all rows; over the labelled rows only the loss differs).
- CRD needs every row's dataset index (its memory has one row per training image) and negatives in the
  batch's supplementary dict: the harness passes the batch's ``item`` to the arm's step. torchdistill 1.1.5's
  ``CRDLoss`` cannot draw the negatives itself (``draw`` reads ``self.prob``, which does not exist: checked)
  and its ``CRDDatasetWrapper`` draws class-conditional negatives from a label every row must have: the
  harness draws them uniformly over the training rows (the loss's own noise distribution) with the run's
  seed. ``output_size`` / ``num_samples`` are the training rows, not the labelled ones. torchdistill's CRD
  teacher is ``requires_grad: True`` with ``frozen_modules: ['model']`` (its projection trains): the
  teacher's own weights and mode are still checked after the run.
- The fine-tuned teacher must serve the run it was fine-tuned for: the checkpoint records the cache, the
  teacher, the seed, the split options and a digest of the labelled rows and labels; any difference is
  refused. The fine-tuning sees only the labelled rows (a sampler over them; a batch with an unlabelled row
  stops it) and never the validation rows (held out by the same ``load_run_inputs``).
- timm's optimizer factory makes ``sgd`` Nesterov and leaves biases and norms out of weight decay; timm ships
  no training loop as a library. The timm arms use ``torch.optim.SGD`` (no Nesterov, decay on every
  parameter, as tcskd) and the usual loop around the task.
"""

from tcskd.bench.peers.arms import ARMS, TRADITIONAL, build_arm, distils, framework_of, require_framework, traditional
from tcskd.bench.peers.config import PeerConfig
from tcskd.bench.peers.run import prepare, run_arm

__all__ = ["ARMS", "PeerConfig", "TRADITIONAL", "build_arm", "distils", "framework_of", "prepare", "require_framework",
           "run_arm", "traditional"]
