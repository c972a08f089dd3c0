"""What a task function accepts, worked out once per task, so that enqueue refuses
arguments the function could never be called with (as Celery's argument check does):
such a job would fail with ``TypeError`` at every attempt and end dead.

The signature checked is the function's own, as Python binds the call the runner
makes (``task.fn(*args, **kwargs)``): not the one a ``functools.wraps`` decorator
copies from the function it wraps (``follow_wrapped=False``), since such a decorator
may supply some of its arguments itself. A function taking ``*args`` / ``**kwargs``
accepts what they accept.

Enqueue is a hot path: ``inspect.Signature.bind`` costs microseconds, so ``Arguments``
keeps counts and names that decide a call in a few comparisons. ``bind`` runs only
to word the error, or for a signature those do not describe.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True, slots=True, kw_only=True)
class Arguments:
    """The arguments a function accepts. ``signature`` None: unknown, all are accepted."""

    signature: inspect.Signature | None
    positional: tuple[str, ...] = ()
    """Names of the parameters that take a positional argument, in order."""
    positional_only: int = 0
    """How many of them (the first) cannot be given by keyword."""
    required: int = 0
    """How many of them (the first) have no default."""
    most: int = sys.maxsize
    """The most positional arguments (``sys.maxsize`` with ``*args``)."""
    by_keyword: Mapping[str, int] = field(default_factory=dict)
    """Positional-or-keyword parameters: name to position."""
    keyword_only: frozenset[str] = frozenset()
    required_keywords: frozenset[str] = frozenset()
    any_keyword: bool = True
    """Whether it takes ``**kwargs``."""
    regular: bool = False
    """Whether the fields above decide every call (else ``signature.bind`` does)."""
    fewest: int = 0
    """The fewest positional arguments a call without keywords binds with: for the
    common case, ``fewest <= len(args) <= most`` alone says it binds."""

    @classmethod
    def of(cls, fn: Callable[..., object]) -> Arguments:
        try:
            signature = inspect.signature(fn, follow_wrapped=False)
        except (TypeError, ValueError):  # no signature to read: leave it to the call
            return cls(signature=None)
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in _POSITIONAL]
        required = sum(1 for p in positional if p.default is _EMPTY)
        keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        kinds = {p.kind for p in params}
        # Python puts the parameters without a default first; a __signature__ may not.
        regular = all(p.default is _EMPTY for p in positional[:required])
        required_keywords = frozenset(p.name for p in keyword_only if p.default is _EMPTY)
        return cls(
            signature=signature,
            positional=tuple(p.name for p in positional),
            positional_only=sum(
                1 for p in positional if p.kind is inspect.Parameter.POSITIONAL_ONLY
            ),
            required=required,
            most=sys.maxsize if inspect.Parameter.VAR_POSITIONAL in kinds else len(positional),
            by_keyword={
                p.name: i
                for i, p in enumerate(positional)
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            },
            keyword_only=frozenset(p.name for p in keyword_only),
            required_keywords=required_keywords,
            any_keyword=inspect.Parameter.VAR_KEYWORD in kinds,
            regular=regular,
            fewest=required if regular and not required_keywords else sys.maxsize,
        )

    def accepts(self, args: Sequence[object], kwargs: Mapping[str, object]) -> bool:
        """Whether a call with these arguments binds (only for a ``regular`` signature)."""
        n = len(args)
        if n > self.most:
            return False
        if not kwargs:  # the common case
            return n >= self.required and not self.required_keywords
        for name in kwargs:
            i = self.by_keyword.get(name)
            if i is not None:
                if i < n:  # given twice
                    return False
            elif name not in self.keyword_only and not self.any_keyword:
                return False
        for i in range(n, self.required):  # required, not given by position
            if i < self.positional_only or self.positional[i] not in kwargs:
                return False
        return not self.required_keywords or self.required_keywords <= kwargs.keys()

    def check(
        self, task: str, args: Sequence[object], kwargs: Mapping[str, object], *, note: str = ""
    ) -> None:
        """Raise ``TypeError`` naming ``task`` and the problem when ``fn(*args, **kwargs)``
        would not bind; ``note`` says where arguments the caller did not give came from."""
        if not kwargs and self.fewest <= len(args) <= self.most:
            return
        if self.signature is None or (self.regular and self.accepts(args, kwargs)):
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"task {task!r} cannot take these arguments: {error}{note}") from None
