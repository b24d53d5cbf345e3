"""What every command-line script shares: options generated from config dataclasses, help that shows
defaults, one-line errors.

Kept in the library so the ``training/`` scripts stay thin and their ``--help``
pages read alike: each option says its default (or that it is required), the
epilog's examples keep their line breaks, docstrings reused as descriptions lose
their Sphinx markup, and a user's mistake ends in one line and exit status 2, as
argparse's own errors do.

**One definition per option.** A script's options are the fields of dataclasses
(the library's own configs, such as
:class:`~revelio_hub.interpret.atlas_config.AtlasConfig`, or a script's options class):
:func:`add_options` turns each field into an argparse option, its name, type,
default and help taken from the field (help from :func:`option` metadata or the
class docstring's ``Attributes:`` entry), and :func:`from_args` builds the
dataclass back from the parsed namespace. Adding a hyperparameter is one field.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import re
import sys
import types
import typing
from typing import Any, Callable, Iterable, Literal, NoReturn, Optional, Sequence, TypeVar, Union

__all__ = ["HelpFormatter", "Option", "add_options", "error_line", "field_docs", "from_args",
           "option", "plain_text", "usage_error"]

T = TypeVar("T")

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
        if not text:
            return f"default: {shown}"
        if text.endswith("."):  # "Images per batch (default: 8)." reads better than "batch. (default: 8)"
            return f"{text[:-1]} (default: {shown})."
        return f"{text} (default: {shown})"


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


# ---------------------------------------------------------------------------
# Options generated from dataclass fields

#: The key of a field's ``metadata`` holding its :class:`Option`.
CLI = "cli"
#: ``Option.const`` when the option takes no ``const`` (None is a valid const).
NO_CONST: Any = type("NoConst", (), {"__repr__": lambda self: "NO_CONST"})()


@dataclasses.dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line, where its name, type and default do not say.

    ``help`` overrides the class docstring's entry; ``flag`` the ``--field-name``
    spelling (one name, never an alias); ``parse`` converts each value (the
    annotation's type otherwise); ``metavar``, ``choices``, ``nargs`` and ``const``
    are argparse's (on a bool field ``const`` makes a flag that stores that value, the
    field's default otherwise: ``--no-normalize-input`` → False, else None, "the
    recipe's"); ``repeat`` collects every use of the option into a list;
    ``required`` makes a field that has a default required on the command line.
    ``hidden=True`` keeps a field off the command line.
    """

    help: Optional[str] = None
    flag: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    choices: Optional[Sequence[Any]] = None
    nargs: Union[str, int, None] = None
    const: Any = NO_CONST
    repeat: bool = False
    required: bool = False
    hidden: bool = False


def option(help: Optional[str] = None, **how: Any) -> dict:
    """Field metadata for :func:`add_options`: ``field(default=..., metadata=option("help", flag="--lr"))``."""
    return {CLI: Option(help, **how)}


