"""ultraplan: a declarative model compiler (YAML -> torch.fx -> SBP plan -> torch.distributed program).

Public API: ``load`` a spec, ``plan`` it for a mesh, ``compile`` it into a runnable directory.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile", "load", "load_hardware", "plan"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``ultraplan.load`` and friends import the planner (and torch) on first use, not on ``import
    ultraplan``: the CLI's help, ``fields`` and spec errors answer without torch (PEP 562)."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ultraplan' has no attribute {name!r}")
