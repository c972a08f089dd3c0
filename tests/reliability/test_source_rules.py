"""The package source never uses pickle/marshal/shelve, eval/exec, or SQL built from values.

An ``ast`` walk over every module of ``asyncjobs``. The SQL rule: the SQL argument of
an execute-style call (``execute``, ``executemany``, ``executescript``, ``fetch``,
``fetchrow``, ``fetchval``, ``prepare``, ``cursor``) must be *static*:

- a string literal, or an f-string / ``+`` / ``%`` / ``.format`` / ``.join`` whose every
  part is static;
- a module-level UPPER_CASE name whose value is itself built only from literals (so
  ``_SELECT = ", ".join(COLUMNS)`` and ``_FINISH_SQL[kind]`` are fine), defined in the
  module or imported from a module of the package where it is one
  (``from asyncjobs.stores._statuses import DEAD_AS_READ``);
- a local variable whose every assignment, ``+=``, ``.append``/``.extend``, loop target
  and tuple-unpacked function return is static (so a ``where`` list of constant terms
  with ``?``/``$n`` placeholders joined by `` AND `` is fine);
- ``int(...)``/``float(...)``/``len(...)`` (digits cannot inject);
- a parameter named in a helper that itself passes it to ``execute``: then every call of
  that helper (directly, or handed to a forwarding call such as ``self._call(helper, sql,
  params)``) must pass a static value there;
- or an expression listed in ``ALLOWED`` below, with the reason it is safe.

Lambdas and nested functions are checked too (``self._run("list", lambda conn:
conn.fetch(sql, *params))``); a name they do not bind is looked up in the function
around them, then in the module.

Values always travel as parameters (``?`` or ``$1``). The walker is unit-tested on bad
snippets at the bottom, so this test can fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "asyncjobs"

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
SQL_METHODS = {
    "execute", "executemany", "executescript", "fetch", "fetchrow", "fetchval",
    "prepare", "cursor", "mogrify",
}  # fmt: skip
NUMERIC_CALLS = {"int", "float", "len", "round"}
UPPER = re.compile(r"^_*[A-Z][A-Z0-9_]*$")

ALLOWED: dict[tuple[str, str, str], str] = {
    # (file relative to the package, enclosing function, ast.unparse of the expression)
    ("stores/_sqlite_schema.py", "migrate", "statement"): (
        "statements come from the migration .sql files shipped inside the package"
    ),
    (
        "stores/_sqlite_sql.py",
        "insert_jobs",
        "[row] * len(chunk)",
    ): "constant text and one constant '(?, ...)' group per row; values are parameters",
    (
        "stores/_sqlite_finish.py",
        "_finish",
        "[_FINISH_SUCCEEDED_ROW] * len(chunk)",
    ): "one constant '(?, ...)' group per outcome; the outcomes are parameters",
    ("stores/_sqlite.py", "get", "_SELECT"): (
        "imported from stores/_sqlite_sql.py, where it is the constant join of COLUMNS"
    ),
    ("stores/_sqlite.py", "list", "_SELECT"): (
        "imported from stores/_sqlite_sql.py, where it is the constant join of COLUMNS"
    ),
    ("stores/_postgres.py", "get", "SELECT"): (
        "imported from stores/_postgres_sql.py, where it is the constant join of COLUMNS"
    ),
    ("stores/_postgres.py", "list", "SELECT"): (
        "imported from stores/_postgres_sql.py, where it is the constant join of COLUMNS"
    ),
    ("stores/_postgres_schema.py", "migrate", "script"): (
        "scripts come from the migration .sql files shipped inside the package"
    ),
    ("stores/_postgres_enqueue.py", "_insert_sql", "table"): (
        "an identifier, not a value: the constant default of insert_jobs, or the schema from "
        "current_schema() quoted with doubled double quotes by PostgresStore.insert_with"
    ),
    ("stores/_postgres_enqueue.py", "insert_jobs", "table"): (
        "as above: insert_jobs(table=...) is only given a quoted identifier"
    ),
    ("stores/_postgres_limits.py", "_heads", "where"): (
        "tests of a row built by _first_pages and _next_page: constant text but for their "
        "$n parameter numbers (len(params)); the values are parameters"
    ),
    ("stores/_postgres_limits.py", "_heads", "queues"): (
        "the array of queues of _first_pages and _next_page: '$n::text[]', constant text but "
        "for its parameter number (len(params)); the queues are a parameter"
    ),
}


@dataclass
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class _Scope:
    """A function (or the module) being checked, with its local definitions."""

    node: ast.AST
    name: str
    params: set[str] = field(default_factory=set)
    parent: _Scope | None = None  # the function a lambda or nested function is in


class SourceChecker:
    """Check one module's source text against the rules above."""

    def __init__(self, source: str, path: str = "<snippet>") -> None:
        self.path = path
        self.tree = ast.parse(source)
        self.findings: list[Finding] = []
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self.module_values: dict[str, list[ast.expr]] = {}
        self.sinks: dict[str, set[int]] = {}  # function name -> parameter indexes holding SQL
        self._collect_module()

    # -- collection ------------------------------------------------------------------

    def _collect_module(self) -> None:
        for stmt in self.tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions[stmt.name] = stmt
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        self.module_values.setdefault(target.id, []).append(stmt.value)
            elif (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.value is not None
            ):
                self.module_values.setdefault(stmt.target.id, []).append(stmt.value)
        rebound = {
            name
            for node in ast.walk(self.tree)
            if isinstance(node, ast.Global | ast.Nonlocal)
            for name in node.names
        }
        for name in rebound:
            self.module_values.pop(name, None)

    # -- static values ---------------------------------------------------------------

    def _module_constant(self, name: str, seen: frozenset[str]) -> bool:
        values = self.module_values.get(name)
        if not values or not UPPER.match(name) or name in seen:
            return False
        module = _Scope(self.tree, "<module>")
        return all(self._static(v, module, seen | {name}) for v in values)

    def _static(self, node: ast.expr, scope: _Scope, seen: frozenset[str] = frozenset()) -> bool:
        """True if ``node`` can only evaluate to text fixed in the source."""
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | int | float | bool | type(None))
        if isinstance(node, ast.JoinedStr):
            return all(self._static(v, scope, seen) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            spec_ok = node.format_spec is None or self._static(node.format_spec, scope, seen)
            return spec_ok and self._static(node.value, scope, seen)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
            return self._static(node.left, scope, seen) and self._static(node.right, scope, seen)
        if isinstance(node, ast.IfExp):
            return self._static(node.body, scope, seen) and self._static(node.orelse, scope, seen)
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return all(self._static(e, scope, seen) for e in node.elts)
        if isinstance(node, ast.Dict):
            return all(self._static(v, scope, seen) for v in node.values)
        if isinstance(node, ast.Subscript):
            # an element of a static container is static, whatever the index
            return self._static(node.value, scope, seen)
        if isinstance(node, ast.ListComp | ast.GeneratorExp | ast.SetComp):
            # names bound by iterating something static are static
            bound = frozenset(
                f"static:{n.id}"
                for gen in node.generators
                if self._static(gen.iter, scope, seen)
                for n in ast.walk(gen.target)
                if isinstance(n, ast.Name)
            )
            return self._static(node.elt, scope, seen | bound)
        if isinstance(node, ast.Call):
            return self._static_call(node, scope, seen)
        if isinstance(node, ast.Name):
            return self._static_name(node.id, scope, seen)
        return self._allowed(node, scope)

    def _static_call(self, node: ast.Call, scope: _Scope, seen: frozenset[str]) -> bool:
        func = node.func
        args_ok = all(self._static(a, scope, seen) for a in node.args) and all(
            self._static(k.value, scope, seen) for k in node.keywords
        )
        if isinstance(func, ast.Name) and func.id in NUMERIC_CALLS:
            return True
        if isinstance(func, ast.Name) and func.id in self.functions:
            # a module function whose every return is static (and whose parameters that
            # reach the result are static, by the same rules, inside it)
            return self.returns_static(func.id, None, seen)
        if isinstance(func, ast.Attribute) and func.attr in ("join", "format", "upper", "lower"):
            return self._static(func.value, scope, seen) and args_ok
        return self._allowed(node, scope)

    def _static_name(self, name: str, scope: _Scope, seen: frozenset[str]) -> bool:
        if f"static:{name}" in seen:
            return True
        if isinstance(scope.node, ast.Module) or name not in _local_names(scope.node):
            if scope.parent is not None:  # a free name of a lambda or nested function
                return self._static_name(name, scope.parent, seen)
            return (
                self._module_constant(name, seen)
                or self._imported_constant(name)
                or self._allowed_name(name, scope)
            )
        if name in scope.params:
            return self._allowed_name(name, scope)
        key = f"{scope.name}.{name}"
        if key in seen:
            return True  # a cycle (x = x + "..."): decided by the other definitions
        defs = list(_definitions(scope.node, name, self))
        if not defs:
            return self._allowed_name(name, scope)
        return all(
            d is not None and self._static(d, scope, seen | {key}) for d in defs
        ) or self._allowed_name(name, scope)

    def _imported_constant(self, name: str) -> bool:
        """``name`` comes from ``from asyncjobs.<module> import NAME`` at the top of this
        module, and is a module constant of that module by the same rules."""
        for stmt in self.tree.body:
            if not isinstance(stmt, ast.ImportFrom) or stmt.level or stmt.module is None:
                continue
            parts = stmt.module.split(".")
            for alias in stmt.names:
                if (alias.asname or alias.name) != name or parts[0] != "asyncjobs":
                    continue
                source = PACKAGE.joinpath(*parts[1:])
                path = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
                if not path.is_file():
                    return False
                rel = path.relative_to(PACKAGE).as_posix()
                other = SourceChecker(path.read_text("utf-8"), rel)
                return other._module_constant(alias.name, frozenset())
        return False

    def _allowed(self, node: ast.expr, scope: _Scope) -> bool:
        return (self.path, scope.name, ast.unparse(node)) in ALLOWED

    def _allowed_name(self, name: str, scope: _Scope) -> bool:
        return (self.path, scope.name, name) in ALLOWED

    def returns_static(self, fn_name: str, index: int | None, seen: frozenset[str]) -> bool:
        """Every ``return`` of module function ``fn_name`` is static (with ``index``: gives a
        tuple whose item ``index`` is static)."""
        fn = self.functions.get(fn_name)
        if fn is None or f"returns:{fn_name}" in seen:
            return False
        scope = _Scope(fn, fn.name, _param_names(fn))
        returns = [n for n in _own_nodes(fn) if isinstance(n, ast.Return)]
        if not returns:
            return False
        for ret in returns:
            value = ret.value
            if index is not None:
                if not isinstance(value, ast.Tuple) or len(value.elts) <= index:
                    return False
                value = value.elts[index]
            if value is None or not self._static(value, scope, seen | {f"returns:{fn_name}"}):
                return False
        return True

    # -- the checks ------------------------------------------------------------------

    def run(self) -> list[Finding]:
        self._check_imports_and_calls()
        self._find_sinks()
        self._check_sql()
        return self.findings

    def _flag(self, node: ast.AST, message: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), message))

    def _check_imports_and_calls(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                        self._flag(node, f"imports {alias.name} (JSON only)")
            elif isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[0]
                if module in FORBIDDEN_MODULES:
                    self._flag(node, f"imports from {node.module} (JSON only)")
                if module == "builtins" and any(a.name in FORBIDDEN_CALLS for a in node.names):
                    self._flag(node, "imports eval/exec from builtins")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else None
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    if func.value.id in ("builtins", "__builtins__"):
                        name = func.attr
                    if func.value.id in FORBIDDEN_MODULES:
                        self._flag(node, f"calls {func.value.id}.{func.attr}")
                if name in FORBIDDEN_CALLS:
                    self._flag(node, f"calls {name}()")
                if name == "import_module" or (
                    isinstance(func, ast.Attribute) and func.attr == "import_module"
                ):
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and str(arg.value) in FORBIDDEN_MODULES:
                            self._flag(node, f"imports {arg.value!r} dynamically")
            elif isinstance(node, ast.Name) and node.id in FORBIDDEN_MODULES:
                self._flag(node, f"uses {node.id}")

    def _functions(
        self, node: ast.AST | None = None, parent: _Scope | None = None
    ) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, _Scope]]:
        """Every function and lambda, each with the function it is nested in."""
        for child in ast.iter_child_nodes(self.tree if node is None else node):
            scope = parent
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                name = child.name if not isinstance(child, ast.Lambda) else "<lambda>"
                if parent is not None and isinstance(child, ast.Lambda):
                    name = f"{parent.name}.<lambda>"
                scope = _Scope(child, name, _param_names(child), parent)
                yield child, scope
            yield from self._functions(child, scope)

    def _sql_calls(self, fn: ast.AST) -> Iterator[tuple[ast.Call, ast.expr]]:
        for node in _own_nodes(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_METHODS
            ):
                sql = node.args[0] if node.args else None
                for kw in node.keywords:
                    if kw.arg in ("sql", "query", "sql_script"):
                        sql = kw.value
                if sql is not None and not isinstance(sql, ast.Starred):
                    yield node, sql

    def _find_sinks(self) -> None:
        """Module functions that pass one of their own parameters to execute()."""
        for fn, _ in self._functions():
            if isinstance(fn, ast.Lambda) or self.functions.get(fn.name) is not fn:
                continue
            positional = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
            for _, sql in self._sql_calls(fn):
                if isinstance(sql, ast.Name) and sql.id in positional:
                    self.sinks.setdefault(fn.name, set()).add(positional.index(sql.id))

    def _check_sql(self) -> None:
        module = _Scope(self.tree, "<module>")
        for fn, scope in [*self._functions(), (self.tree, module)]:
            sink_params = {
                p
                for i, p in enumerate(_positional(fn))
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                and i in self.sinks.get(fn.name, set())
            }
            for call, sql in self._sql_calls(fn):
                if isinstance(sql, ast.Name) and sql.id in sink_params:
                    continue  # checked at every call site of this helper
                if not self._static(sql, scope):
                    self._flag(call, f"SQL built at run time: {ast.unparse(sql)[:80]}")
            for node in _own_nodes(fn):
                if isinstance(node, ast.Call):
                    self._check_sink_call(node, scope)

    def _check_sink_call(self, call: ast.Call, scope: _Scope) -> None:
        """A call of a sink helper, direct or forwarded (``self._call(helper, sql, ...)``)."""
        args = call.args
        targets: list[tuple[str, list[ast.expr], int]] = []
        if isinstance(call.func, ast.Name) and call.func.id in self.sinks:
            targets.append((call.func.id, list(args), 0))
        for i, arg in enumerate(args):
            if isinstance(arg, ast.Name) and arg.id in self.sinks:
                # forwarded: the callee supplies the connection as the first parameter
                targets.append((arg.id, list(args[i + 1 :]), 1))
        for name, given, offset in targets:
            fn = self.functions[name]
            params = _positional(fn)
            for index in self.sinks[name]:
                position = index - offset
                value: ast.expr | None = None
                if 0 <= position < len(given) and not any(
                    isinstance(a, ast.Starred) for a in given[: position + 1]
                ):
                    value = given[position]
                for kw in call.keywords:
                    if kw.arg == params[index]:
                        value = kw.value
                if value is not None and not self._static(value, scope):
                    self._flag(
                        call, f"SQL built at run time passed to {name}(): {ast.unparse(value)[:80]}"
                    )


