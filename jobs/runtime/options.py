"""Each job option declared once: a frozen dataclass field is the flag, the default, the check and
whether the option decides the numbers (the fingerprint of partials and run.json).

    @dataclass(frozen=True)
    class Config(Options):
        out: str = opt(help="output folder (local or s3://)")                  # required flag
        steps: int = opt(31, "Adam steps (paper: 31)", check=at_least(1), decides=True)
        device: str = opt("auto", "where to compute", choices=("auto", "cpu", "cuda"))
        crop: bool = opt(True, "optimise the whole input", flag="--no-crop")  # store_false
        scale: tuple = opt((), "zoom factors, e.g. 0.9,1.1", parse=parse_floats, decides=True)

        def check(self) -> None:          # optional: checks that involve several fields
            ...

    def main(argv=None) -> int:
        return run_cli("python -m jobs.NAME", __doc__, Config, run, argv)

    Config(out="x", steps=5).argv()       # ["--out", "x", "--steps", "5"]: the same run from a shell
    Config(out="x").decisive()            # {"steps": 31, "scale": []}: what the fingerprint hashes

The flag is `--field-name` unless `flag=` says otherwise. A bool is a switch that flips its
default (`None` default: `--x` / `--no-x`); a `tuple[...]` without `parse` is a repeatable flag;
`parse` turns the command-line string into the value (and may raise BadInput) and `show` turns
the value back into that string. `choices` (a sequence, or a callable read only when a config is
checked: the 70 model names) and `check(value)` run in `Options.__post_init__`, so a config built in
Python is checked exactly like one from the command line, and the usage line stays one line.

Why not tyro or jsonargparse: both were tried (tyro 1.0.17, jsonargparse 4.53.0, simple-parsing
0.1.9). tyro prints its errors as multi-line boxes, jsonargparse spells flags with underscores and
takes bools as `--x true`, simple-parsing adds a second flag beside every alias: each breaks the
flags the README, infra/*.yaml and scripts use, or the one-line errors. This layer is argparse
plus one pass over the fields.

Exit codes (`run_cli`): BadInput -> one line `PROG: error: ...` on stderr, exit 2, before any
output is written; JobFailed (the job stopped for a reason that is not the user's input, e.g. a
unit failed on every try) -> one line, exit 1; Ctrl-C -> one line, exit 130; any other exception
keeps its traceback (a bug). `with bad_input():` turns the ValueError of a pipeline call on user
input into BadInput.
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

__all__ = ["BadInput", "JobFailed", "fail", "bad_input", "opt", "Options", "at_least",
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
        raise BadInput(prefix + (first_line_of(e) if first_line else str(e))) from None


def first_line_of(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class _Opt:
    """What a field adds to a dataclass field: its CLI face, its check, its part in the numbers."""

    help: str
    flag: str | None
    parse: Callable[[str], Any] | None       # CLI string -> value (may raise BadInput)
    show: Callable[[Any], str] | None        # value -> CLI string (argv())
    check: Callable[[Any], str | None] | None   # value -> error text, or None when fine
    choices: Sequence | Callable[[], Sequence] | None
    decides: bool                            # changes the numbers: part of the fingerprint
    metavar: str | None


def opt(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
        parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
        check: Callable[[Any], str | None] | None = None,
        choices: Sequence | Callable[[], Sequence] | None = None, decides: bool = False,
        metavar: str | None = None) -> Any:
    """A dataclass field with its CLI help, parser, check and role (no default: required)."""
    meta = {"opt": _Opt(help, flag, parse, show, check, choices, decides, metavar)}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(lo: float) -> Callable[[Any], str | None]:
    """Check: None (not given) or a value >= lo."""
    return lambda v: None if v is None or v >= lo else f"must be >= {lo}"


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or lo <= v <= hi else f"must be in {lo}..{hi}"


def _opt(f: dataclasses.Field) -> _Opt:
    return f.metadata["opt"]


def _flag(f: dataclasses.Field) -> str:
    return _opt(f).flag or "--" + f.name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """int from `int`, `int | None`, `Optional[int]`; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


class Options:
    """Mixin for frozen dataclasses whose fields are `opt(...)`: validated on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            o, value = _opt(f), getattr(self, f.name)
            allowed = o.choices() if callable(o.choices) else o.choices
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

    def decisive(self) -> dict[str, Any]:
        """The options declared `decides=True`, by name: what the fingerprint hashes of them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _opt(f).decides}

    def argv(self) -> list[str]:
        """The command-line arguments that give this config (defaults left out)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not _MISSING and value == f.default:
                continue
            o, flag = _opt(f), _flag(f)
            if isinstance(value, bool) and f.default is None:
                out.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, bool):
                out.append(flag)
            elif isinstance(value, tuple) and o.parse is None:
                out += [a for v in value for a in (flag, str(v))]
            elif value is not None:
                text = o.show(value) if o.show else (",".join(map(str, value)) if isinstance(
                    value, tuple) else str(value))
                out += [flag, text]
        return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage too: one line is enough
        fail(self.prog, f"{message} (see --help)")


def _help(f: dataclasses.Field) -> str:
    """The option's help, with the static choices and a default that says something."""
    o, text = _opt(f), _opt(f).help
    if o.choices is not None and not callable(o.choices):
        text += f" (one of: {', '.join(map(str, o.choices))})"
    if f.default not in (_MISSING, None, False, True, ()):
        text += f" (default: {o.show(f.default) if o.show else f.default})"
    return text.replace("%", "%%")


def build_parser(cls: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argparse parser of an Options dataclass: one flag per field. An absent flag leaves
    no attribute (SUPPRESS), so the dataclass default stands. The usage line names the required
    flags and `[options]`: --help lists them all."""
    required = [f"{_flag(f)} {f.name.upper()}" for f in dataclasses.fields(cls)
                if f.default is _MISSING]
    p = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS,
                usage=" ".join(["%(prog)s", *required, "[options]"]))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        o, kind = _opt(f), _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "help": _help(f)}
        if f.default is _MISSING:
            kw["required"] = True
        if kind is bool:
            kw["action"] = (argparse.BooleanOptionalAction if f.default is None else
                            "store_false" if f.default else "store_true")
        else:
            kw["metavar"] = o.metavar
            if typing.get_origin(kind) is tuple and o.parse is None:
                kw["action"] = "append"                   # --from a --from b -> ("a", "b")
            elif o.parse is None and kind in (int, float):
                kw["type"] = kind
        p.add_argument(_flag(f), **kw)
    return p


def parse_config(cls: type, argv: Sequence[str] | None, prog: str, doc: str | None = None):
    """argv -> a validated `cls` instance. Argument errors exit 2; bad values raise BadInput."""
    values = vars(build_parser(cls, prog, doc).parse_args(argv))
    for f in dataclasses.fields(cls):
        if f.name in values:
            parse = _opt(f).parse
            v = values[f.name]
            values[f.name] = parse(v) if parse else tuple(v) if isinstance(v, list) else v
    return cls(**values)


def run_cli(prog: str, doc: str | None, cls: type, body: Callable[[Any], Any],
            argv: Sequence[str] | None = None) -> int:
    """Parse, validate and run `body(config)` with the project's exit codes (module docstring)."""
    try:
        body(parse_config(cls, argv, prog, doc))
    except BadInput as e:
        fail(prog, first_line_of(e), 2)
    except JobFailed as e:
        fail(prog, first_line_of(e), 1)
    except KeyboardInterrupt:
        fail(prog, "interrupted; rerun the same command to resume from the finished units", 130)
    return 0
