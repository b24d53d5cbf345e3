"""Options generated from config dataclasses (revelio_hub.cli.add_options): one definition per option.

A hyperparameter is a dataclass field; its flag, type, default and help come
from that field, so the command line cannot drift from the config a script
builds, and an option cannot go undocumented.
"""

from __future__ import annotations

import argparse
import runpy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import pytest

from revelio_hub.cli import HelpFormatter, add_options, field_docs, from_args, option
from revelio_hub.interpret.atlas_config import AtlasConfig
from revelio_hub.toy.backbone_training import ToyBackboneConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class Example:
    """An options class using every kind of field.

    Attributes:
        count: how many.
        rate / scale: two numbers
            documented together.
        name: who.
        sizes: several sizes.
        shape: a fixed tuple.
        mode: one of two modes.
        fast: go fast.
        tidy: clean up afterwards.
    """

    count: int = 3
    rate: float = 0.5
    scale: Optional[float] = None
    name: str = field(metadata=option("who, required"))
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, ...] = (4, 4)
    mode: Literal["a", "b"] = "a"
    fast: bool = False
    tidy: bool = True
    tag: list[str] = field(default_factory=list, metadata=option("repeatable", repeat=True, metavar="T"))
    extra: Optional[str] = field(default=None, metadata=option("optional value", nargs="?", const=""))
    secret: int = field(default=7, metadata=option(hidden=True))
    # a flag that sets False, else None ("a preset decides"), as train_ksae.py's --no-normalize-input
    preset: Optional[bool] = field(default=None, metadata=option("turn the preset off", flag="--no-preset",
                                                                 const=False))


def _parser(*classes) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    for cls in classes:
        add_options(parser, cls)
    return parser


def test_every_field_kind_parses_into_the_dataclass():
    parser = _parser(Example)
    args = parser.parse_args(["--name", "n", "--count", "5", "--scale", "2.5", "--sizes", "3", "4", "5",
                              "--shape", "8", "8", "--mode", "b", "--fast", "--no-tidy", "--tag", "x", "--tag", "y",
                              "--extra", "--no-preset"])
    made = from_args(Example, args)
    assert made == Example(name="n", count=5, scale=2.5, sizes=[3, 4, 5], shape=(8, 8), mode="b", fast=True,
                           tidy=False, tag=["x", "y"], extra="", preset=False)
    assert from_args(Example, parser.parse_args(["--name", "n"])) == Example(name="n")