# -- scope helpers ---------------------------------------------------------------------


def _param_names(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    a = fn.args
    names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
    names |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    return names


def _positional(fn: ast.AST) -> list[str]:
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return []
    return [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``fn``'s body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))


def _local_names(fn: ast.AST) -> set[str]:
    names = (
        _param_names(fn)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        else set()
    )
    for node in _own_nodes(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _definitions(fn: ast.AST, name: str, checker: SourceChecker) -> Iterator[ast.expr | None]:
    """Every value ``name`` gets in ``fn``; None for one the walker cannot see through."""
    for node in _own_nodes(fn):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name:
                    yield value
                elif isinstance(target, ast.Tuple | ast.List):
                    for i, elt in enumerate(target.elts):
                        if isinstance(elt, ast.Name) and elt.id == name:
                            yield _unpacked(value, i, checker)
        elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
            if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.target)):
                yield node.iter
        elif isinstance(node, ast.NamedExpr) and node.target.id == name:
            yield node.value
        elif isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                if item.optional_vars is not None and any(
                    isinstance(n, ast.Name) and n.id == name for n in ast.walk(item.optional_vars)
                ):
                    yield None
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == name
            and node.func.attr in ("append", "extend", "insert", "add", "update")
        ):
            yield from node.args[-1:]


