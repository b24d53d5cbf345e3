"""The command-line scripts agree with each other: option names, defaults in --help, launches.

Users move between the scripts with the README open; the same idea has the same
flag (``--timestep``), different ideas have different flags (``--num-views``,
``--view-ids``, ``--view-mode``), old spellings keep working without being shown,
and every option's help states its default.
"""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["extract_features", "train_ksae", "train_diffc", "build_atlas", "make_release", "build_toy_release",
           "train_toy_backbone"]


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's parser, caught when ``parse_args`` is called (nothing else runs)."""
    def catch(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    names = runpy.run_path(str(ROOT / "training" / f"{script}.py"))
    with pytest.raises(_Parsed) as caught:
        names.get("parse_args", names["main"])([])
    monkeypatch.undo()
    return caught.value.parser


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_shows_its_default(script, monkeypatch):
    for parser in _all_parsers(_parser(script, monkeypatch)):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.required
                    or isinstance(action, argparse._HelpAction)):
                continue
            text = formatter._expand_help(action) if action.help else ""
            said = formatter._get_help_string(action).lower()
            assert ("default" in said or "required" in said) and text, \
                f"{script} {parser.prog} {action.option_strings[0]}: {text!r}"
            assert not ("required" in said and "(default: none)" in said), \
                f"{script} {parser.prog} {action.option_strings[0]} says both required and default: none"


@pytest.mark.parametrize("script", SCRIPTS + ["make_space"])
def test_help_is_plain_text_and_required_options_are_required(script, monkeypatch):
    """--help reads in a terminal: no Sphinx markup; an option its help calls required is required in usage too."""
    for parser in _all_parsers(_parser(script, monkeypatch)):
        page = parser.format_help()
        for markup in (":mod:", ":func:", ":class:", ":meth:", ":attr:", "``"):
            assert markup not in page, f"{script} {parser.prog}: {markup} in --help"
        for action in parser._actions:
            if action.option_strings and (action.help or "").rstrip(".").lower().endswith("(required)"):
                assert action.required, f"{script} {parser.prog} {action.option_strings[0]}"
    from revelio_hub.cli import plain_text

    assert plain_text("over :func:`~revelio_hub.a.b` and ``x --y``, :mod:`m`") == "over `revelio_hub.a.b` and `x --y`, `m`"


def _parse(script: str, argv: list[str]):
    return runpy.run_path(str(ROOT / "training" / f"{script}.py"))["parse_args"](argv)


def test_one_name_per_idea_and_no_hidden_old_names(capsys):
    diffc = ["train", "--train-store", "s", "--layer", "up_ft1", "--out", "o"]
    assert _parse("train_diffc", diffc + ["--timestep", "25"]).timestep == 25
    parsed = _parse("train_diffc", diffc + ["--timestep", "1", "--view-mode", "all", "--lr", "3e-4"])
    # the options are the config's fields: the command line builds the config code would build
    from revelio_hub.cli import from_args
    from revelio_hub.diffc.training import DiffCTrainConfig

    assert from_args(DiffCTrainConfig, parsed, online=None) == DiffCTrainConfig(views="all", lr=3e-4)
    for old in (["--t", "100"], ["--timestep", "1", "--views", "all"]):  # the old spellings are gone
        with pytest.raises(SystemExit):
            _parse("train_diffc", diffc + old)
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err or "ambiguous option" in err
    with pytest.raises(SystemExit):
        _parse("train_diffc", diffc)  # --timestep is required
    assert "--timestep" in capsys.readouterr().err

    extract = ["--backbone", "b", "--dataset", "d", "--out", "o"]
    assert _parse("extract_features", extract + ["--num-views", "3"]).num_views == 3
    with pytest.raises(SystemExit):  # generated options have one name each: the old spelling is gone
        _parse("extract_features", extract + ["--views", "2"])
    assert "unrecognized arguments: --views" in capsys.readouterr().err
    ksae = ["--store", "s", "--layer", "l", "--timestep", "25", "--out", "o"]
    assert _parse("train_ksae", ksae + ["--view-ids", "0", "2"]).view_ids == [0, 2]
    with pytest.raises(SystemExit):
        _parse("train_ksae", ksae + ["--views", "1"])
    assert "unrecognized arguments: --views" in capsys.readouterr().err

    usage = runpy.run_path(str(ROOT / "training" / "train_diffc.py"))
    with pytest.raises(SystemExit):
        usage["parse_args"](["train", "--help"])
    page = capsys.readouterr().out
    assert "--timestep TIMESTEP" in page.split("options:")[0] and "[--timestep" not in page  # required in usage
    assert "(required)" not in page and "--timestep TIMESTEP   diffusion timestep, e.g. 25\n" in page

    for script, old in (("train_diffc", "--t "), ("extract_features", "--views"), ("train_ksae", "--views")):
        argv = ["train", "--help"] if script == "train_diffc" else ["--help"]
        with pytest.raises(SystemExit):
            _parse(script, argv)
        help_text = capsys.readouterr().out
        assert old not in help_text and "--timestep" in help_text