def test_wrong_values_and_missing_required_fields_are_usage_errors(capsys):
    parser = _parser(Example)
    for argv in (["--count", "5"], ["--name", "n", "--mode", "c"], ["--name", "n", "--count", "many"],
                 ["--name", "n", "--secret", "1"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--name" in err and "invalid choice: 'c'" in err and "invalid int value: 'many'" in err
    assert "unrecognized arguments: --secret" in err


def test_help_comes_from_the_docstring_and_shows_defaults():
    page = _parser(Example).format_help()
    assert "two numbers documented together" in page
    assert "how many (default: 3)" in page
    assert "--no-tidy" in page and "--tidy" not in page.replace("--no-tidy", "")
    assert "--secret" not in page


def test_field_docs_read_google_style_attributes():
    docs = field_docs(Example)
    assert docs["rate"] == docs["scale"] == "two numbers documented together."
    assert docs["tidy"] == "clean up afterwards."
    assert field_docs(AtlasConfig)["top_n"].startswith("top images kept per neuron")


def test_an_undocumented_field_is_refused():
    @dataclass
    class Undocumented:
        """No attributes section."""

        width: int = 3

    with pytest.raises(ValueError, match="Undocumented.width has no help"):
        add_options(argparse.ArgumentParser(), Undocumented)


def test_only_and_exclude_pick_fields_of_a_library_config():
    parser = argparse.ArgumentParser()
    assert add_options(parser, AtlasConfig, only=("top_n", "purity_top")) == ["top_n", "purity_top"]
    config = from_args(AtlasConfig, parser.parse_args(["--top-n", "12", "--purity-top", "6"]))
    assert config == AtlasConfig(top_n=12, purity_top=6)
    assert "thumbnail_size" not in add_options(argparse.ArgumentParser(), AtlasConfig, exclude=("thumbnail_size",))


def _script_parser(script: str, monkeypatch) -> tuple[argparse.ArgumentParser, dict]:
    class Parsed(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Parsed(self)

    names = runpy.run_path(str(ROOT / "training" / f"{script}.py"))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed) as caught:
        names.get("parse_args", names["main"])([])
    monkeypatch.undo()
    return caught.value.args[0], names


@pytest.mark.parametrize("script, classes", [
    ("extract_features", ["ExtractionRun"]),
    ("build_atlas", ["AtlasRun", "AtlasConfig"]),
    ("make_release", ["ReleaseRun"]),
    ("train_toy_backbone", ["ToyBackboneRun", "ToyBackboneConfig"]),
    ("build_toy_release", ["ToyReleaseRun"]),
    ("make_space", ["SpaceRun"]),
])
def test_a_scripts_options_are_its_dataclass_fields_and_nothing_else(script, classes, monkeypatch):
    """No hand-written option and no alias: each option string is the one spelling of one field."""
    parser, names = _script_parser(script, monkeypatch)
    dests = [a.dest for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    spellings = [s for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
                 for s in a.option_strings]
    assert len(spellings) == len(dests)  # one name per option
    offered = {f.name for name in classes for f in fields(names[name])}
    assert set(dests) <= offered and len(set(dests)) == len(dests)


def test_the_toy_backbone_cli_builds_the_config_the_library_would(monkeypatch):
    parser, _ = _script_parser("train_toy_backbone", monkeypatch)
    args = parser.parse_args(["--out", "o", "--widths", "16", "32", "--lr", "0.01", "--steps", "9"])
    assert from_args(ToyBackboneConfig, args) == ToyBackboneConfig(block_out_channels=(16, 32), learning_rate=0.01,
                                                                   steps=9)
    assert from_args(ToyBackboneConfig, parser.parse_args(["--out", "o"])) == ToyBackboneConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--learning-rate", "0.01"])  # the field has one spelling: --lr


def test_the_training_clis_build_the_configs_the_library_would():
    """train_ksae.py and train_diffc.py take their model options from SAETrainConfig / DiffCTrainConfig."""
    from revelio_hub.diffc.training import DiffCTrainConfig
    from revelio_hub.sae.training import SAETrainConfig

    ksae = runpy.run_path(str(ROOT / "training" / "train_ksae.py"))
    base = ["--features", "f.safetensors", "--out", "o"]
    assert ksae["_config"](ksae["parse_args"](base)) == SAETrainConfig()
    args = ksae["parse_args"](base + ["--recipe", "paper", "--k", "8", "--samples", "1000", "--no-normalize-input",
                                      "--variant", "batchtopk", "--eval-fraction", "0.1", "--log-every", "7"])
    assert ksae["_config"](args) == SAETrainConfig(recipe="paper", k=8, total_samples=1000, normalize_input=False,
                                                   variant="batchtopk", eval_fraction=0.1, log_every=7)
    with pytest.raises(SystemExit):
        ksae["parse_args"](base + ["--samples", "10", "--steps", "2"])  # one training length
    diffc = runpy.run_path(str(ROOT / "training" / "train_diffc.py"))
    args = diffc["parse_args"](["train", "--train-store", "s", "--layer", "up_ft1", "--timestep", "25", "--out", "o",
                                "--head", "linear", "--view-mode", "all", "--epochs", "3"])
    assert from_args(DiffCTrainConfig, args, online=None) == DiffCTrainConfig(head="linear", views="all", epochs=3)
