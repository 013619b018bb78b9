"""A verb's arguments, declared once: argparse builds its sub-parser from
them, and :func:`parse_plain` reads the plain command lines without argparse.

A one-shot verb such as ``corral pause web`` should cost little more than
the interpreter's start and the round trip to the supervisor, yet importing
argparse (with gettext and re) and building the parser cost more than the
round trip. So a verb declared here is first read by :func:`parse_plain`,
which accepts only command lines whose meaning is beyond doubt and returns
``None`` for everything else: an option must be spelled in full and take
its value as the next word (not ``--opt=value``, ``-t5``, ``-it`` or an
abbreviation), no value or positional may start with ``-`` or be empty,
the positionals come together (no option between them), and anything
unknown (``-h``, a mistake) is left alone. argparse then parses those, with
its own help and messages. Both read the same declarations, and a test
checks that they agree on every command line the plain reader accepts.

No argparse, no typing at run time: this is on the control verbs' path.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from argparse import Namespace
    from collections.abc import Callable, Sequence
    from typing import Any, Literal, TypeAlias

    from ._parser import Subparsers

    Kind: TypeAlias = Literal["store", "flag", "false", "bool", "append", "rest", "many"]
else:
    # What the verbs are given: they read its attributes, which
    # SimpleNamespace holds as argparse's Namespace does (types is loaded
    # already; argparse is what this module spares).
    from types import SimpleNamespace as Namespace

__all__ = ["Arg", "Verb", "add_verb", "parse_plain"]

_KINDS = ("store", "flag", "false", "bool", "append", "rest", "many")


class Arg:
    """One argument of a verb, as it is given to ``add_argument``.

    *flags* are its option strings (``"-t", "--time"``), or its name alone
    for a positional (``"name"``). *kind*: ``"store"`` (an option with a
    value, or one positional), ``"flag"`` (``action="store_true"``),
    ``"false"`` (``action="store_false"``), ``"bool"`` (``--x`` and
    ``--no-x``: ``argparse.BooleanOptionalAction``), ``"append"``
    (``action="append"``, repeatable), ``"rest"`` (every word after the
    positionals, or after the options if there are none:
    ``nargs=argparse.REMAINDER``) or ``"many"`` (``nargs="*"``). *help*,
    *metavar*, *type*, *default* and *dest* are passed on as given (left
    out when ``None``).
    """

    __slots__ = ("default", "dest", "flags", "given_dest", "help", "kind", "metavar", "type")

    def __init__(
        self,
        *flags: str,
        help: str,
        kind: Kind = "store",
        metavar: str | None = None,
        type: Callable[[str], object] | None = None,
        default: object = None,
        dest: str | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"Arg kind: expected one of {_KINDS}, got {kind!r}")
        self.flags = flags
        self.help = help
        self.kind = kind
        self.metavar = metavar
        self.type = type
        self.default = default
        # argparse's dest: a positional's name; else the first long option,
        # or the first short one, without dashes and with "-" as "_".
        self.given_dest = dest
        if dest is not None:
            self.dest = dest
        elif not self.is_option:
            self.dest = flags[0]
        else:
            long = [f for f in flags if f.startswith("--")]
            self.dest = (long or list(flags))[0].lstrip("-").replace("-", "_")

    @property
    def spellings(self) -> dict[str, object]:
        """Each option string that may be given, with the value a ``flag``,
        ``false`` or ``bool`` option stores when it is (``--no-x`` too)."""
        if self.kind == "bool":
            return {
                **dict.fromkeys(self.flags, True),
                **{"--no-" + f[2:]: False for f in self.flags if f.startswith("--")},
            }
        return dict.fromkeys(self.flags, self.kind != "false")

    @property
    def is_option(self) -> bool:
        """Whether this is an option (``-x``/``--xx``) rather than a positional."""
        return self.flags[0].startswith("-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """``parser.add_argument`` with this declaration."""
        kwargs: dict[str, Any] = {"help": self.help}
        if self.kind == "flag":
            kwargs["action"] = "store_true"
        elif self.kind == "false":
            kwargs["action"] = "store_false"
        elif self.kind == "bool":
            import argparse

            kwargs["action"] = argparse.BooleanOptionalAction
        elif self.kind == "append":
            kwargs["action"] = "append"
        elif self.kind == "rest":
            kwargs["nargs"] = "..."  # argparse.REMAINDER
        elif self.kind == "many":
            kwargs["nargs"] = "*"
        for key in ("metavar", "type", "default"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.given_dest is not None:
            kwargs["dest"] = self.given_dest
        parser.add_argument(*self.flags, **kwargs)

    def initial(self) -> object:
        """Its value when the command line does not give it (argparse's)."""
        if self.kind in ("flag", "false"):
            return (self.kind == "false") if self.default is None else self.default
        if self.kind in ("rest", "many"):
            return [] if self.default is None else self.default
        if isinstance(self.default, list):
            return list(self.default)  # appended to: argparse copies it too
        return self.default


class Verb:
    """A verb: the function that runs it, its help and its arguments.

    *more*, if given, adds arguments that are not declared as :class:`Arg`
    to the sub-parser; such a verb is always parsed by argparse.
    """

    __slots__ = ("args", "description", "func", "help", "more")

    def __init__(
        self,
        func: Callable[[Namespace], int],
        help: str,
        description: str,
        *args: Arg,
        more: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> None:
        self.func = func
        self.help = help
        self.description = description
        self.args = args
        self.more = more


def add_verb(sub: Subparsers, name: str, verb: Verb) -> argparse.ArgumentParser:
    """Register *verb* as sub-parser *name*; its ``func`` is the default."""
    parser = sub.add_parser(name, help=verb.help, description=verb.description)
    for arg in verb.args:
        arg.add_to(parser)
    if verb.more is not None:
        verb.more(parser)
    parser.set_defaults(func=verb.func)
    return parser


def parse_plain(name: str, verb: Verb, words: Sequence[str]) -> Namespace | None:
    """``corral NAME WORDS...`` parsed as argparse would, or ``None`` if the
    command line is not plain (see the module's docstring): argparse's turn."""
    if verb.more is not None:
        return None
    options = {
        spelling: (a, value)
        for a in verb.args
        if a.is_option
        for spelling, value in a.spellings.items()
    }
    singles = [a for a in verb.args if not a.is_option and a.kind == "store"]
    many = [a for a in verb.args if a.kind == "many"]
    rest = [a for a in verb.args if a.kind == "rest"]
    # The shapes mirrored here: one-word positionals, then maybe a rest; a
    # rest alone (every word from the first that is not an option's, "--"
    # included, as argparse gives it); or one list of positionals alone.
    # argparse reads others in ways of its own.
    if len(rest) > 1 or len(many) > 1 or (many and (singles or rest)):
        return None
    values = {a.dest: a.initial() for a in verb.args}
    free: list[object] = []
    after_free = False  # an option came after the positionals
    i = 0
    while i < len(words):
        word = words[i]
        if rest and not singles and word and (word == "--" or not word.startswith("-")):
            values[rest[0].dest] = list(words[i:])
            break
        if word.startswith("-"):
            found = options.get(word)
            if found is None:
                return None
            arg, stored = found
            if arg.kind in ("flag", "false", "bool"):
                values[arg.dest] = stored
                i += 1
            else:
                if i + 1 == len(words):
                    return None
                text = words[i + 1]
                if not text or text.startswith("-"):
                    return None
                try:
                    value = text if arg.type is None else arg.type(text)
                except ValueError:
                    return None
                if arg.kind == "append":
                    before = values[arg.dest]
                    values[arg.dest] = [*before, value] if isinstance(before, list) else [value]
                else:
                    values[arg.dest] = value
                i += 2
            after_free = bool(free)
            continue
        if not word or after_free or (not many and len(free) == len(singles)):
            return None
        positional = many[0] if many else singles[len(free)]
        try:
            free.append(word if positional.type is None else positional.type(word))
        except ValueError:
            return None
        i += 1
        if rest and len(free) == len(singles):
            # argparse gives the words after the positionals to the rest,
            # less one "--" right after them; an option there is the rest's
            # too, which is not plain.
            tail = list(words[i:])
            if tail and tail[0] == "--":
                tail = tail[1:]
            elif tail and tail[0].startswith("-"):
                return None
            values[rest[0].dest] = tail
            break
    if many:
        values[many[0].dest] = free
    elif len(free) < len(singles):
        return None
    else:
        values.update((a.dest, word) for a, word in zip(singles, free, strict=True))
    return Namespace(verb=name, func=verb.func, **values)
