"""What every command-line script shares: help that shows defaults, hidden old option names, one-line errors.

Kept in the library so the ``training/`` scripts stay thin and their ``--help``
pages read alike: each option says its default (or that it is required), the
epilog's examples keep their line breaks, docstrings reused as descriptions lose
their Sphinx markup, renamed options keep working without cluttering help, and
a user's mistake ends in one line and exit status 2, as argparse's own errors do.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

__all__ = ["HelpFormatter", "add_hidden_alias", "plain_text", "error_line", "usage_error"]

#: ``:mod:`x```, ``:func:`~a.b```, ``:class:`X```... (Sphinx roles) and ````literal```` (reST literals).
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """``text`` without Sphinx markup: roles keep their target, literals their content, in single backticks.

    Docstrings double as ``--help`` descriptions; a terminal shows markup verbatim.
    """
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their layout; every option's help ends with its default.

    Help text that already states a default (``"(default: the backbone's)"``) or
    says when the option is required is left alone, so options whose default
    depends on other inputs explain it in words. Flags show ``(default: off)``,
    unset options ``(default: none)``; required options show no default at all.
    """

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "")
        lowered = text.lower()
        if ("default" in lowered or "required" in lowered or action.default is argparse.SUPPRESS
                or not action.option_strings or action.required):
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


def add_hidden_alias(parser: Any, old: str, dest: str, **_ignored: Any) -> None:
    """Accept ``old`` as another spelling of the option stored in ``dest``, not shown in ``--help``.

    The old spelling is bound to the *same* argparse action as the current one,
    so it parses exactly alike, a required option stays required in the usage
    line and is satisfied by either spelling, and errors name the current
    spelling. Extra keyword arguments are accepted for older call sites and
    ignored: the alias parses like the option it stands for.
    """
    target = next((a for a in parser._actions if a.dest == dest and a.option_strings), None)
    if target is None:
        raise ValueError(f"add the option stored in {dest!r} before its old spelling {old!r}")
    if old in parser._option_string_actions:
        raise ValueError(f"{old!r} already names an option")
    parser._option_string_actions[old] = target


def error_line(prog: str, message: Any) -> int:
    """Print ``<prog>: error: <first line of message>`` to stderr; returns 2, the exit status (argparse's convention).

    For mistakes a user fixes (a missing store, a bad flag combination): a
    traceback around the one useful sentence only hides it. ``main()``
    functions ``return error_line(...)``; deeper code calls :func:`usage_error`.
    """
    first = str(message).strip().splitlines()[0] if str(message).strip() else "invalid arguments"
    print(f"{prog}: error: {first}", file=sys.stderr)
    return 2


def usage_error(prog: str, message: Any) -> NoReturn:
    """:func:`error_line`, then exit with status 2."""
    raise SystemExit(error_line(prog, message))
