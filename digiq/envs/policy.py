"""How a policy plugs in: the :class:`Policy` protocol, the registry of named policies and :class:`PolicySpec`.

A policy maps a :class:`~digiq.envs.view.StepView` to one :class:`~digiq.schema.Action`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from digiq.envs.view import StepView
from digiq.errors import DigiqError
from digiq.schema import Action


@runtime_checkable
class Policy(Protocol):
    """Anything with ``reset(seed)`` (called before each episode) and ``act(view) -> Action``."""

    def reset(self, seed: int) -> None: ...

    def act(self, view: StepView) -> Action: ...


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make ``name`` usable in ``digiq rollout --policy NAME`` (and in rollout workers)."""
    _REGISTRY[name] = factory


@dataclass(frozen=True)
class PolicySpec:
    """A picklable recipe for a policy: a registered name or ``package.module:factory``, plus kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Policy:
        factory = _resolve(self.name)
        policy = factory(**self.kwargs)
        if not isinstance(policy, Policy):
            raise DigiqError(f"'{self.name}' did not build a policy (needs reset(seed) and act(view))", field="policy")
        return policy


def _resolve(name: str) -> PolicyFactory:
    _register_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise DigiqError(f"cannot load policy factory '{name}' ({exc})", field="policy") from None
    known = ", ".join(sorted(_REGISTRY))
    raise DigiqError(f"unknown policy '{name}' (known: {known}; or give package.module:factory)", field="policy")


def _register_builtin() -> None:
    if "behavior" not in _REGISTRY:
        from digiq.envs.behavior import BehaviorPolicy

        register_policy("behavior", BehaviorPolicy)
