"""Feature-space evaluation: weighted kNN and a linear probe, and the teacher's reference.

Both classifiers work on any (N x D) feature matrix, so they serve to measure
the teacher from its cached features (``evaluate_teacher``, no teacher
forward) and a trained student's embeddings alike.

- ``knn_top1``: the weighted kNN classifier of DINO (Caron et al. 2021) on
  L2-normalised features: the ``k`` most cosine-similar training rows vote for
  their label with weight ``exp(sim / T)``; the class with the largest summed
  vote wins (ties: the lowest class index). Exact search with faiss
  ``IndexFlatIP``, on the GPU when asked for and faiss has GPU support.
- ``linear_probe_top1``: multinomial logistic regression on standardised
  features (train mean / std), L2-regularised, fitted full-batch with L-BFGS
  from a seeded initialisation. The objective is strictly convex, so the
  result hardly depends on the seed, and it is deterministic on the CPU.
  ``tcskd eval`` chooses the probe's L2 penalty on the held-out validation
  rows (``linear_probe_eval``: a probe per decay of ``PROBE_WD_GRID``, the best
  validation top-1 kept) and scores the test split once, with that probe only.

Rows with a label below 0 (unlabelled) are ignored on both sides.

A student during and after training (tcskd.train.loop): :func:`embed` (its
features and logits on a dataset), :func:`top1`, and :func:`final_scores`
(validation and test top-1, and kNN top-1 with the labelled rows as references;
for segmentation, :func:`segment_scores`: mean IoU and pixel accuracy of the
pixel classifier on view 0 at the student's size, from one confusion matrix
summed over the dataset, tcskd.segmetrics).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F

from tcskd.device import autocast, resolve_device
from tcskd.errors import StoreError, TcskdError
from tcskd.results import EvalResult
from tcskd.segmetrics import confusion, miou, pixel_accuracy
from tcskd.splits import Holdout, labelled_mask
from tcskd.store.handle import Cache, open_cache
from tcskd.store.registry import resolve_cache
from tcskd.train.config import EvalConfig
from tcskd.train.data import ViewImages, eval_loader

if TYPE_CHECKING:
    from tcskd.train.head import TCSHead
    from tcskd.train.inputs import RunInputs
    from tcskd.train.students import Student

log = logging.getLogger(__name__)

#: Query rows per faiss search call (bounds the memory of one search).
KNN_QUERY_BATCH = 8192


# -- helpers ----------------------------------------------------------------

def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _labelled(x: np.ndarray, y: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x``/``y`` whose label is >= 0; TcskdError when shapes disagree or none is left."""
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise TcskdError(f"{side} features {x.shape} and labels {y.shape} do not match (expected N x D and N)")
    keep = y >= 0
    if not keep.any():
        raise TcskdError(f"no labelled {side} rows (every label is < 0)")
    if keep.all():
        return x, y
    return x[keep], y[keep]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, each row scaled to unit length (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _faiss_index(dim: int, device: torch.device) -> Any:
    """An exact inner-product index: on the GPU when asked for and available, else on the CPU."""
    import faiss

    if device.type == "cuda":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = device.index if device.index is not None else torch.cuda.current_device()
            index = faiss.GpuIndexFlatIP(res, dim, cfg)
            index._tcskd_res = res  # keep the resources alive as long as the index
            return index
        log.info("faiss has no GPU support here (faiss-cpu); kNN search runs on the CPU")
    return faiss.IndexFlatIP(dim)


# -- kNN --------------------------------------------------------------------

def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
                temperature: float = 0.07, device: str | torch.device = "cpu",
                num_classes: int | None = None) -> np.ndarray:
    """Weighted-kNN class predictions for every row of ``test_x``.

    ``train_x``/``train_y`` must hold labelled rows only (labels >= 0). ``k`` is
    clamped to the number of training rows. Returns int64 predictions.
    """
    if k < 1:
        raise TcskdError(f"k must be >= 1 (got {k})")
    if temperature <= 0:
        raise TcskdError(f"the kNN temperature must be > 0 (got {temperature})")
    train_y = np.asarray(train_y, dtype=np.int64)
    if train_x.shape[1] != test_x.shape[1]:
        raise TcskdError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    k = min(k, len(train_y))
    c = int(num_classes if num_classes is not None else train_y.max() + 1)
    index = _faiss_index(train_x.shape[1], _as_device(device))
    index.add(_l2_normalise(train_x))
    preds = np.empty(len(test_x), dtype=np.int64)
    for start in range(0, len(test_x), KNN_QUERY_BATCH):
        q = _l2_normalise(test_x[start:start + KNN_QUERY_BATCH])
        sims, idx = index.search(q, k)
        weights = np.exp(sims.astype(np.float64) / temperature)
        labels = train_y[idx]
        votes = np.zeros((len(q), c), dtype=np.float64)
        rows = np.arange(len(q))
        for j in range(k):  # one neighbour rank at a time: row indices are unique within a column
            votes[rows, labels[:, j]] += weights[:, j]
        preds[start:start + len(q)] = votes.argmax(axis=1)
    return preds


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             k: int = 20, temperature: float = 0.07, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (fraction) of the weighted kNN classifier; labels < 0 are ignored on both sides."""
    tx, ty = _labelled(train_x, train_y, "train")
    vx, vy = _labelled(test_x, test_y, "test")
    c = int(max(ty.max(), vy.max())) + 1
    preds = knn_predict(tx, ty, vx, k=k, temperature=temperature, device=device, num_classes=c)
    return float((preds == vy).mean())


# -- linear probe -----------------------------------------------------------

#: The probe's candidate L2 penalties with ``probe_wd`` auto: log-spaced from 1e-5 to 1000. With 1 or 2 labels
#: per class on the built-in default, 10 to 1000 win on validation (the probe then near a class-mean classifier
#: on standardised features); with every label 1e-5 to 1e-3.
PROBE_WD_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
#: The probe's L2 penalty when there are no labelled validation rows to choose one on (the former fixed value).
PROBE_WD_DEFAULT = 1e-3
#: Query rows per probe forward pass.
PROBE_QUERY_BATCH = 65536


@dataclass(frozen=True)
class LinearProbe:
    """A fitted linear probe: class = argmax of ``((x - mean) / std) @ w + b``."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    weight_decay: float

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """int64 class predictions for every row of ``x`` (N x D)."""
        out = np.empty(len(x), dtype=np.int64)
        for start in range(0, len(x), PROBE_QUERY_BATCH):
            q = torch.as_tensor(np.asarray(x[start:start + PROBE_QUERY_BATCH]), device=self.w.device).float()
            out[start:start + len(q)] = (((q - self.mean) / self.std) @ self.w + self.b).argmax(1).cpu().numpy()
        return out


