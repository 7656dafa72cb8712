"""``python -m tcskd.bench.peers --arm ARM --cache KEY ...``: train one peer arm; prints its scores and run
directory (final.json there, shaped like ``tcskd train``'s so that ``tcskd report`` tables it)."""

from __future__ import annotations

import click

from tcskd.bench.peers.config import PeerConfig
from tcskd.bench.peers.entry import pct, run_command, setup_logging
from tcskd.options import HELP, click_options, config_from_params


@click.command("peers", context_settings=HELP)
@click_options(PeerConfig)
@click.option("-v", "--verbose", is_flag=True, help="Log every epoch.")
@click.pass_context
def peers_cmd(ctx: click.Context, verbose: bool, **params) -> None:
    """Train one peer arm (torchdistill or timm) on tcskd's job."""
    from tcskd.bench.peers.run import run_arm

    setup_logging(verbose)
    res = run_arm(config_from_params(PeerConfig, params, ctx))
    click.echo(f"{res['method']} {res['student']} seed {res['seed']}: val top-1 {pct(res['val_top1'])}, test top-1 "
               f"{pct(res['test_top1'])}, {res['seconds_per_epoch']:.2f} s/epoch, peak "
               f"{res['peak_mem_bytes'] / 2 ** 20:.0f} MB")
    click.echo(res["run_dir"])


def main() -> None:
    run_command(peers_cmd)


if __name__ == "__main__":
    main()
