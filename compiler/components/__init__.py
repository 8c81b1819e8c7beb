"""Eager reference modules, one file per component kind.

Every module computes through ``ultraplan.compiler.ops`` (so lowering sees one fx node per op)
and labels its intermediate values with ``named`` (so nodes read ``layers_0_attention_q``).
Each module lists its parameters' init rules; ``build`` gathers them by canonical name.
"""
