"""``tcskd basis``: a thin click layer over :func:`tcskd.subspace.fit.fit_basis`.

The options are generated from :class:`tcskd.subspace.config.BasisConfig`; ``fit_basis`` validates them.
"""

from __future__ import annotations

import click

from tcskd.options import HELP, click_options, config_from_params
from tcskd.subspace.config import BasisConfig
from tcskd.subspace.fit import fit_basis


@click.command("basis", context_settings=HELP)
@click_options(BasisConfig)
def basis(**params) -> None:
    """Fit a coordinate system (PCA basis) on a cache's features and store it in the cache."""
    s = fit_basis(config_from_params(BasisConfig, params))
    top = ", ".join(f"{v:.4g}" for v in s["top_eigenvalues"][:5])
    click.echo(f"basis '{s['name']}' ({s['kind']}) in {s['cache']}")
    click.echo(f"  K = {s['k']} of D = {s['dim']}, variance explained at K: {s['explained']:.4f}")
    click.echo(f"  top eigenvalues: {top}")
    click.echo(f"  fitted on {s['samples']} samples ({s['rows_used']} rows) of cache {s['fit_on']}")
    click.echo(f"  plot: {s['plot']}")
