"""`scripts/peers.sh` (make peers) and its claims table (tcskd.bench.peers.claims): the peer arms run with
exactly tcskd's shared options, every command parses, and each goal's verdict follows from the figures."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tcskd.bench.peers.__main__ import peers_cmd
from tcskd.bench.peers.claims import claims_table, main as claims_main
from tcskd.bench.peers.config import SHARED, PeerConfig
from tcskd.options import config_from_params

ROOT = Path(__file__).resolve().parents[1]
TCSKD = f"{sys.executable} -m tcskd"


def _printed() -> list[list[str]]:
    env = dict(os.environ, TCSKD=TCSKD, PYTHON=sys.executable, PYTHONPATH=str(ROOT), LPCS="10 all",
               CONTROL_LPCS="10")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "peers.sh"), "--print"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def _peer_config(args: list[str]) -> PeerConfig:
    ctx = peers_cmd.make_context("peers", list(args))
    return config_from_params(PeerConfig, ctx.params, ctx)


def test_peers_print_parses_and_shares_tcskds_options(tmp_path):
    lines = _printed()
    tcskd_lines = [a for a in lines if a[:4] == [sys.executable, "-m", "tcskd", "-q"]]
    peer_lines = [a for a in lines if a[1:3] == ["-m", "tcskd.bench.peers"]]
    finetune_lines = [a for a in lines if a[1:3] == ["-m", "tcskd.bench.peers.finetune"]]
    # arms x budgets + the control; the traditional arms x budgets, one fine-tuning per budget
    assert len(tcskd_lines) == 3 * 2 + 1 and len(peer_lines) == 4 * 2 + 2 + 3 * 2 and len(finetune_lines) == 2
    assert len(lines) == len(tcskd_lines) + len(peer_lines) + len(finetune_lines)
    # every tcskd command resolves (tcskd train --print-configs: the cache is not opened)
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"{i}\t{shlex.join(a[5:])}\n".replace("--seed SEED", "--seed 0")
                               for i, a in enumerate(tcskd_lines)))
    out = subprocess.run([sys.executable, "-m", "tcskd", "train", "--print-configs", str(listing)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    resolved = {name: json.loads(text) for name, _, text in (ln.partition("\t") for ln in out.stdout.splitlines())}
    assert len(resolved) == len(tcskd_lines)
    methods = sorted(r["method"] for r in resolved.values())
    assert methods == ["ce", "ce", "fitnet", "fitnet", "online", "tcs", "tcs"]
    # each peer arm takes the same shared options as tcskd's ce arm at the same budget (lambda, augmentation
    # and the arm aside)
    ce = {("--labels-per-class" in a): a for a in tcskd_lines if "ce" in a[a.index("--method") + 1]}
    from tcskd.train.commands import train as train_cmd
    for args in peer_lines:
        cfg = _peer_config([x if x != "SEED" else "0" for x in args[3:]])
        cfg.validate()
        ours = ce[cfg.labels_per_class is not None]
        tctx = train_cmd.make_context("train", [x if x != "SEED" else "0" for x in ours[5:]])
        for name in SHARED:
            if name in ("lam", "augment", "seed", "cache"):
                continue
            theirs = tctx.params[name] if name != "lam" else None
            assert getattr(cfg, name) == theirs, (cfg.arm, name)
        assert cfg.augment == ("none" if "control-" in args[args.index("--out") + 1] else "auto")
        if cfg.teacher_ckpt:  # a traditional arm reads the fine-tuning of its own budget and seed
            budget = "all" if cfg.labels_per_class is None else cfg.labels_per_class
            assert cfg.teacher_ckpt == f"runs/peers/finetune-lpc{budget}-sSEED/teacher.pt"
    # the fine-tuning holds out the same validation rows and takes the labelled rows of the same budget
    from tcskd.bench.peers.finetune import finetune_cmd
    for args in finetune_lines:
        fctx = finetune_cmd.make_context("finetune", [x if x != "SEED" else "0" for x in args[3:]])
        assert (fctx.params["val_frac"], fctx.params["val_seed"], fctx.params["augment"]) == (0.1, 0, "auto")
        assert args[args.index("--out") + 1] == ("runs/peers/finetune-lpc10-sSEED" if fctx.params["labels_per_class"]
                                                 else "runs/peers/finetune-lpcall-sSEED")


def _run(method: str, lpc, seed: int, *, epoch: float, total: float, mem_mb: float, test: float, val: float,
         augment: str = "digits") -> dict:
    return {"method": method, "labels_per_class": lpc, "seed": seed, "augment": augment, "device": "cpu",
            "seconds_per_epoch": epoch, "total_seconds": total, "peak_mem_over_imports_bytes": mem_mb * 2 ** 20,
            "test_top1": test, "val_top1": val}


def _cells(table: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_claims_verdicts_follow_the_figures():
    runs = []
    for s, jitter in enumerate((-0.01, 0.0, 0.01)):
        runs += [_run("tcs", 10, s, epoch=10.0, total=200.0, mem_mb=100.0, test=0.90 + jitter, val=0.9),
                 _run("torchdistill-ce", 10, s, epoch=9.5, total=190.0, mem_mb=90.0, test=0.80 + jitter, val=0.8),
                 _run("timm-ce", 10, s, epoch=8.0, total=170.0, mem_mb=90.0, test=0.92 + jitter, val=0.9),
                 _run("torchdistill-fitnet", 10, s, epoch=30.0, total=500.0, mem_mb=200.0, test=0.90 + jitter,
                      val=0.9),
                 _run("online", 10, s, epoch=30.0, total=500.0, mem_mb=1.0, test=0.85 + jitter, val=0.85,
                      augment="none"),
                 _run("torchdistill-fitnet", 10, s, epoch=30.0, total=500.0, mem_mb=1.0, test=0.86 + jitter,
                      val=0.85, augment="none"),
                 dict(_run("torchdistill-kd", 10, s, epoch=25.0, total=300.0, mem_mb=150.0, test=0.88 + jitter,
                           val=0.88), teacher_finetune={"train_seconds": 150.0})]
    table = claims_table(runs, {"cache_seconds": 60.0, "basis_seconds": 40.0})
    c = _cells(table)
    assert c["tcs / torchdistill-ce s per epoch, 10 labels/class"][1:3] == ["1.05", "met"]
    assert c["tcs / timm-ce s per epoch, 10 labels/class"][1:3] == ["1.25", "**not met**"]
    assert c["torchdistill-fitnet / tcs s per epoch, 10 labels/class"][1:3] == ["3.00", "met"]
    # end to end: 500 s against 60 + 40 + 200 s of cache, basis and run
    assert c["torchdistill-fitnet / tcs end to end, one run, 10 labels/class"][1:3] == ["1.67", "met"]
    assert c["tcs / torchdistill-fitnet peak memory, 10 labels/class"][1:3] == ["0.50", "met"]
    # no timm-fitnet run: not measured, not met
    assert c["timm-fitnet / tcs s per epoch, 10 labels/class"][1:3] == ["-", "not measured"]
    # accuracy: 90 vs 80 met; 90 vs 92 +- 1 missed by more than the larger std (1 point)
    assert c["tcs - torchdistill-ce test top-1 (points), 10 labels/class"][1:3] == ["10.00", "met"]
    assert c["tcs - timm-ce test top-1 (points), 10 labels/class"][1:3] == ["-2.00", "**not met**"]
    assert c["tcs - torchdistill-fitnet test top-1 (points), 10 labels/class"][1:3] == ["0.00", "met"]
    # the control: 85 vs 86 +- 1 on test is within 2 x 1; val equal
    assert c["control: tcskd online vs torchdistill-fitnet, no augmentation, test top-1 (points), "
             "10 labels/class"][1:3] == ["1.00", "met"]
    # the control runs (augment none) are not the augmented peer arm of the accuracy rows
    assert "0.00" == c["tcs - torchdistill-fitnet test top-1 (points), 10 labels/class"][1]
    # the traditional pipeline: its teacher's fine-tuning counts end to end (150 + 300 s against 300 s)
    assert c["torchdistill-kd / tcs end to end, one run (fine-tuning included), 10 labels/class"][1:3] == \
        ["1.50", "met"]
    assert c["torchdistill-kd / tcs s per epoch, 10 labels/class"][1:3] == ["2.50", "met"]
    assert c["tcs - torchdistill-kd test top-1 (points), 10 labels/class"][1:3] == ["2.00", "met"]
    assert not any(k.startswith("control: tcskd online vs torchdistill-kd") for k in c)
    # without pipeline.json the end-to-end row is not measured
    c2 = _cells(claims_table(runs, None))
    assert c2["torchdistill-fitnet / tcs end to end, one run, 10 labels/class"][2] == "not measured"


def test_claims_cli_refuses_an_empty_folder(tmp_path, capsys):
    assert claims_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
