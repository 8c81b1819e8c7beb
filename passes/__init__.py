"""ultraplan.passes: the symbolic cost model, SBP types, the planning passes and the Plan.

Each pass is ``(gm, ctx) -> PassReport`` and writes its analysis into ``node.meta`` under
``ultraplan.*``; ``pipeline.py`` lists them in order. Passes know nothing of code text.
"""
