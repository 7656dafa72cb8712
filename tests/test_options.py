"""One declaration per option: tcskd.options, the configs' validate(), and the README's option list.

The README's synopsis block (the first code block of "## The three stages") must name every option of
every command and nothing else, with the same choices; anywhere else the README may only name options
that exist.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tcskd.cache.config import CacheConfig
from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.options import click_options, config_from_params, opt, option_names, option_of
from tcskd.subspace.config import BasisConfig
from tcskd.train.config import EvalConfig, TrainConfig, resolve_config

README = Path(__file__).resolve().parents[1] / "README.md"
#: command path in the README -> its config (None: a command without one).
CONFIGS = {("cache",): CacheConfig, ("basis",): BasisConfig, ("train",): TrainConfig, ("eval",): EvalConfig}
#: Documented elsewhere (bench/README.md).
NOT_IN_SYNOPSIS = {("bench",)}


# -- the README ------------------------------------------------------------------

def _section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _synopsis() -> dict[tuple[str, ...], dict[str, tuple[str, ...] | None]]:
    """command path -> {option: its documented choices (``--x a|b``) or None} from the README's block."""
    block = _section(README.read_text(), "## The three stages").split("```")[1]
    entries: list[str] = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line)
        if line.startswith("tcskd "):
            entries.append(line)
        elif line.strip():
            assert entries and line[0].isspace(), f"README synopsis: stray line {line!r}"
            entries[-1] += " " + line.strip()
    out: dict[tuple[str, ...], dict[str, tuple[str, ...] | None]] = {}
    for entry in entries:
        words = entry.split()[1:]
        path = tuple(w for w in _leading_words(words))
        opts: dict[str, tuple[str, ...] | None] = {}
        for name, choices in re.findall(r"(--[a-z][a-z0-9-]*)(?:[ =]([a-z0-9][\w.-]*(?:\|[\w.-]+)+))?", entry):
            opts[name] = tuple(choices.split("|")) if choices else None
        assert path not in out, f"README synopsis names tcskd {' '.join(path)} twice"
        out[path] = opts
    return out


def _leading_words(words: list[str]):
    for w in words:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
            return
        yield w


def _commands(group: click.Group = main, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    """Every command path of ``tcskd`` (a group with its own callback, like ``cache``, counts as a command)."""
    out = {}
    for name, cmd in group.commands.items():
        p = path + (name,)
        out[p] = cmd
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, p))
    return out


def _options(cmd: click.Command) -> dict[str, tuple[str, ...] | None]:
    """Every visible long option of ``cmd`` (both sides of ``--x/--no-x``) -> its choices or None."""
    out = {}
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden or p.name == "help":
            continue
        choices = tuple(p.type.choices) if isinstance(p.type, click.Choice) else None
        for name in [*p.opts, *p.secondary_opts]:
            if name.startswith("--"):
                out[name] = choices
    return out


def test_readme_synopsis_lists_every_command():
    documented = set(_synopsis())
    commands = set(_commands()) - NOT_IN_SYNOPSIS
    assert documented == commands, (f"missing from README: {sorted(commands - documented)}; "
                                    f"not commands: {sorted(documented - commands)}")


@pytest.mark.parametrize("path", sorted(set(_commands()) - NOT_IN_SYNOPSIS), ids=" ".join)
def test_readme_synopsis_names_every_option_with_its_choices(path):
    documented = _synopsis()[path]
    actual = _options(_commands()[path])
    missing, unknown = set(actual) - set(documented), set(documented) - set(actual)
    assert not missing and not unknown, (f"tcskd {' '.join(path)}: missing from README: {sorted(missing)}; "
                                         f"no such option: {sorted(unknown)}")
    for name, choices in documented.items():
        if choices is not None:
            assert choices == actual[name], f"tcskd {' '.join(path)} {name}: README {choices}, code {actual[name]}"