def fit_linear_probes(train_x: np.ndarray, train_y: np.ndarray, weight_decays: Sequence[float],
                      num_classes: int | None = None, epochs: int = 100, device: str | torch.device = "cpu",
                      seed: int = 0) -> list[LinearProbe]:
    """One probe per L2 penalty of ``weight_decays``, each fitted on the labelled rows of ``train_x``/``train_y``
    from the same seeded initialisation (so each equals a probe fitted alone at its decay).

    Softmax regression with the penalty ``weight_decay / 2 * ||W||^2`` on the mean cross-entropy, fitted
    full-batch with L-BFGS (strong-Wolfe line search) for at most ``epochs`` iterations, on features
    standardised with the training rows' mean and standard deviation (one standardised copy, shared by the
    fits). ``num_classes`` defaults to the largest training label + 1.
    """
    if epochs < 1:
        raise TcskdError(f"linear probe epochs must be >= 1 (got {epochs})")
    bad = [wd for wd in weight_decays if not (math.isfinite(wd) and wd >= 0)]
    if bad:
        raise TcskdError(f"the probe's weight decay must be a finite number >= 0 (got {bad[0]})")
    tx, ty = _labelled(train_x, train_y, "train")
    dev = _as_device(device)
    c = int(num_classes if num_classes is not None else ty.max() + 1)
    d = tx.shape[1]
    # A copy (never a view of the caller's array): it is standardised in place below.
    x = torch.tensor(np.asarray(tx), dtype=torch.float32, device=dev)
    y = torch.as_tensor(ty, device=dev)
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    x.sub_(mean).div_(std)
    probes = []
    for wd in weight_decays:
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(d, c, generator=gen) * 0.01).to(dev).requires_grad_(True)
        b = torch.zeros(c, device=dev, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure(w: torch.Tensor = w, b: torch.Tensor = b, opt: torch.optim.LBFGS = opt,
                    wd: float = float(wd)) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        probes.append(LinearProbe(mean, std, w.detach(), b.detach(), float(wd)))
    del x
    return probes


def probe_top1(probe: LinearProbe, x: np.ndarray, y: np.ndarray, side: str = "test") -> float:
    """Top-1 accuracy (fraction) of ``probe`` on the labelled rows of ``x``/``y``."""
    vx, vy = _labelled(x, y, side)
    if vx.shape[1] != probe.w.shape[0]:
        raise TcskdError(f"train features have {probe.w.shape[0]} dims, {side} features {vx.shape[1]}")
    return float((probe.predict(vx) == vy).mean())


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      epochs: int = 100, device: str | torch.device = "cpu", seed: int = 0,
                      weight_decay: float = PROBE_WD_DEFAULT) -> float:
    """Top-1 accuracy (fraction) of a linear classifier on standardised features.

    Softmax regression with an L2 penalty ``weight_decay / 2 * ||W||^2`` on the mean cross-entropy, fitted
    full-batch with L-BFGS (strong-Wolfe line search) for at most ``epochs`` iterations (each one or a few
    passes over the training rows). Features are standardised with the training rows' mean and standard
    deviation. ``seed`` seeds the weight initialisation; labels < 0 are ignored on both sides.
    """
    return linear_probe_scores(train_x, train_y, [(test_x, test_y)], epochs, device, seed, weight_decay)[0]


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, queries: list[tuple[np.ndarray, np.ndarray]],
                        epochs: int = 100, device: str | torch.device = "cpu", seed: int = 0,
                        weight_decay: float = PROBE_WD_DEFAULT) -> list[float]:
    """:func:`linear_probe_top1` of one probe, fitted once, on each (x, y) of ``queries``."""
    tx, ty = _labelled(train_x, train_y, "train")
    labelled = [_labelled(qx, qy, "test") for qx, qy in queries]
    for vx, _ in labelled:
        if tx.shape[1] != vx.shape[1]:
            raise TcskdError(f"train features have {tx.shape[1]} dims, test features {vx.shape[1]}")
    c = int(max([ty.max()] + [vy.max() for _, vy in labelled])) + 1
    probe = fit_linear_probes(tx, ty, [weight_decay], c, epochs, device, seed)[0]
    return [probe_top1(probe, vx, vy) for vx, vy in labelled]