def _unpacked(value: ast.expr | None, index: int, checker: SourceChecker) -> ast.expr | None:
    if isinstance(value, ast.Tuple | ast.List) and index < len(value.elts):
        return value.elts[index]
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and checker.returns_static(value.func.id, index, frozenset())
    ):
        return ast.Constant("")  # the function returns a static item there
    return None


def check_source(source: str, path: str = "<snippet>") -> list[Finding]:
    return SourceChecker(source, path).run()


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# -- the rule over the real package -------------------------------------------------


def test_the_package_has_modules_to_check() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in package_modules()}
    assert {"_jobs.py", "_runner.py", "stores/_sqlite.py", "stores/_sqlite_sql.py"} <= names


@pytest.mark.parametrize(
    "module", package_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix()
)
def test_module_has_no_pickle_eval_or_runtime_sql(module: Path) -> None:
    rel = module.relative_to(PACKAGE).as_posix()
    findings = check_source(module.read_text("utf-8"), rel)
    assert findings == [], "\n".join(map(str, findings))


def test_every_allow_list_entry_is_still_needed() -> None:
    """A stale allow-list entry would silently widen the rule: each must match a node."""
    for path, function, expr in ALLOWED:
        source = (PACKAGE / path).read_text("utf-8")
        tree = ast.parse(source)
        found = any(
            isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            and fn.name == function
            # ast.walk: an entry may name a free variable of a lambda inside the function
            and any(isinstance(n, ast.expr) and ast.unparse(n) == expr for n in ast.walk(fn))
            for fn in ast.walk(tree)
        )
        assert found, f"ALLOWED entry {(path, function, expr)} matches nothing; remove it"


