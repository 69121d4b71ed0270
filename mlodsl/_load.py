"""Load a user's program for the CLI: import a file or module, find its Program.

``load(target)`` imports ``target`` (a path to a ``.py`` file or a dotted module
name, optionally followed by ``:NAME``) without running its ``__main__`` block,
and returns the :class:`Program` it defines, or a Program compiled from all the
problems it defines when it has none. Every way this can fail on the user's
side raises :class:`LoadError` with a message that says what to do, except a
broken program, which raises the compiler's :class:`CompileError` unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import linecache
import os
import re
import sys
import traceback
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from compiler.errors import CompileError, MlodslError
from mlodsl._problem import Problem
from mlodsl._program import Program

FILE_NOT_FOUND = (
    "{target!r} is neither a Python file nor an importable module.\n"
    "Rule: FILE is a path to a .py file (e.g. examples/quickstart.py) or a dotted module name "
    "(e.g. mypkg.experiment) importable from the current directory.\n"
    "Fix: check the path{hint}."
)

IMPORT_FAILED = (
    "importing {target} failed with {error_type}: {error}\n"
    "  at {where}{source}\n"
    "Rule: mlodsl imports FILE (without running its `if __name__ == \"__main__\":` block) to "
    "find its program.\n"
    "Fix: correct the error at that line; run again with --traceback to see the whole "
    "traceback."
)

NO_PROBLEMS = (
    "{target} defines no problems.\n"
    "Rule: FILE must define a Program, or functions decorated with @problem(...) at module "
    "level.\n"
    "Fix: {fix}"
)

NO_PROBLEMS_FIX = "point mlodsl at the file that defines them, e.g. `program = Program([...])`."

FACTORY_FIX = (
    "it builds its Program inside {factories}, which mlodsl does not call. Assign one at module "
    "level (`program = {example}(...)`), or give a function that takes no arguments and returns "
    "it as FILE:NAME."
)

MANY_PROGRAMS = (
    "{target} defines {count} Programs: {names}.\n"
    "Rule: mlodsl shows one program; it takes the one named `program` when there are several.\n"
    "Fix: pick one with FILE:NAME, e.g. `{example}`."
)

NO_SUCH_NAME = (
    "{target} has no attribute {name!r} that is a Program, a problem or a list of problems.\n"
    "Rule: in FILE:NAME, NAME names a module-level Program (or problems) of FILE, or a function "
    "that takes no arguments and returns one.\n"
    "Fix: use one of: {names}."
)

T = TypeVar("T")
_counter = itertools.count()
_SUFFIX = re.compile(r"^(?P<module>.+?):(?P<name>[A-Za-z_]\w*)$")


class LoadError(MlodslError):
    """The user's FILE could not be found, imported, or holds no program (CLI exit code 2).

    ``cause`` is the exception raised while importing, when there was one.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def load(target: str) -> Program:
    """The Program of ``target`` (``FILE``, ``FILE:NAME``, ``module`` or ``module:NAME``).

    Raises :class:`LoadError` when it cannot be found or imported or holds no
    problems, and :class:`CompileError` when its problems do not compile.
    """
    spec, name = split_target(target)
    module = import_target(spec)
    if name is not None:
        return program_named(module, spec, name)
    return program_of(module, spec)


def split_target(target: str) -> tuple[str, str | None]:
    """``"path/f.py:prog"`` → ``("path/f.py", "prog")``; no ``:NAME`` → ``(target, None)``.

    A Windows drive (``C:\\x.py``) is not taken for a name: NAME must be an identifier
    and what precedes it must not be a single letter.
    """
    m = _SUFFIX.match(target)
    if m is None or len(m["module"]) == 1:
        return target, None
    return m["module"], m["name"]


def import_target(spec: str) -> types.ModuleType:
    """Import a ``.py`` path (or an existing file) or a dotted module name."""
    path = Path(spec)
    if path.suffix == ".py" or os.sep in spec or path.is_file():
        if not path.is_file():
            hint = "" if path.suffix == ".py" or path.is_dir() else ", or give a module name"
            raise LoadError(FILE_NOT_FOUND.format(target=spec, hint=f" ({_missing_hint(path)}){hint}"))
        return import_file(path)
    return import_module(spec)


def _missing_hint(path: Path) -> str:
    if path.is_dir():
        return f"{path} is a directory; point at the .py file inside it"
    return f"no file {path.resolve()}"