_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s docstring (Google style) as ``{field: text}``.

    An entry may document several fields at once (``a / b: text``); its
    continuation lines are joined with single spaces. Inherited docs come first,
    so a subclass's entry wins.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (klass.__dict__.get("__doc__") or "").expandtabs().splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
        if start is None:
            continue
        names: list[str] = []
        indent = None
        for line in lines[start + 1:]:
            if not line.strip():
                continue
            here = len(line) - len(line.lstrip())
            match = _ENTRY.match(line)
            if indent is None:
                indent = here
            if here < indent:  # the section ended
                break
            if here == indent and match:
                names = [n.strip() for n in match.group(2).split("/")]
                for name in names:
                    docs[name] = match.group(3).strip()
            elif names:
                for name in names:
                    docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    """``cls``'s field annotations as types.

    A script run through ``runpy.run_path`` (as tests load them) leaves no module
    behind to resolve string annotations in; option fields only use builtins and
    ``typing`` names, so those are the fallback namespace.
    """
    try:
        return typing.get_type_hints(cls)
    except NameError:
        namespace = {**vars(builtins), **vars(typing)}
        namespace.update(vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {})
        return {f.name: eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 (own source)
                for f in dataclasses.fields(cls)}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _argparse_kwargs(field: dataclasses.Field, annotation: Any, how: Option, default: Any) -> dict:
    """argparse keyword arguments for one field: type, nargs, choices, action and default from its annotation."""
    kwargs: dict[str, Any] = {"dest": field.name}
    kind = _unwrap_optional(annotation)
    if kind is bool and how.const is not NO_CONST:  # a flag that sets one value, else the default (None: a preset's)
        kwargs.update(action="store_const", const=how.const, default=None if default is dataclasses.MISSING else default)
        return kwargs
    if kind is bool:
        kwargs["action"] = "store_false" if default is True else "store_true"
        kwargs["default"] = bool(default) if default is not dataclasses.MISSING else False
        return kwargs
    origin = typing.get_origin(kind)
    if origin in (list, tuple, Sequence, typing.Sequence) or kind in (list, tuple):
        items = [a for a in typing.get_args(kind) if a is not Ellipsis]
        kind = items[0] if items else str
        kwargs["nargs"] = "+"
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
        kind = type(kwargs["choices"][0])
    if how.repeat:
        kwargs["action"] = "append"
        kwargs.pop("nargs", None)
    parse = how.parse or (kind if kind in (int, float, str) else None)
    if parse is not None:
        kwargs["type"] = parse
    for name in ("metavar", "choices", "nargs"):
        if getattr(how, name) is not None:
            kwargs[name] = list(how.choices) if name == "choices" else getattr(how, name)
    if how.const is not NO_CONST:
        kwargs["const"] = how.const
    if default is dataclasses.MISSING or how.required:
        kwargs["required"] = True
    else:
        kwargs["default"] = list(default) if isinstance(default, tuple) else default
    return kwargs


def _flag(field: dataclasses.Field, how: Option, default: Any, prefix: str) -> str:
    if how.flag:
        return how.flag
    name = prefix + field.name.replace("_", "-")
    return f"--no-{name}" if default is True and not how.required else f"--{name}"


def add_options(parser: Any, cls: type, *, only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
                prefix: str = "") -> list[str]:
    """Add one option per field of dataclass ``cls`` to ``parser`` (or an argument group); returns their dests.

    The option is ``--<prefix><field-name>`` (``--no-<name>`` for a flag that
    defaults to on), typed and defaulted from the field, its help from
    :func:`option` metadata or the class docstring. ``only``/``exclude`` pick
    fields: a library config may hold settings a script does not offer. A
    field without help is a programming error: every option says what it does.
    """
    hints = _type_hints(cls)
    docs = field_docs(cls)
    chosen = set(only) if only is not None else None
    added = []
    for field in dataclasses.fields(cls):
        how: Option = field.metadata.get(CLI, Option())
        if how.hidden or field.name in exclude or (chosen is not None and field.name not in chosen) \
                or not field.init:
            continue
        text = how.help if how.help is not None else docs.get(field.name, "").replace("%", "%%")
        if not text:
            raise ValueError(f"{cls.__name__}.{field.name} has no help: document it in the class docstring's "
                             "Attributes: section or with option(help=...)")
        default = _field_default(field)
        kwargs = _argparse_kwargs(field, hints[field.name], how, default)
        parser.add_argument(_flag(field, how, default, prefix), help=text, **kwargs)
        added.append(field.name)
    return added


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from the parsed ``args`` (fields the parser did not add keep their defaults).

    Lists become tuples where the field's annotation says tuple, so a config
    built from the command line compares equal to one built in code.
    """
    hints = _type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init or field.name in overrides or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        kind = _unwrap_optional(hints[field.name])
        if isinstance(value, list) and (kind is tuple or typing.get_origin(kind) is tuple):
            value = tuple(value)
        values[field.name] = value
    return cls(**values, **overrides)