# -- the walker itself: it must catch the bad and pass the good ----------------------

BAD = {
    "import pickle": "import pickle\n",
    "from pickle": "from pickle import loads\n",
    "marshal": "import marshal as m\n",
    "shelve": "import shelve\n",
    "dynamic import": "import importlib\nimportlib.import_module('pickle')\n",
    "eval": "def f(x):\n    return eval(x)\n",
    "exec": "exec('1')\n",
    "builtins.exec": "import builtins\nbuiltins.exec('1')\n",
    "f-string param": "def f(db, name):\n    db.execute(f'SELECT * FROM t WHERE n = {name}')\n",
    "concat param": "def f(db, name):\n    db.execute('SELECT * FROM t WHERE n = ' + name)\n",
    "percent": "def f(db, name):\n    db.execute('SELECT %s' % name)\n",
    "format": "def f(db, name):\n    db.execute('SELECT {}'.format(name))\n",
    "str() is not numeric": "def f(db, n):\n    db.execute(f'SELECT {str(n)}')\n",
    "local from param": (
        "def f(db, name):\n    sql = 'SELECT 1'\n    sql += ' WHERE n = ' + name\n"
        "    db.execute(sql)\n"
    ),
    "list of tainted terms": (
        "def f(db, name):\n    where = ['a = ?']\n    where.append(f'b = {name}')\n"
        "    db.execute('SELECT 1 WHERE ' + ' AND '.join(where))\n"
    ),
    "lowercase module value": (
        "table = input()\ndef f(db):\n    db.execute(f'SELECT * FROM {table}')\n"
    ),
    "module name from a call": (
        "import os\nTABLE = os.environ['T']\ndef f(db):\n    db.execute(f'SELECT * FROM {TABLE}')\n"
    ),
    "asyncpg fetch": "async def f(conn, q):\n    await conn.fetch(f'SELECT {q}')\n",
    "sink helper called with a value": (
        "def _rows(db, sql, params):\n    return db.execute(sql, params)\n"
        "async def g(self, name):\n    await self._call(_rows, f'SELECT {name}', ())\n"
    ),
    "sink helper called directly": (
        "def _rows(db, sql):\n    return db.execute(sql)\n"
        "def g(db, name):\n    _rows(db, 'SELECT ' + name)\n"
    ),
    "tuple-unpacked tainted return": (
        "def filt(x):\n    return [f'a = {x}'], []\n"
        "def f(db, x):\n    where, params = filt(x)\n    db.execute(' AND '.join(where), params)\n"
    ),
    "attribute": "def f(self, db):\n    db.execute(f'PRAGMA x={self.mode}')\n",
    "helper returning a value": (
        "def sql_for(name):\n    return f'SELECT * FROM t WHERE n = {name}'\n"
        "def f(db, name):\n    db.execute(sql_for(name))\n"
    ),
    "lambda with a value": (
        "async def g(self, name):\n"
        "    await self._run('x', lambda conn: conn.fetch(f'SELECT {name}'))\n"
    ),
    "lambda with a tainted local of its function": (
        "async def g(self, name):\n    sql = 'SELECT ' + name\n"
        "    await self._run('x', lambda conn: conn.fetch(sql))\n"
    ),
    "imported name that is not a constant": (
        "from asyncjobs._models import FINISHED\n"
        "def f(db):\n    db.execute(f'SELECT 1 WHERE status IN {FINISHED}')\n"
    ),
    "imported lowercase name": (
        "from asyncjobs._models import new_job_id\n"
        "def f(db):\n    db.execute(f'SELECT {new_job_id}')\n"
    ),
    "imported from outside the package": (
        "from os import SEEK_END\ndef f(db):\n    db.execute(f'SELECT {SEEK_END}')\n"
    ),
    "nested function with a parameter of its function": (
        "def g(self, name):\n    async def inner(conn):\n"
        "        return await conn.fetch('SELECT ' + name)\n    return inner\n"
    ),
}