def import_file(path: Path) -> types.ModuleType:
    """Import ``path`` under a fresh module name (never ``__main__``), its directory on sys.path."""
    path = path.resolve()
    name = "_mlodsl_user_{}_{}".format(re.sub(r"\W", "_", path.stem), next(_counter))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(FILE_NOT_FOUND.format(target=str(path), hint=" (not a Python source file)"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling, dataclasses and typing look modules up here
    try:
        with _user_import(path.parent, _rel(str(path)), str(path)):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_module(name: str) -> types.ModuleType:
    """Import a dotted module name, the current directory on sys.path (as ``python -m`` does)."""
    cwd = os.getcwd()
    with _user_import(None, name, name):  # find_spec imports the parent packages
        found = _find_spec(name)
        if found is None or found.origin is None:
            hint = (f" (no module {name!r} importable from {cwd}); give a path to a .py file, "
                    "or run from the directory that contains the package")
            raise LoadError(FILE_NOT_FOUND.format(target=name, hint=hint))
    with _user_import(None, name, found.origin):
        return importlib.import_module(name)


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):  # a missing parent package, or a bad name
        return None


@contextlib.contextmanager
def _user_import(directory: Path | None, target: str, origin: str) -> Iterator[None]:
    """Run the user's import: ``directory`` (default: the current one) first on sys.path,
    sys.argv holding only ``origin``, failures turned into LoadError."""
    argv = sys.argv
    sys.argv = [origin]  # a module that reads sys.argv at import time sees no CLI options
    try:
        with _on_path(str(directory) if directory is not None else os.getcwd()):
            yield
    except (CompileError, LoadError):
        raise  # a broken program (the CLI shows the compiler's message), or already explained
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure of the user's code
        raise LoadError(import_failed(target, origin, e), cause=e) from e
    finally:
        sys.argv = argv


@contextlib.contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """Put ``directory`` first on sys.path for the duration, then take that entry out again."""
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def import_failed(target: str, origin: str, error: BaseException) -> str:
    """The IMPORT_FAILED message: exception type and text, and the user's line it came from."""
    file, line = where(error, origin)
    text = linecache.getline(file, line).strip() if file else ""
    return IMPORT_FAILED.format(
        target=target, error_type=type(error).__name__, error=str(error) or "(no message)",
        where=f"{_rel(file)}:{line}" if file else "(unknown location)",
        source=f"\n    {text}" if text else "")


def where(error: BaseException, origin: str) -> tuple[str | None, int]:
    """``(file, line)`` the error came from: the innermost frame in ``origin``, else the innermost.

    A ``SyntaxError`` carries its own location, which wins.
    """
    if isinstance(error, SyntaxError) and error.filename:
        return error.filename, error.lineno or 0
    frames = traceback.extract_tb(error.__traceback__)
    frames = [f for f in frames if not f.filename.startswith("<frozen ")] or frames
    if not frames:
        return None, 0
    own = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(origin)]
    frame = (own or frames)[-1]
    return frame.filename, frame.lineno or 0


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def program_of(module: types.ModuleType, target: str) -> Program:
    """The module's Program; with several, the one named ``program``; with none, its problems';
    with no problems either, what its zero-argument ``-> Program`` function returns."""
    programs = _unique(v for v in vars(module).values() if isinstance(v, Program))
    if len(programs) == 1:
        return programs[0]
    if programs:
        named = vars(module).get("program")
        if isinstance(named, Program):
            return named
        raise LoadError(_many_programs(module, target))
    problems = problems_in(module)
    if not problems:
        factory = _default_factory(module)
        if factory is not None:
            return program_named(module, target, factory)
        raise LoadError(NO_PROBLEMS.format(target=target, fix=_no_problems_fix(module)))
    return Program(problems)


def _default_factory(module: types.ModuleType) -> str | None:
    """A module with no Program nor problems at module level may offer one function that takes
    no arguments and returns a Program (``def demo() -> Program``); with several, the one named
    ``program`` or ``demo``. It is called."""
    factories = [name for name, fn in vars(module).items()
                 if _returns_program(fn, module) and _takes_no_arguments(fn)]
    if len(factories) == 1:
        return factories[0]
    return next((name for name in ("program", "demo") if name in factories), None)


def _no_problems_fix(module: types.ModuleType) -> str:
    """Point at the module's functions annotated ``-> Program``, if there are any."""
    factories = [name for name, fn in vars(module).items() if _returns_program(fn, module)]
    if not factories:
        return NO_PROBLEMS_FIX
    return FACTORY_FIX.format(factories=", ".join(f"{f}()" for f in factories), example=factories[0])


def _returns_program(value: object, module: types.ModuleType) -> bool:
    if not isinstance(value, types.FunctionType) or value.__module__ != module.__name__:
        return False
    annotation = value.__annotations__.get("return")
    return annotation is Program or annotation in ("Program", "mlodsl.Program")


def _many_programs(module: types.ModuleType, target: str) -> str:
    names = [k for k, v in vars(module).items() if isinstance(v, Program)]
    return MANY_PROGRAMS.format(target=target, count=len(names), names=", ".join(names),
                                example=f"mlodsl graph {target}:{names[0]}")


def problems_in(module: types.ModuleType) -> list[Problem]:
    """Problems at module level, in definition order; also inside module-level lists, tuples
    and dict values (programs built in a loop)."""
    found: list[Problem] = []
    for value in vars(module).values():
        if isinstance(value, Problem):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, Problem))
        elif isinstance(value, dict):
            found.extend(v for v in value.values() if isinstance(v, Problem))
    return _unique(found)


def program_named(module: types.ModuleType, target: str, name: str) -> Program:
    """``FILE:NAME``: a Program, a problem, or a list/tuple/dict of problems at module level;
    or a function that takes no arguments and returns one of those (it is called)."""
    value = vars(module).get(name)
    if isinstance(value, types.FunctionType) and _takes_no_arguments(value):
        with _user_import(None, f"{target}:{name}()", value.__code__.co_filename):
            value = value()
    if isinstance(value, Program):
        return value
    if isinstance(value, Problem):
        return Program([value])
    items = list(value.values()) if isinstance(value, dict) else value
    if isinstance(items, (list, tuple)) and items and all(isinstance(v, Problem) for v in items):
        return Program(list(items))
    choices = [k for k, v in vars(module).items() if isinstance(v, (Program, Problem))]
    raise LoadError(NO_SUCH_NAME.format(target=target, name=name,
                                        names=", ".join(choices) or "(none)"))


def _takes_no_arguments(fn: types.FunctionType) -> bool:
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    return True


def _unique(values: Iterable[T]) -> list[T]:
    """Values in order, each object once (identity, not equality)."""
    seen: set[int] = set()
    out: list[T] = []
    for v in values:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out
