"""ultraplan: a declarative model compiler (YAML -> torch.fx -> SBP plan -> torch.distributed program).

Public API: ``load`` a spec, ``plan`` it for a mesh, ``compile`` it into a runnable directory.
"""

from .api import compile, load, load_hardware, plan

__all__ = ["compile", "load", "load_hardware", "plan"]
__version__ = "0.1.0"
