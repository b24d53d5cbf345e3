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
            assert "default" in formatter._get_help_string(action).lower() and text, \
                f"{script} {parser.prog} {action.option_strings[0]}: {text!r}"


def _parse(script: str, argv: list[str]):
    return runpy.run_path(str(ROOT / "training" / f"{script}.py"))["parse_args"](argv)


def test_one_name_per_idea_and_hidden_old_names(capsys):
    diffc = ["train", "--train-store", "s", "--layer", "up_ft1", "--out", "o"]
    assert _parse("train_diffc", diffc + ["--timestep", "25"]).timestep == 25
    assert _parse("train_diffc", diffc + ["--t", "100"]).timestep == 100  # old spelling, hidden
    assert _parse("train_diffc", diffc + ["--t", "1", "--view-mode", "all"]).view_mode == "all"
    assert _parse("train_diffc", diffc + ["--t", "1", "--views", "all"]).view_mode == "all"
    with pytest.raises(SystemExit):
        _parse("train_diffc", diffc)  # --timestep is required
    assert "--timestep" in capsys.readouterr().err

    extract = ["--backbone", "b", "--dataset", "d", "--out", "o"]
    assert _parse("extract_features", extract + ["--num-views", "3"]).num_views == 3
    assert _parse("extract_features", extract + ["--views", "2"]).num_views == 2
    ksae = ["--store", "s", "--layer", "l", "--timestep", "25", "--out", "o"]
    assert _parse("train_ksae", ksae + ["--view-ids", "0", "2"]).view_ids == [0, 2]
    assert _parse("train_ksae", ksae + ["--views", "1"]).view_ids == [1]

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