GOOD = {
    "lambda with a static local of its function": (
        "async def g(self, q):\n    sql = 'SELECT 1 WHERE a = $1'\n"
        "    await self._run('x', lambda conn: conn.fetch(sql, q))\n"
    ),
    "literal with params": "def f(db, x):\n    db.execute('SELECT * FROM t WHERE a = ?', (x,))\n",
    "module constants": (
        "COLUMNS = ('a', 'b')\n_SELECT = ', '.join(COLUMNS)\n"
        "def f(db, x):\n    db.execute(f'SELECT {_SELECT} FROM t WHERE a = $1', x)\n"
    ),
    "constant dict item": (
        "_SQL = {'a': 'x = 1', 'b': 'x = 2'}\n"
        "def f(db, kind):\n    db.execute(f'UPDATE t SET {_SQL[kind]}')\n"
    ),
    "where list of constant terms": (
        "def f(db, q, t):\n    where, params = [], []\n"
        "    if q is not None:\n        where.append('queue = ?')\n        params.append(q)\n"
        "    sql = 'SELECT 1'\n    if where:\n        sql += ' WHERE ' + ' AND '.join(where)\n"
        "    db.execute(sql, params)\n"
    ),
    "constant imported from a module of the package": (
        "from asyncjobs.stores._statuses import DEAD_AS_READ as DEAD\n"
        "def f(db, x):\n    db.execute(f'SELECT 1 FROM t WHERE {DEAD} AND a = $1', x)\n"
    ),
    "numeric": "def f(db, t):\n    db.execute(f'PRAGMA busy_timeout={int(t * 1000)}')\n",
    "sink helper with constants": (
        "def _rows(db, sql, params):\n    return db.execute(sql, params)\n"
        "async def g(self, x):\n    await self._call(_rows, 'SELECT 1 WHERE a = ?', (x,))\n"
    ),
    "placeholders from a comprehension": (
        "COLS = ('a', 'b')\n"
        "def f(db, v):\n    db.execute('UPDATE t SET ' + ', '.join(f'{c} = ?' for c in COLS), v)\n"
    ),
    "helper returning constants": (
        "def sql_for(kind):\n    if kind:\n        return 'SELECT 1'\n    return 'SELECT 2'\n"
        "def f(db, kind):\n    db.execute(sql_for(kind))\n"
    ),
    "static tuple-unpacked return": (
        "def filt(x):\n    if x:\n        return ['a = ?'], [x]\n    return [], []\n"
        "def f(db, x):\n    where, params = filt(x)\n    db.execute(' AND '.join(where), params)\n"
    ),
}


