"""The cost and accuracy claims checked on a folder of finished runs (``scripts/peers.sh``): each goal as
measured, met or not met, or not measured when a run it needs is missing.

``python -m tcskd.bench.peers.claims RUNS`` prints the Markdown table. RUNS holds run directories (tcskd
train's and the peer arms', all with ``final.json``) and ``pipeline.json`` (the seconds of ``tcskd cache`` and
``tcskd basis`` for the train cache, measured once on an empty cache root). Runs are grouped by (method,
labels per class, augmentation); a group's figure is the mean over its seeds, and the accuracy claims allow
the larger of the two groups' sample std.

The goals (the paper's, taken as goals, not as facts):

- tcs training seconds per epoch <= 1.1 x each peer's CE-only arm;
- each peer arm that runs a teacher every step (online FitNet, and KD / CRD / RKD from a fine-tuned
  teacher) / tcs >= 2 x per epoch, and >= 1.5 x end to end for one run (tcs: cache + basis + its run; the
  traditional arms: the teacher's fine-tuning + their run);
- tcs peak memory <= 0.7 x each peer's online FitNet (over the RSS after imports on the CPU, allocated on a
  GPU);
- tcs test top-1 >= each peer arm's mean - the larger std, at each label budget;
- the control (no augmentation: tcskd ``online`` with the identity basis and the peers' FitNet, one
  objective) agrees within 2 x the larger std, on val and test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tcskd.errors import TcskdError
from tcskd.train.report import expand_run_dirs, load_runs, mean_std

#: Peer arms that run a teacher every step (online FitNet; the traditional pipeline's KD, CRD and RKD from a
#: fine-tuned teacher), and CE-only, by framework.
PEER_ONLINE = ("torchdistill-fitnet", "timm-fitnet", "torchdistill-kd", "torchdistill-crd", "torchdistill-rkd")
#: The arms of the control (no augmentation, one objective with tcskd online).
CONTROL = ("torchdistill-fitnet", "timm-fitnet")
PEER_CE = ("torchdistill-ce", "timm-ce")


def _budget(v: Any) -> str:
    return "all" if v is None else str(v)


def group(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Runs by (method, labels per class as text, augmentation)."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((str(r.get("method")), _budget(r.get("labels_per_class")), str(r.get("augment"))),
                       []).append(r)
    return out


def _stat(runs: list[dict[str, Any]] | None, key: str, scale: float = 1.0) -> tuple[float | None, float | None]:
    if not runs:
        return None, None
    mean, std, _ = mean_std(r.get(key) * scale if r.get(key) is not None else None for r in runs)
    return mean, std


def _mem(r: dict[str, Any]) -> float | None:
    """Peak memory in MB: over the RSS after imports on the CPU, allocated on a GPU."""
    v = r.get("peak_mem_over_imports_bytes")
    if v is None and str(r.get("device", "")).startswith("cuda"):
        v = r.get("peak_mem_bytes")
    return None if v is None else v / 2 ** 20


def _row(claim: str, goal: str, value: float | None, ok: bool | None, detail: str) -> list[str]:
    shown = "-" if value is None else f"{value:.2f}"
    verdict = "not measured" if ok is None else ("met" if ok else "**not met**")
    return [claim, goal, shown, verdict, detail]


def claims_table(runs: list[dict[str, Any]], pipeline: dict[str, Any] | None) -> str:
    """The Markdown table of the goals (module docstring) on ``runs``; ``pipeline``: pipeline.json."""
    g = group(runs)
    budgets = sorted({b for _, b, _ in g}, key=lambda b: (b == "all", int(b) if b != "all" else 0))
    augmented = {k: v for k, v in g.items() if k[2] != "none"}

    def arm(method: str, budget: str) -> list[dict[str, Any]] | None:
        found = [rs for (m, b, _), rs in augmented.items() if m == method and b == budget]
        return found[0] if found else None

    rows: list[list[str]] = []
    pre = (pipeline or {}).get("cache_seconds"), (pipeline or {}).get("basis_seconds")
    for b in budgets:
        tcs = arm("tcs", b)
        tcs_epoch, _ = _stat(tcs, "seconds_per_epoch")
        tcs_total, _ = _stat(tcs, "total_seconds")
        tcs_mem = mean_std(_mem(r) for r in tcs or [])[0]
        for peer in PEER_CE:
            p_epoch, _ = _stat(arm(peer, b), "seconds_per_epoch")
            ratio = tcs_epoch / p_epoch if tcs_epoch and p_epoch else None
            rows.append(_row(f"tcs / {peer} s per epoch, {b} labels/class", "<= 1.1", ratio,
                             None if ratio is None else ratio <= 1.1,
                             f"{_s(tcs_epoch)} vs {_s(p_epoch)} s"))
        for peer in PEER_ONLINE:
            runs_p = arm(peer, b)
            p_epoch, _ = _stat(runs_p, "seconds_per_epoch")
            ratio = p_epoch / tcs_epoch if tcs_epoch and p_epoch else None
            rows.append(_row(f"{peer} / tcs s per epoch, {b} labels/class", ">= 2", ratio,
                             None if ratio is None else ratio >= 2.0, f"{_s(p_epoch)} vs {_s(tcs_epoch)} s"))
            p_total, _ = _stat([dict(r, total_seconds=r["total_seconds"] + _finetune_seconds(r))
                                for r in runs_p or [] if r.get("total_seconds") is not None], "total_seconds")
            e2e = tcs_total + pre[0] + pre[1] if tcs_total is not None and None not in pre else None
            ratio = p_total / e2e if p_total and e2e else None
            ft = " (fine-tuning included)" if any(_finetune_seconds(r) for r in runs_p or []) else ""
            rows.append(_row(f"{peer} / tcs end to end, one run{ft}, {b} labels/class", ">= 1.5", ratio,
                             None if ratio is None else ratio >= 1.5,
                             f"{_s(p_total)} s vs cache {_s(pre[0])} + basis {_s(pre[1])} + run {_s(tcs_total)} s"))
            p_mem = mean_std(_mem(r) for r in runs_p or [])[0]
            ratio = tcs_mem / p_mem if tcs_mem is not None and p_mem else None
            rows.append(_row(f"tcs / {peer} peak memory, {b} labels/class", "<= 0.7", ratio,
                             None if ratio is None else ratio <= 0.7, f"{_s(tcs_mem)} vs {_s(p_mem)} MB"))
        peers = sorted({m for (m, bb, _) in augmented if bb == b and m not in ("tcs", "ce", "fitnet", "online")})
        for peer in peers:
            t_mean, t_std = _stat(tcs, "test_top1", 100.0)
            p_mean, p_std = _stat(arm(peer, b), "test_top1", 100.0)
            slack = max(s for s in (t_std, p_std, 0.0) if s is not None)
            diff = t_mean - p_mean if t_mean is not None and p_mean is not None else None
            rows.append(_row(f"tcs - {peer} test top-1 (points), {b} labels/class", ">= -(larger std)", diff,
                             None if diff is None else diff >= -slack,
                             f"{_p(t_mean, t_std)} vs {_p(p_mean, p_std)}"))
    controls = {k: v for k, v in g.items() if k[2] == "none"}
    for b in budgets:
        ours = controls.get(("online", b, "none"))
        for peer in CONTROL:
            theirs = controls.get((peer, b, "none"))
            if ours is None and theirs is None:
                continue
            for split in ("val_top1", "test_top1"):
                o_mean, o_std = _stat(ours, split, 100.0)
                p_mean, p_std = _stat(theirs, split, 100.0)
                slack = 2 * max(s for s in (o_std, p_std, 0.0) if s is not None)
                diff = abs(o_mean - p_mean) if o_mean is not None and p_mean is not None else None
                rows.append(_row(f"control: tcskd online vs {peer}, no augmentation, {split[:-5]} top-1 (points), "
                                 f"{b} labels/class", "difference <= 2 x larger std", diff,
                                 None if diff is None or (o_std is None and p_std is None) else diff <= slack,
                                 f"{_p(o_mean, o_std)} vs {_p(p_mean, p_std)}"))
    head = ["| claim | goal | measured | verdict | figures |", "|---|---|---:|---|---|"]
    return "\n".join(head + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _finetune_seconds(r: dict[str, Any]) -> float:
    """The seconds of a traditional arm's teacher fine-tuning (0 for the other arms)."""
    return float((r.get("teacher_finetune") or {}).get("train_seconds") or 0.0)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _p(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def main(argv: list[str] | None = None) -> int:
    """``python -m tcskd.bench.peers.claims RUNS``: the table on stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tcskd.bench.peers.claims RUNS", file=sys.stderr)
        return 2
    root = Path(args[0])
    try:
        found, _ = expand_run_dirs([root])
        if not found:
            raise TcskdError(f"{root} holds no finished run (no final.json)")
        pipe = root / "pipeline.json"
        pipeline = json.loads(pipe.read_text()) if pipe.is_file() else None
        sys.stdout.write(claims_table(load_runs(found), pipeline))
    except TcskdError as e:
        print(f"tcskd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
