"""Each job option declared once: a frozen dataclass field drives the CLI, the default and the check.

    @dataclass(frozen=True)
    class Config(Options):
        out: str = opt(help="output folder (local or s3://)")                  # required flag
        steps: int = opt(31, "Adam steps (paper: 31)", check=at_least(1))
        device: str = opt("auto", "where to compute", choices=("auto", "cpu", "cuda"))
        crop: bool = opt(True, "optimise the whole input", flag="--no-crop")  # store_false
        scale: tuple = opt((), "zoom factors, e.g. 0.9,1.1", parse=parse_floats)

        def check(self) -> None:          # optional: checks that involve several fields
            ...

    def main(argv=None) -> int:
        return run_cli("python -m jobs.NAME", __doc__, Config, run, argv)

The flag is `--field-name` unless `flag=` says otherwise; its type comes from the annotation
(`int | None` gives an optional int; `tuple[str, ...]` without `parse` a repeatable flag whose
values form the tuple). `parse` turns the command-line string into the value (and may
raise BadInput); `check(value)` returns an error text or None; `choices` may be a callable, so
that lists such as the model names are read only when a parser is built. Every check runs in
`Options.__post_init__`, so a config built in Python is validated exactly like one from the CLI.

Exit codes (`run_cli`): BadInput -> one line `PROG: error: ...` on stderr, exit 2, before any
output is written; JobFailed (the job stopped for a reason that is not the user's input, e.g. no
worker could start) -> one line, exit 1; any other exception keeps its traceback (a bug).
`with bad_input():` turns the ValueError of a pipeline call on user input into BadInput.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Sequence

__all__ = ["BadInput", "JobFailed", "fail", "bad_input", "Opt", "opt", "Options", "at_least",
           "in_range", "build_parser", "parse_config", "run_cli"]

_MISSING = dataclasses.MISSING


class BadInput(ValueError):
    """Invalid user input: one line on stderr, exit code 2, nothing written."""


class JobFailed(RuntimeError):
    """The job cannot go on for a reason outside the user's input: one line on stderr, exit 1."""


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextlib.contextmanager
def bad_input(*errors: type[BaseException], prefix: str = "",
              first_line: bool = False) -> Iterator[None]:
    """Errors of the given types (default ValueError) raised inside are the user's input: they
    leave as BadInput (exit 2) with `prefix` and their message (`first_line`: its first line,
    else the error's type name when it has none).

        with bad_input(prefix=f"--from {url}: "):
            census = census_table(read_table(url), ...)
    """
    try:
        yield
    except errors or (ValueError,) as e:
        raise BadInput(prefix + (_first_line(e) if first_line else str(e))) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class Opt:
    """What a field adds to a dataclass field: its CLI face and its check."""

    help: str
    flag: str | None = None                       # default: --field-name
    choices: Sequence | Callable[[], Sequence] | None = None
    parse: Callable[[str], Any] | None = None     # CLI string -> value (may raise BadInput)
    check: Callable[[Any], str | None] | None = None   # value -> error text, or None when fine
    metavar: str | None = None


def opt(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
        choices: Sequence | Callable[[], Sequence] | None = None,
        parse: Callable[[str], Any] | None = None,
        check: Callable[[Any], str | None] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its CLI help, choices, parser and check (no default: required)."""
    meta = {"opt": Opt(help, flag, choices, parse, check, metavar)}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(lo: float) -> Callable[[Any], str | None]:
    """Check: None (not given) or a value >= lo."""
    return lambda v: None if v is None or v >= lo else f"must be >= {lo}"


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or lo <= v <= hi else f"must be in {lo}..{hi}"


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["opt"].flag or "--" + f.name.replace("_", "-")


def _choices(o: Opt) -> Sequence | None:
    return o.choices() if callable(o.choices) else o.choices


def _base_type(annotation: Any) -> Any:
    """int from `int`, `int | None`, `Optional[int]`; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _repeatable(o: Opt, annotation: Any) -> bool:
    """A `tuple[...]` field without `parse`: a flag that may be given several times."""
    return o.parse is None and typing.get_origin(_base_type(annotation)) is tuple


class Options:
    """Mixin for frozen dataclasses whose fields are `opt(...)`: validated on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            o = f.metadata.get("opt")
            if o is None:
                continue
            value = getattr(self, f.name)
            allowed = _choices(o)
            if allowed is not None and value is not None and value not in allowed:
                raise BadInput(f"invalid {_flag(f)} {value!r}; allowed: "
                               f"{', '.join(map(str, allowed))}")
            problem = o.check(value) if o.check else None
            if problem:
                raise BadInput(f"{_flag(f)} {problem}, got {value}")
        self.check()

    def check(self) -> None:
        """Checks that involve several fields; raise BadInput."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage too: one line is enough
        fail(self.prog, f"{message} (see --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks and shows defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, True, (),
                                                                 argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def build_parser(cls: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argparse parser of an Options dataclass: one flag per field."""
    p = _Parser(prog=prog, description=doc, formatter_class=_Formatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        o = f.metadata.get("opt")
        if o is None:
            continue
        kind = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "help": o.help}
        if f.default is _MISSING and f.default_factory is _MISSING:
            kw["required"] = True
        if kind is bool and f.default is None:   # tri-state: --x / --no-x / neither (None)
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        elif kind is bool:
            kw["action"] = "store_false" if f.default is True else "store_true"
        elif _repeatable(o, hints[f.name]):          # --from a --from b -> ("a", "b")
            kw.update(action="append", default=None, metavar=o.metavar)
        else:
            # a parsed option's CLI default is None: the dataclass default stands
            kw["default"] = None if (o.parse or "required" in kw) else f.default
            if o.parse is None and kind in (int, float, str):
                kw["type"] = kind
            if o.choices is not None:
                kw["choices"] = _choices(o)
            if o.metavar:
                kw["metavar"] = o.metavar
        p.add_argument(_flag(f), **kw)
    return p


def parse_config(cls: type, argv: Sequence[str] | None, prog: str, doc: str | None = None):
    """argv -> a validated `cls` instance. Argument errors exit 2; bad values raise BadInput."""
    ns = vars(build_parser(cls, prog, doc).parse_args(argv))
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in ns:
            continue
        o, v = f.metadata["opt"], ns[f.name]
        if o.parse is not None:
            if v is None:
                continue                  # not given: the dataclass default
            v = o.parse(v)
        elif _repeatable(o, hints[f.name]):
            if v is None:
                continue                  # not given: the dataclass default
            v = tuple(v)
        values[f.name] = v
    return cls(**values)


def run_cli(prog: str, doc: str | None, cls: type, body: Callable[[Any], Any],
            argv: Sequence[str] | None = None) -> int:
    """Parse, validate and run `body(config)` with the project's exit codes (module docstring)."""
    try:
        cfg = parse_config(cls, argv, prog, doc)
        body(cfg)
    except BadInput as e:
        fail(prog, _first_line(e), 2)
    except JobFailed as e:
        fail(prog, _first_line(e), 1)
    except KeyboardInterrupt:
        fail(prog, "interrupted; rerun the same command to resume from the finished units", 130)
    return 0