@pytest.mark.parametrize("snippet", BAD.values(), ids=list(BAD))
def test_walker_flags_bad_snippet(snippet: str) -> None:
    assert check_source(snippet) != []


@pytest.mark.parametrize("snippet", GOOD.values(), ids=list(GOOD))
def test_walker_accepts_safe_snippet(snippet: str) -> None:
    assert check_source(snippet) == []


STORE_MUTATIONS = {
    # name: (module of a store, original text, planted text)
    "value in a where term": (
        "stores/_sqlite.py",
        'where.append("queue = ?")',
        'where.append(f"queue = {queue}")',
    ),
    "value in a helper's return": (
        "stores/_sqlite.py",
        'return ["status = ?"], [str(status)]',
        'return [f"status = {status}"], []',
    ),
    "value concatenated": (
        "stores/_sqlite.py",
        'where.append("finished_at < ?")',
        'where.append("finished_at < " + str(older_than))',
    ),
    "value in an f-string fragment": (
        "stores/_sqlite_claim.py",
        "picks.append(_PICK_QUEUE)",
        """picks.append(f"{_PICK_QUEUE} AND j.queue = '{queue}'")""",
    ),
    "value in a forwarded helper call": (
        "stores/_sqlite.py",
        'f"SELECT {_SELECT} FROM asyncjobs_jobs WHERE id = ?"',
        'f"SELECT {_SELECT} FROM asyncjobs_jobs WHERE id = {job_id}"',
    ),
    "value in a lambda's query (PostgreSQL)": (
        "stores/_postgres.py",
        'f"SELECT {SELECT} FROM asyncjobs_jobs WHERE id = $1"',
        'f"SELECT {SELECT} FROM asyncjobs_jobs WHERE id = {job_id}"',
    ),
    "value in a where term of a lambda's query (PostgreSQL)": (
        "stores/_postgres.py",
        'where.append(f"queue = ${len(params)}")',
        'where.append(f"queue = {queue}")',
    ),
    "value in a purge term (PostgreSQL)": (
        "stores/_postgres.py",
        'where.append(f"finished_at < ${len(params)}")',
        'where.append(f"finished_at < {older_than}")',
    ),
}


@pytest.mark.parametrize("mutation", STORE_MUTATIONS.values(), ids=list(STORE_MUTATIONS))
def test_walker_catches_an_injection_planted_in_a_real_store(
    mutation: tuple[str, str, str],
) -> None:
    path, original, planted = mutation
    source = (PACKAGE / path).read_text("utf-8")
    assert original in source, "the store changed; update this mutation"
    assert check_source(source.replace(original, planted), path) != []
