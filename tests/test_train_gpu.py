"""Stage 3 on a CUDA device: bf16 autocast, channels_last, pinned workers, online teacher, export."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from _train_fixtures import make_npz, make_script_teacher, make_train_cache
from tcskd.train.loop import TrainConfig, train

pytestmark = pytest.mark.gpu


@pytest.fixture
def knn(monkeypatch):
    """faiss may be missing on a GPU image: fall back to a plain cosine 20-NN majority vote."""
    if importlib.util.find_spec("faiss") is not None:
        return
    import tcskd.train.evaluate as ev

    def knn_top1(train_x, train_y, test_x, test_y, k=20, **_):
        a = torch.nn.functional.normalize(torch.as_tensor(train_x).float(), dim=1)
        b = torch.nn.functional.normalize(torch.as_tensor(test_x).float(), dim=1)
        idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices
        pred = torch.as_tensor(train_y)[idx].mode(dim=1).values.numpy()
        return float((pred == np.asarray(test_y)).mean())

    monkeypatch.setattr(ev, "knn_top1", knn_top1)


def test_cuda_training_online_and_export(tmp_path, knn):
    npz = make_npz(tmp_path / "d.npz", n_train=512, n_test=128, size=32, channels=3, classes=4)
    chance = 1.0 / len(np.unique(np.load(npz)["y"]))
    spec = make_script_teacher(tmp_path / "teacher.pt", size=24, dim=32, channels=3)
    cache = make_train_cache(tmp_path, npz, views=2, dim=32, k=16, coords=True, teacher_size=24, chunk_rows=128,
                       fmt="hdf5", teacher_spec=spec)
    # 6 epochs (48 steps): after 2 the BatchNorm running statistics still lag, and the eval-mode classifier
    # of this toy (whose classes are plainly visible) answers one class: top-1 at chance, kNN near 100 %.
    # One selection step, after epoch 3: 16 -> 12 coordinates.
    common = dict(cache=str(cache), student="resnet20", epochs=6, batch_size=64, device="cuda", workers=2,
                  lam=5.0, select_every=3, drop_frac=0.25, min_dim=4, elsh_bits=16)
    res = train(TrainConfig(out=str(tmp_path / "tcs"), **common))
    assert res["device"].startswith("cuda")
    assert res["peak_mem_bytes"] > 0 and res["img_per_s"] > 0 and res["active_coords"] == 12
    rows = [json.loads(x) for x in (tmp_path / "tcs" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss_mimic"] < rows[0]["loss_mimic"] * 1.5
    assert [r["active_coords"] for r in rows] == [16, 16, 16, 12, 12, 12]
    assert all(r["val_top1"] is not None and "test_top1" not in r for r in rows)  # the test split: once, at the end
    assert res["val_top1"] == rows[-1]["val_top1"]
    print("tcs", {k: res[k] for k in ("val_top1", "test_top1", "knn_top1", "img_per_s", "peak_mem_bytes")})
    # observed on the CPU (fp32, same config): val, test and kNN top-1 all 1.0
    for key in ("val_top1", "test_top1", "knn_top1"):
        assert res[key] >= chance + 0.5, (key, res[key])

    online = train(TrainConfig(out=str(tmp_path / "online"), method="online", **common))
    print("online", {k: online[k] for k in ("val_top1", "test_top1", "knn_top1", "img_per_s", "peak_mem_bytes")})
    assert online["method"] == "online" and online["active_coords"] == 12
    for key in ("val_top1", "test_top1", "knn_top1"):
        assert online[key] >= chance + 0.5, (key, online[key])

    from tcskd.train.export import export_run, load_run

    path = export_run(tmp_path / "tcs", tmp_path / "student.pt2")
    student, head, _ = load_run(tmp_path / "tcs")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(path)).module()(x), head(student(x))[0], rtol=1e-5, atol=1e-5)