def test_every_config_field_is_in_the_readme_synopsis():
    synopsis = _synopsis()
    for path, cls in CONFIGS.items():
        names = option_names(cls)
        assert names, cls
        for field, name in names.items():
            if not option_of(next(f for f in dataclasses.fields(cls) if f.name == field)).hidden:
                assert name in synopsis[path], f"{cls.__name__}.{field} ({name}) is not in the README's synopsis"


#: Options of other programs that the README names (torchrun's, scripts/seg_figure.py's, scripts/grid.sh's).
FOREIGN = {"--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--names", "--out",
           "--print"}


def test_every_option_the_readme_names_exists():
    from tcskd.bench.peers.__main__ import peers_cmd
    from tcskd.bench.peers.finetune import finetune_cmd

    known = {n for cmd in [*_commands().values(), peers_cmd, finetune_cmd] for n in _options(cmd)}  # python -m ...
    known |= {n for p in main.params for n in p.opts if n.startswith("--")} | {"--help", "--version"} | FOREIGN
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README.read_text()))
    assert not named - known, f"README names options no command has: {sorted(named - known)}"


# -- the generated commands --------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIGS), ids=" ".join)
def test_commands_are_generated_from_their_config(path):
    cls, cmd = CONFIGS[path], _commands()[path]
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for f in dataclasses.fields(cls):
        o = option_of(f)
        if not o.enabled:
            assert f.name not in params
            continue
        p = params[f.name]
        if f.default is dataclasses.MISSING:
            assert p.required
        else:
            assert p.default == f.default, f.name
        if o.choices is not None:
            assert tuple(p.type.choices) == o.choices


