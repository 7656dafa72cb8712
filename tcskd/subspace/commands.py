"""``tcskd basis``: a thin click layer over :func:`tcskd.subspace.fit.fit_basis`."""

from __future__ import annotations

import click

from tcskd.subspace.fit import KINDS, METHODS, BasisConfig, fit_basis


@click.command("basis")
@click.option("--cache", "cache_ref", required=True, metavar="KEY|PATH",
              help="Cache that receives the basis (key, unique key prefix, or directory).")
@click.option("--name", default=None, help="Basis name (default: the kind, e.g. 'pca').")
@click.option("--kind", type=click.Choice(list(KINDS)), default="pca", show_default=True,
              help="pca | random orthonormal | identity (raw features).")
@click.option("--dim", type=int, default=None, metavar="K", help="Number of coordinates (default: all D).")
@click.option("--energy", type=float, default=None, metavar="E",
              help="Fewest coordinates explaining this share of the variance, in (0, 1].")
@click.option("--whiten", is_flag=True, help="Divide targets by sqrt(eigenvalue).")
@click.option("--fit-on", default=None, metavar="KEY|PATH",
              help="Fit on another cache's features (same dimension); store the basis here.")
@click.option("--view", type=click.Choice(["0", "all"]), default="0", show_default=True,
              help="Fit on view 0 only, or on every view as a separate sample.")
@click.option("--coords", is_flag=True, help="Also store the projected targets [N, V, K] (float16).")
@click.option("--method", type=click.Choice(list(METHODS)), default="eigh", show_default=True,
              help="pca: eigh of the streamed covariance, or exact SVD of the data in memory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random basis.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--cache-root", type=str, default=None,
              help="Default: $TCSKD_CACHE, else ./caches.")
@click.option("--chunk-rows", type=int, default=None, help="Rows per read (default: the cache's chunk size).")
@click.option("--exclude-val", is_flag=True,
              help="Leave the training runs' validation rows (--val-frac / --val-per-class / --val-seed) out.")
@click.option("--val-frac", type=float, default=0.1, show_default=True,
              help="With --exclude-val: share of each class held out, as in tcskd train.")
@click.option("--val-per-class", type=int, default=None, help="With --exclude-val: rows per class held out.")
@click.option("--val-seed", type=int, default=0, show_default=True, help="With --exclude-val: holdout seed.")
def basis(cache_ref: str, name: str | None, kind: str, dim: int | None, energy: float | None, whiten: bool,
          fit_on: str | None, view: str, coords: bool, method: str, seed: int, device: str,
          cache_root: str | None, chunk_rows: int | None, exclude_val: bool, val_frac: float,
          val_per_class: int | None, val_seed: int) -> None:
    """Fit a coordinate system (PCA basis) on a cache's features and store it in the cache."""
    cfg = BasisConfig(cache=cache_ref, name=name, kind=kind, dim=dim, energy=energy, whiten=whiten,
                      fit_on=fit_on, view=view, coords=coords, device=device, cache_root=cache_root,
                      method=method, seed=seed, chunk_rows=chunk_rows, exclude_val=exclude_val,
                      val_frac=val_frac, val_per_class=val_per_class, val_seed=val_seed)
    s = fit_basis(cfg)
    top = ", ".join(f"{v:.4g}" for v in s["top_eigenvalues"][:5])
    click.echo(f"basis '{s['name']}' ({s['kind']}) in {s['cache']}")
    click.echo(f"  K = {s['k']} of D = {s['dim']}, variance explained at K: {s['explained']:.4f}")
    click.echo(f"  top eigenvalues: {top}")
    click.echo(f"  fitted on {s['samples']} samples ({s['rows_used']} rows) of cache {s['fit_on']}")
    click.echo(f"  plot: {s['plot']}")
