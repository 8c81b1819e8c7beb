"""ultraplan.compiler: spec loading, validation, the eager reference model and lowering to torch.fx.

Knows nothing of plans or devices (see docs/architecture.md)."""