def linear_probe_eval(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                      test_x: np.ndarray, test_y: np.ndarray, weight_decay: float | str = "auto",
                      epochs: int = 100, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """The linear probe of ``tcskd eval``: its decay chosen on the validation rows, then test scored once.

    ``weight_decay`` ``auto``: a probe per decay of :data:`PROBE_WD_GRID`, each fitted on the labelled training
    rows and scored on the labelled validation rows; the best validation top-1 wins (ties: the larger decay)
    and only that probe is scored on the test rows. Without labelled validation rows, :data:`PROBE_WD_DEFAULT`
    (logged). A number: that decay. Returns ``linear_top1`` (test), ``val_linear_top1`` (None without
    validation rows; with ``auto`` it is the best of the candidates, so an optimistic figure), ``probe_wd`` (the
    decay used), ``probe_wd_source`` (val | given | default), ``probe_wd_grid`` (the decays fitted) and
    ``probe_wd_val_top1`` (each one's validation top-1, None without validation rows).
    """
    tx, ty = _labelled(train_x, train_y, "train")
    val_y = np.asarray(val_y).reshape(-1)
    has_val = bool((val_y >= 0).any())
    vx, vy = _labelled(val_x, val_y, "validation") if has_val else (None, None)
    ex, ey = _labelled(test_x, test_y, "test")
    c = int(max([ty.max(), ey.max()] + ([vy.max()] if has_val else []))) + 1
    if weight_decay == "auto" and has_val:
        grid, source = list(PROBE_WD_GRID), "val"
    elif weight_decay == "auto":
        grid, source = [PROBE_WD_DEFAULT], "default"
        log.warning("linear probe: no labelled validation rows to choose its weight decay on (--val-frac 0); "
                    "it uses %g", PROBE_WD_DEFAULT)
    elif isinstance(weight_decay, str):
        raise TcskdError(f"the probe's weight decay must be auto or a number (got {weight_decay!r})")
    else:
        grid, source = [float(weight_decay)], "given"
    probes = fit_linear_probes(tx, ty, grid, c, epochs, device, seed)
    val = [probe_top1(p, vx, vy, "validation") for p in probes] if has_val else [None] * len(probes)
    # The best validation top-1; among equals the larger decay (the simpler probe).
    best = max(range(len(grid)), key=lambda i: (val[i] if val[i] is not None else -1.0, grid[i]))
    test = probe_top1(probes[best], ex, ey, "test")
    if source == "val":
        log.info("linear probe: weight decay %g chosen on %d validation rows (val top-1 per decay: %s); "
                 "test top-1 %.2f %%", grid[best], len(vy), ", ".join(f"{wd:g} {100 * v:.2f} %"
                                                                       for wd, v in zip(grid, val)), 100 * test)
        if best in (0, len(grid) - 1) and val.count(val[best]) == 1:
            log.info("linear probe: the chosen weight decay %g is at the %s end of the candidates", grid[best],
                     "small" if best == 0 else "large")
    return {"linear_top1": test, "val_linear_top1": val[best], "probe_wd": grid[best], "probe_wd_source": source,
            "probe_wd_grid": grid, "probe_wd_val_top1": val}


# -- the teacher's reference accuracy ----------------------------------------

def read_view0(cache: Cache, desc: str = "features") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features of view 0 as float32 N' x D, labels N', sample_index N') of the rows with ``row_ok``.

    Reads the cache chunk by chunk (its ``chunk_rows``), so memory holds only
    the result and one chunk. A patch cache of raw tokens gives each view's mean
    token (the teacher's mean-pooled embedding); a cache of token coordinates
    (``coords_of``) is refused: its coordinates are in a basis of its own.
    """
    if cache.manifest.coords_of:
        raise StoreError(f"cache {cache.path} holds token coordinates in its own basis "
                         f"('{cache.manifest.coords_of}'): the teacher's kNN needs raw features (a global cache, "
                         f"or a patch cache built without --dim)")
    n, d = cache.n, cache.dim
    ok = cache.row_ok()
    labels = cache.labels()
    if labels.shape != (n,):
        raise StoreError(f"{cache.path}: features have {n} rows but labels/row_ok have "
                         f"{labels.shape[0]}/{ok.shape[0]}")
    keep = np.flatnonzero(ok)
    out = np.empty((len(keep), d), dtype=np.float32)
    show = None if n > 4 * cache.chunk_rows and log.isEnabledFor(logging.INFO) else False
    pos = 0
    for chunk in cache.chunks(desc=desc, ok=ok, view=0, progress=show):
        if not chunk.ok.any():
            continue
        block = chunk.x.astype(np.float32)[chunk.ok]
        if block.ndim == 3:  # rows x T x D tokens: their mean
            block = block.mean(1)
        if not np.isfinite(block).all():
            raise StoreError(f"cache {cache.path}: features rows {chunk.start}..{chunk.stop - 1} hold NaN/Inf "
                             f"values; the cache is damaged: rebuild it")
        out[pos:pos + len(block)] = block
        pos += len(block)
    return out, labels[keep], cache.sample_index()[keep]


def evaluate_teacher(cfg: EvalConfig) -> EvalResult:
    """kNN (and linear-probe) top-1 of the teacher from view 0 of two complete caches.

    Refuses (StoreError) incomplete caches and caches of different teachers or
    dims. Rows whose ``row_ok`` is False are excluded, and so are unlabelled
    rows. Returns {'knn_top1', 'linear_top1' (None when cfg.linear is False),
    'probe_wd' (the probe's decay, chosen on the validation rows with ``probe_wd``
    auto: :func:`linear_probe_eval`), 'k', 'train_rows', 'test_rows', 'teacher',
    'data', ...} with accuracies as fractions (:class:`tcskd.results.EvalResult`);
    writes it as JSON to ``cfg.out`` when given.
    """
    cfg.validate()
    t0 = time.perf_counter()
    dev = _as_device(cfg.device)
    train_path = resolve_cache(cfg.cache, cfg.cache_root)
    test_path = resolve_cache(cfg.test_cache, cfg.cache_root)
    if train_path.resolve() == test_path.resolve():
        log.warning("train and test caches are the same (%s): the accuracies are not held-out", train_path)
    # Incomplete or damaged caches (edited manifest, wrong shapes, lost chunks) are refused before anything is read.
    with open_cache(train_path, what="train") as tr, open_cache(test_path, what="test") as te:
        mtr, mte = tr.manifest, te.manifest
        if mtr.teacher_spec != mte.teacher_spec:
            raise StoreError(f"train and test caches come from different teachers: "
                             f"'{mtr.teacher_spec}' vs '{mte.teacher_spec}'")
        t_tr, t_te = mtr.teacher_identity, mte.teacher_identity
        if t_tr and t_te and t_tr != t_te:
            diff = sorted(k for k in set(t_tr) | set(t_te) if t_tr.get(k) != t_te.get(k))
            raise StoreError(f"train and test caches come from different versions of teacher "
                             f"'{mtr.teacher_spec}' (they differ in: {', '.join(diff)}); rebuild the older one")
        if (mtr.split or "train") != "train":
            raise StoreError(f"--cache must be a cache of the train split (the references and the held-out "
                             f"validation rows come from it); {train_path} holds split '{mtr.split}'")
        dtr, dte = tr.dim, te.dim
        if dtr != dte or mtr.dim != mte.dim:
            raise StoreError(f"train and test caches have different feature dims: {dtr} vs {dte}")
        if mtr.data_spec != mte.data_spec:
            log.warning("train and test caches hold different datasets: %s vs %s", mtr.data_spec, mte.data_spec)
        train_x, train_y, train_si = read_view0(tr, "train features")
        test_x, test_y, _ = read_view0(te, "test features")
    # The rows a training run with the same options holds out and labels (tcskd.splits).
    holdout = Holdout(cfg.val_frac, cfg.val_per_class, cfg.val_seed)
    val = holdout.mask(train_y, train_si)
    labelled = labelled_mask(train_y, train_si, cfg.labels_per_class, cfg.seed, eligible=~val)
    val_x, val_y = train_x[val], train_y[val]
    train_x, train_y = train_x[labelled], train_y[labelled]
    n_train, n_test = int((train_y >= 0).sum()), int((test_y >= 0).sum())
    if n_train == 0:
        raise StoreError(f"train cache {train_path} has no labelled rows to evaluate with")
    if n_test == 0:
        raise StoreError(f"test cache {test_path} has no labelled rows to evaluate on")
    log.info("evaluating teacher %s: %d train / %d test rows, dim %d", mtr.teacher_spec,
             n_train, n_test, dtr)
    # kNN on the validation rows (when there are labelled ones) and on test; the probe's decay chosen on val.
    queries = {"val_": (val_x, val_y), "": (test_x, test_y)}
    queries = {p: q for p, q in queries.items() if (q[1] >= 0).any()}
    result: dict[str, Any] = {"val_knn_top1": None}
    for prefix, (qx, qy) in queries.items():
        result[f"{prefix}knn_top1"] = knn_top1(train_x, train_y, qx, qy, k=cfg.k, temperature=cfg.temperature,
                                               device=dev)
    if cfg.linear:
        result.update(linear_probe_eval(train_x, train_y, val_x, val_y, test_x, test_y, cfg.probe_wd,
                                        epochs=cfg.probe_epochs, device=dev, seed=cfg.seed))
    else:
        result.update({"linear_top1": None, "val_linear_top1": None, "probe_wd": None, "probe_wd_source": None,
                       "probe_wd_grid": [], "probe_wd_val_top1": []})
    result.update({
        "k": min(cfg.k, n_train), "train_rows": n_train, "val_rows": int(val.sum()),
        "labels_per_class": cfg.labels_per_class, "seed": cfg.seed, "holdout": holdout.as_dict(),
        "test_rows": n_test, "teacher": mtr.teacher_spec, "data": mtr.data_spec,
        "test_data": mte.data_spec, "dim": int(dtr), "temperature": cfg.temperature,
        "train_cache": str(train_path), "test_cache": str(test_path),
        "seconds": round(time.perf_counter() - t0, 3), "config": asdict(cfg),
    })
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        log.debug("wrote %s", out)
    return cast(EvalResult, result)


# -- a trained student ---------------------------------------------------------

@torch.no_grad()
def embed(student: Student, head: TCSHead, ds: ViewImages, device: torch.device, batch_size: int,
          workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(features N x d_s, logits N x C) of every image of ``ds`` (its view 0, no augmentation)."""
    was = student.training
    student.eval()
    head.eval()
    feats, logits = [], []
    for x, *_ in eval_loader(ds, batch_size, workers, device):
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            f = student(x)
            lo, _ = head(f)
        feats.append(f.float().cpu())
        logits.append(lo.float().cpu())
    student.train(was)
    head.train(was)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@torch.no_grad()
def segment_scores(student: Student, head: TCSHead, ds: ViewImages, device: torch.device, batch_size: int,
                   workers: int) -> tuple[float | None, float | None]:
    """(mean IoU, pixel accuracy) of the pixel classifier on every image of ``ds`` (view 0, its masks at the
    student's size, 255 ignored); None when no pixel is labelled."""
    was = student.training
    student.eval()
    head.eval()
    c = int(head.pixel_classifier.out_channels)
    conf = np.zeros((c, c), np.int64)
    for batch in eval_loader(ds, batch_size, workers, device):
        x = batch.x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = head.segment(student.feature_map(x), tuple(x.shape[-2:]))
        conf += confusion(logits.argmax(1), batch.mask.to(device), c)
    student.train(was)
    head.train(was)
    if conf.sum() == 0:
        return None, None
    return miou(conf), pixel_accuracy(conf)


def top1(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy of ``logits`` on the rows whose label is >= 0; None when there is none."""
    keep = labels >= 0
    if not keep.any():
        return None
    return float((logits[keep].argmax(1) == labels[keep]).mean())


def final_scores(student: Student, head: TCSHead, prep: RunInputs, device: torch.device, batch_size: int,
                 workers: int) -> dict[str, Any]:
    """Top-1 of the classifier on the validation rows and on the test split, and of a weighted kNN on the
    student's features whose references are the labelled training rows only (``knn_reference_rows``). A
    segmentation run gets ``val_miou``, ``test_miou``, ``val_pixel_acc`` and ``test_pixel_acc`` instead (the
    top-1 and kNN keys None)."""
    if head.task == "segment":
        seg: dict[str, Any] = {"val_top1": None, "test_top1": None, "knn_top1": None, "knn_val_top1": None,
                               "knn_reference_rows": 0}
        for name, ds in (("val", prep.val_set), ("test", prep.test_set)):
            scores = (None, None) if ds is None else segment_scores(student, head, ds, device, batch_size, workers)
            seg[f"{name}_miou"], seg[f"{name}_pixel_acc"] = scores
        return seg
    out: dict[str, Any] = {"val_top1": None, "test_top1": None, "knn_top1": None, "knn_val_top1": None,
                           "knn_reference_rows": int((prep.knn_set.ce_labels >= 0).sum())}
    ref = None
    for name, ds in (("val", prep.val_set), ("test", prep.test_set)):
        if ds is None or not (ds.ce_labels >= 0).any():
            continue
        feats, logits = embed(student, head, ds, device, batch_size, workers)
        out[f"{name}_top1"] = top1(logits, ds.ce_labels)
        if out["knn_reference_rows"]:
            if ref is None:
                ref = embed(student, head, prep.knn_set, device, batch_size, workers)[0]
            key = "knn_top1" if name == "test" else "knn_val_top1"
            out[key] = knn_top1(ref, prep.knn_set.ce_labels, feats, ds.ce_labels, k=20, device=device)
    return out