def test_cpu_only_accelerate_launch_with_several_processes_is_refused():
    from revelio_hub.distributed import check_launch, requested_processes

    launcher = ["/usr/bin/python3", "/usr/bin/accelerate", "launch", "--num_processes", "2", "training/x.py"]
    assert requested_processes(launcher) == 2
    assert requested_processes(["accelerate", "launch", "--num-processes=4", "x.py"]) == 4
    assert requested_processes(["/usr/bin/python3", "/usr/bin/accelerate", "launch", "x.py"]) == 1
    assert requested_processes(["/usr/bin/bash", "run.sh", "--num_processes", "2"]) == 1  # not accelerate
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: accelerate starts the processes itself")
    with pytest.raises(SystemExit, match=r"started a single process.*\n  torchrun --nproc_per_node 2 training/x.py --out 'a b'"):
        check_launch(launcher, argv=["training/x.py", "--out", "a b"])
    check_launch(["/usr/bin/python3", "/usr/bin/accelerate", "launch", "x.py"], argv=["x.py"])  # one asked: fine


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_accelerate_launch_num_processes_prints_the_torchrun_command(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.randn(64, 8)}, str(tmp_path / "f.safetensors"))
    done = subprocess.run(
        ["accelerate", "launch", "--num_processes", "2", "training/train_ksae.py", "--features",
         str(tmp_path / "f.safetensors"), "--k", "2", "--expansion", "2", "--steps", "2", "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "torchrun --nproc_per_node 2 training/train_ksae.py --features" in done.stderr
    assert not (tmp_path / "o").exists()


def test_diffusers_layer_names_are_aliases_of_the_canonical_ones():
    """The README presents mid_block and bottleneck as one layer: every parser takes both and says the canonical name."""
    from revelio_hub.layer_names import canonical_layer

    assert [canonical_layer(n) for n in ("mid_block", "up_blocks.1", "up_blocks[1]", "down_blocks.0",
                                         "transformer_blocks[3]", "transformer_blocks.13", "up_ft2", "block4",
                                         "nonsense", "up_blocks.x")] == [
        "bottleneck", "up_ft1", "up_ft1", "down_ft0", "block3", "block13", "up_ft2", "block4", "nonsense", "up_blocks.x"]
    ksae = ["--store", "s", "--timestep", "25", "--out", "o", "--layer"]
    assert _parse("train_ksae", ksae + ["mid_block"]).layer == "bottleneck"
    assert _parse("train_diffc", ["train", "--train-store", "s", "--out", "o", "--timestep", "25", "--layer",
                                  "up_blocks[1]"]).layer == "up_ft1"
    assert _parse("train_diffc", ["sweep", "--train-store", "s", "--out", "o", "--layers", "mid_block",
                                  "up_blocks.0"]).layers == ["bottleneck", "up_ft0"]
    assert _parse("extract_features", ["--backbone", "b", "--dataset", "d", "--out", "o", "--layers", "mid_block",
                                       "up_ft1"]).layers == ["bottleneck", "up_ft1"]
    assert _parse("build_atlas", ["--store", "s", "--sae", "m", "--timestep", "25", "--out", "o", "--layer",
                                  "mid_block"]).layer == "bottleneck"

    # the library and the app too: a release entry, a backbone, the app's (layer, t) check
    from revelio_hub.app.state import DEFAULT_RELEASE_PATH, LoadedRelease
    from revelio_hub.release import Release

    if not (DEFAULT_RELEASE_PATH / "release.json").is_file():
        pytest.skip("the bundled toy release is not built in this checkout")
    release = Release.from_pretrained(DEFAULT_RELEASE_PATH)
    assert release.entry_metrics("mid_block", 25) == release.entry_metrics("bottleneck", 25)
    assert release.load("mid_block", 25, load_atlas=False).sae.recipe["layer"] == "bottleneck"
    assert release.load_backbone().check_layers(["mid_block", "up_blocks[1]"]) == ["bottleneck", "up_ft1"]
    assert LoadedRelease.open(str(DEFAULT_RELEASE_PATH)).check_entry("mid_block", 25) == ("bottleneck", 25)
    with pytest.raises(ValueError, match="up_ft9.* is not in release"):  # said back by its canonical name
        LoadedRelease.open(str(DEFAULT_RELEASE_PATH)).check_entry("up_blocks.9", 25)


def _run_script(script: str, *args: str, launcher: tuple[str, ...] = ("python",), timeout: int = 300):
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable if part == "python" else part for part in launcher]
    return subprocess.run([*command, str(ROOT / "training" / f"{script}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_missing_store_is_one_line_and_exit_status_2(tmp_path):
    """A newcomer's first mistake reads as one sentence, not a traceback around it."""
    done = _run_script("train_ksae", "--store", str(tmp_path / "no-store"), "--layer", "mid_block", "--timestep",
                       "25", "--out", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"train_ksae.py: error: {tmp_path / 'no-store'} is not a feature store (no summary.json); "
        "create one with training/extract_features.py"]
    assert not (tmp_path / "o").exists()
    diffc = _run_script("train_diffc", "train", "--train-store", str(tmp_path / "no-store"), "--layer", "up_ft1",
                        "--timestep", "25", "--out", str(tmp_path / "d"))
    assert diffc.returncode == 2 and len(diffc.stderr.strip().splitlines()) == 1, diffc.stderr
    assert diffc.stderr.startswith("train_diffc.py train: error: ") and "no-store" in diffc.stderr