def test_train_default_config_round_trips_through_the_command():
    """The click defaults rebuild exactly the dataclass defaults (no second copy to drift)."""
    seen = {}

    @click.command()
    @click_options(TrainConfig)
    def cmd(**params):
        seen["cfg"] = config_from_params(TrainConfig, params)

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == TrainConfig()
    r = CliRunner().invoke(cmd, ["--lambda", "3", "--select-by", "worst", "--sync-bn", "--stop-after", "2"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == TrainConfig(lam=3.0, select_by="worst", sync_bn=True, stop_after=2)


# -- tcskd.options -----------------------------------------------------------------

@dataclass
class _Toy:
    name: str = opt(help="Required: no default.")
    count: int = opt(3, help="An int.")
    limit: int | None = opt(None, metavar="N", help="Optional int.")
    scale: float | None = opt(None)
    kind: str = opt("a", choices=("a", "b"))
    maybe: str | None = opt(None, choices=("x", "y"))
    fast: bool = opt(False, help="A flag.")
    probe: bool = opt(True, help="On by default.")
    lam: float = opt(1.5, cli="--lambda")
    box: tuple[float, float] = opt((0.25, 1.0))
    secret: int | None = opt(None, hidden=True)
    internal: int = opt(7, cli=False)
    plain: int = 0


def _toy_command(**kw):
    seen = {}

    @click.command()
    @click_options(_Toy, **kw)
    def cmd(**params):
        seen["params"] = params
        seen["cfg"] = config_from_params(_Toy, params)

    return cmd, seen


def _param(cmd: click.Command, name: str) -> click.Option:
    return next(p for p in cmd.params if p.name == name)


def test_option_types_follow_the_annotation():
    cmd, _ = _toy_command()
    assert [p.name for p in cmd.params] == ["name", "count", "limit", "scale", "kind", "maybe", "fast", "probe",
                                            "lam", "box", "secret", "plain", "config"]  # declaration order, no 'internal', then --config
    assert _param(cmd, "name").required and _param(cmd, "name").type == click.STRING
    assert _param(cmd, "count").type == click.INT and _param(cmd, "count").default == 3
    assert _param(cmd, "limit").type == click.INT and _param(cmd, "limit").default is None
    assert _param(cmd, "limit").metavar == "N"
    assert _param(cmd, "scale").type == click.FLOAT
    assert _param(cmd, "plain").type == click.INT  # a plain field (no opt()) gets an option too


def test_choices_flags_tuples_hidden_and_names():
    cmd, _ = _toy_command()
    kind, maybe = _param(cmd, "kind"), _param(cmd, "maybe")
    assert isinstance(kind.type, click.Choice) and tuple(kind.type.choices) == ("a", "b")
    assert isinstance(maybe.type, click.Choice) and maybe.default is None
    fast, probe = _param(cmd, "fast"), _param(cmd, "probe")
    assert fast.is_flag and fast.opts == ["--fast"] and not fast.secondary_opts and fast.default is False
    assert probe.is_flag and probe.opts == ["--probe"] and probe.secondary_opts == ["--no-probe"]
    assert probe.default is True
    assert _param(cmd, "lam").opts == ["--lambda"]
    box = _param(cmd, "box")
    assert box.nargs == 2 and box.default == (0.25, 1.0)
    assert _param(cmd, "secret").hidden
    assert option_names(_Toy)["lam"] == "--lambda" and "internal" not in option_names(_Toy)


def test_show_default_only_for_real_defaults():
    cmd, _ = _toy_command()
    assert _param(cmd, "count").show_default and _param(cmd, "kind").show_default
    assert not _param(cmd, "limit").show_default and not _param(cmd, "fast").show_default
    assert _param(cmd, "probe").show_default  # --probe/--no-probe: the default says which
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    assert "--lambda FLOAT" in help_text and "[default: 1.5]" in help_text
    assert "--secret" not in help_text and "--internal" not in help_text
    assert "--limit N" in help_text and "--probe / --no-probe" in help_text


def test_config_from_params_rebuilds_the_config():
    cmd, seen = _toy_command()
    r = CliRunner().invoke(cmd, ["--name", "n", "--limit", "4", "--kind", "b", "--fast", "--no-probe",
                                 "--lambda", "2", "--box", "0.5", "0.75", "--secret", "9"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == _Toy(name="n", limit=4, kind="b", fast=True, probe=False, lam=2.0, box=(0.5, 0.75),
                               secret=9)
    assert seen["cfg"].internal == 7
    r = CliRunner().invoke(cmd, ["--name", "n", "--kind", "c"])
    assert r.exit_code == 2 and "'c' is not one of 'a', 'b'" in r.output
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 2 and "Missing option '--name'" in r.output


def test_exclude_and_only():
    cmd, _ = _toy_command(exclude=["secret", "plain"])
    assert "secret" not in {p.name for p in cmd.params} and "plain" not in {p.name for p in cmd.params}
    cmd, _ = _toy_command(only=["count", "kind"])
    assert [p.name for p in cmd.params] == ["count", "kind"]
    with pytest.raises(ValueError, match="no field"):
        _toy_command(exclude=["nope"])


def test_config_from_params_ignores_other_keys_and_takes_overrides():
    cfg = config_from_params(_Toy, {"name": "a", "as_json": True, "box": [0.1, 0.2]}, count=5)
    assert cfg == _Toy(name="a", count=5, box=(0.1, 0.2))


# -- one validate() per config, today's messages ---------------------------------------

BAD = [
    (CacheConfig(format="tar"), "unknown format 'tar' (choose zarr or hdf5)"),
    (CacheConfig(dtype="int8"), "unknown dtype 'int8' (choose float16 or float32)"),
    (CacheConfig(views=0), "--views must be >= 1 (got 0)"),
    (CacheConfig(chunk_rows=0), "--batch-size and chunk rows must be >= 1"),
    (CacheConfig(image_size=4), "--image-size must be >= 8 (got 4)"),
    (CacheConfig(workers=-1), "--workers must be >= 0 (got -1)"),
    (BasisConfig(cache="c", kind="ica"), "unknown basis kind 'ica' (choose pca, random, identity)"),
    (BasisConfig(cache="c", method="qr"), "unknown method 'qr' (choose eigh, svd)"),
    (BasisConfig(cache="c", view="1"), "unknown view '1' (choose 0 or all)"),
    (BasisConfig(cache="c", dim=4, energy=0.5), "give --dim or --energy, not both"),
    (BasisConfig(cache="c", energy=1.5), "--energy must be in (0, 1], got 1.5"),
    (BasisConfig(cache="c", name=".x"), "invalid basis name '.x'"),
    (BasisConfig(cache="c", exclude_val=True, val_frac=1.0), "--val-frac must be in [0, 1) (got 1.0)"),
    (TrainConfig(cache="c", method="kd"), "unknown method 'kd' (choose tcs, fitnet, ce, online)"),
    (TrainConfig(cache="c", mimic="l1"), "unknown mimic loss 'l1' (choose mse, smooth-l1, cosine)"),
    (TrainConfig(cache="c", optimizer="adam"), "unknown optimizer 'adam' (choose sgd or adamw)"),
    (TrainConfig(cache="c", schedule="linear"), "unknown schedule 'linear' (choose cosine, step or multistep)"),
    (TrainConfig(cache="c", target_norm="std"), "unknown --target-norm 'std' (choose global, none)"),
    (TrainConfig(cache="c", tailor="yes"), "unknown --tailor 'yes' (choose auto, on, off)"),
    (TrainConfig(cache="c", select_by="random"), "unknown --select-by 'random' (choose ablation, ablation-ce, taylor, error, worst)"),
    (TrainConfig(cache="c", classify_from="x"), "unknown --classify-from 'x' (choose feature, coords)"),
    (TrainConfig(cache="c", epochs=0), "--epochs must be >= 1 (got 0)"),
    (TrainConfig(cache="c", min_dim=0), "--min-dim must be >= 1 (got 0)"),
    (TrainConfig(cache="c", dim=0), "--dim must be >= 1 (got 0)"),
    (TrainConfig(cache="c", lr=0.0), "--lr must be a finite number > 0 (got 0.0)"),
    (TrainConfig(cache="c", lam=float("nan")), "--lambda must be a finite number >= 0 (got nan)"),
    (TrainConfig(cache="c", momentum=1.0), "--momentum must be in [0, 1) (got 1.0)"),
    (TrainConfig(cache="c", drop_frac=1.0), "--drop-frac must be in [0, 1) (got 1.0)"),
    (TrainConfig(cache="c", val_per_class=-1), "--val-per-class must be >= 0 (got -1)"),
    (TrainConfig(), "--cache is required (only --method ce can train from --data alone)"),
    (TrainConfig(cache="c", resume=True), "--resume needs --out RUN_DIR (the run to continue)"),
    (TrainConfig(cache="c", image_size=4), "--image-size must be >= 8 (got 4)"),
    (EvalConfig(cache="a", test_cache="b", k=0), "k must be >= 1 (got 0)"),
    (EvalConfig(cache="a", test_cache="b", temperature=0.0), "the kNN temperature must be > 0 (got 0.0)"),
    (EvalConfig(cache="a", test_cache="b", val_frac=-0.1), "--val-frac must be in [0, 1) (got -0.1)"),
]


@pytest.mark.parametrize("cfg, message", BAD, ids=[m for _, m in BAD])
def test_validate_names_the_problem_in_one_line(cfg, message):
    with pytest.raises(TcskdError) as e:
        cfg.validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_defaults_are_valid_and_resolve():
    CacheConfig().validate()
    BasisConfig(cache="c").validate()
    EvalConfig(cache="a", test_cache="b").validate()
    cfg = resolve_config(TrainConfig(cache="c"))
    assert cfg.select_by == "taylor" and cfg.lr == 0.05 and cfg.weight_decay == 5e-4


def test_eval_out_must_not_be_a_directory(tmp_path):
    with pytest.raises(TcskdError, match="is a directory"):
        EvalConfig(cache="a", test_cache="b", out=str(tmp_path)).validate()
