# make demo: compile the bundled default spec for 4 ranks (a 2x2 mesh: data parallel across, tensor parallel
# within), draw the plan, run 12 steps saving checkpoints, resume to step 20 with --check, export the model.
# make test: the whole test suite (unit, golden, multi-rank). Both set up .venv when missing.
# make docs: regenerate docs/spec-reference.md from the schema.
PY      := .venv/bin/python
STAMP   := .venv/.ultraplan-installed
DEMO    := out/demo

.PHONY: demo test lint golden setup clean docs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@bash tools/setup.sh
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ultraplan stats dense-tiny
	$(PY) -m ultraplan compile dense-tiny --mesh 2x2 --strategy dp,tp -o $(DEMO)
	$(PY) -m ultraplan viz $(DEMO)/plan.json -o $(DEMO)/plan.svg
	rm -rf $(DEMO)/checkpoint
	$(PY) -m ultraplan run $(DEMO) --steps 12 --checkpoint-dir $(DEMO)/checkpoint --checkpoint-every 6
	$(PY) -m ultraplan run $(DEMO) --steps 20 --checkpoint-dir $(DEMO)/checkpoint --resume --check
	$(PY) -m ultraplan export $(DEMO)/checkpoint -o $(DEMO)/model.safetensors

test: $(STAMP)
	$(PY) -m ruff check . tests/dist  # ruff skips folders named dist unless named
	$(PY) -m pytest -q

docs: $(STAMP)
	$(PY) tools/gen_spec_reference.py

golden: $(STAMP)
	$(PY) tools/regen_golden.py

clean:
	rm -rf out .pytest_cache .ruff_cache
