"""What every command-line script shares: help that shows defaults, and hidden old option names.

Kept in the library so the ``training/`` scripts stay thin and their ``--help``
pages read alike: each option says its default, the epilog's examples keep
their line breaks, and renamed options keep working without cluttering help.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["HelpFormatter", "add_hidden_alias"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their layout; every option's help ends with its default.

    Help text that already states a default (``"(default: the backbone's)"``)
    is left alone, so options whose default depends on other inputs explain it
    in words. Flags show ``(default: off)``, unset options ``(default: none)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings
                or action.required):
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.default is None:
            shown = "none"
        elif action.default is False:
            shown = "off"
        elif action.default is True:
            shown = "on"
        elif isinstance(action.default, (list, tuple)):
            shown = " ".join(str(v) for v in action.default)
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_hidden_alias(parser: Any, old: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden spelling of the option stored in ``dest`` (not shown in ``--help``)."""
    parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
