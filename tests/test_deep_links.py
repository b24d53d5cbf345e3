"""Link parsing without a browser: what a link may name, and one sentence for each thing it may get wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from app_inputs import app_release_path  # noqa: E402

from revelio_hub.app.deep_links import Link, example_index, parse_link  # noqa: E402
from revelio_hub.app.state import AppConfig, AppState  # noqa: E402


@pytest.fixture(scope="module")
def state() -> AppState:
    return AppState.from_config(AppConfig(releases=[app_release_path()], workers=0))


def test_a_link_names_an_entry_and_a_neuron_or_an_example(state):
    rel = state.get_release()
    assert parse_link(state, {}) is None and parse_link(state, {"utm_source": "mail"}) is None
    link = parse_link(state, {"release": rel.name, "layer": "bottleneck", "t": "100", "neuron": "7"})
    assert link == Link(rel.name, "bottleneck", 100, neuron=7)
    assert link.query() == f"?release={rel.name}&layer=bottleneck&t=100&neuron=7"
    assert parse_link(state, dict(pair.split("=") for pair in link.query()[1:].split("&"))) == link
    layer, t = rel.default_entry()
    assert parse_link(state, {"example": "0"}) == Link(rel.name, layer, t, example=0)  # defaults, as in the API
    both = parse_link(state, {"example": "1", "neuron": "3"})
    assert both == Link(rel.name, layer, t, neuron=3, example=1) and both.query().endswith("&neuron=3&example=1")


@pytest.mark.parametrize("params, message", [
    ({"release": "/etc"}, "Unknown release '/etc'; this app serves: toy-shapes"),
    ({"layer": "up_ft9"}, "Layer 'up_ft9' is not in release"),
    ({"layer": "bottleneck", "t": "7"}, "Timestep 7 is not available for layer 'bottleneck'"),
    ({"layer": "bottleneck", "t": "25", "neuron": "-1"}, "neuron must be from 0 to"),
    ({"neuron": "1.5"}, "neuron must be a whole number"),
    ({"example": "99"}, "example must be from 0 to"),
    ({"layer": "x" * 500}, "too long"),
])
def test_bad_links_are_refused_with_a_sentence(state, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        parse_link(state, params)
    assert str(Path(app_release_path()).resolve()) not in str(info.value)


def test_an_example_is_recognised_by_its_content(state, tmp_path):
    rel = state.get_release()
    copy = tmp_path / "copy.png"
    shutil.copyfile(rel.examples[2][0], copy)  # Gradio shows a copy of the example, under another name
    assert example_index(rel, str(copy)) == 2
    assert example_index(rel, str(tmp_path / "missing.png")) is None and example_index(rel, None) is None
