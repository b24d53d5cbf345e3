"""What the app's "Use via API" page and ``gradio_client.view_api()`` show: names and types.

Gradio derives an endpoint's documentation from its components: a dropdown is
always typed ``str`` (even when its choices are timesteps or neuron ids), a
``gr.api`` function's inputs and outputs are labelled "1st", "2nd", ... and an
unlabelled component becomes ``value_22``. API users read that page to write
their calls, so each public input and output here carries a name and its real
type; private UI events stay off the page (``api_visibility="private"``).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

import gradio as gr
from gradio.context import get_blocks_context
from gradio_client.utils import python_type_to_json_schema


#: Keywords of a UI event that is no endpoint: the page's own events stay off the API page.
PRIVATE: dict[str, Any] = {"api_visibility": "private"}


class IntDropdown(gr.Dropdown):
    """A dropdown whose choices are whole numbers (timesteps, neuron ids), documented as ``int``.

    ``is_template`` makes Gradio render it with the ordinary dropdown of the
    browser (as it does for its own ``gr.Text`` over ``gr.Textbox``).
    """

    is_template = True

    def api_info(self) -> dict[str, Any]:  # noqa: D102
        # No "enum": gradio_client prints one as Literal['25', '100'], which reads as strings.
        return {"type": "integer"}


def json_endpoint(fn: Callable[..., Any], *, api_name: str, output: str, **kwargs: Any) -> Any:
    """``gr.api(fn)`` with its inputs named after ``fn``'s parameters and its output called ``output``.

    Gradio's own labels for these are ordinals ("1st"), which is what
    ``view_api()`` would print for the answer. The output's type is read
    with :func:`typing.get_type_hints`, so it is right in modules that use
    ``from __future__ import annotations`` too (Gradio reads the raw annotation:
    the string ``"dict"``, documented as ``Any``). ``kwargs`` go to ``gr.api``
    (concurrency group and limit).
    """
    dependency = gr.api(fn, api_name=api_name, **kwargs)
    block_fn = next(f for f in get_blocks_context().fns.values() if f.api_name == api_name)
    for component, name in zip(block_fn.inputs, inspect.signature(fn).parameters):
        component.label = name
    returns = typing.get_type_hints(fn).get("return")
    for component in block_fn.outputs:
        component.label = output
        if returns is not None:
            component._api_info = python_type_to_json_schema(returns)
    return dependency


__all__ = ["IntDropdown", "PRIVATE", "json_endpoint"]
