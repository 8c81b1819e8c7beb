# make demo: compile bytes-tiny (dense-tiny with a byte vocabulary) for 4 ranks (a 2x2 mesh: data parallel
# across, tensor parallel within), draw the plan, run it with --check, then train it on the project's own docs
# (read as bytes; a tenth held out for the validation loss) saving checkpoints, stop half way and resume to the
# end, draw the loss curves (out/demo/report.png) and export the model (out/demo/model.safetensors).
# make test: the whole test suite (unit, golden, multi-rank). Both set up .venv when missing.
# make docs: regenerate docs/spec-reference.md from the schema.
PY      := .venv/bin/python
STAMP   := .venv/.ultraplan-installed
DEMO    := out/demo
DEMO_STEPS := 300
DEMO_HALF  := 150

.PHONY: demo test lint golden setup clean docs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@bash tools/setup.sh
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ultraplan stats bytes-tiny
	$(PY) -m ultraplan compile bytes-tiny --mesh 2x2 --strategy dp,tp -o $(DEMO)
	$(PY) -m ultraplan viz $(DEMO)/plan.json -o $(DEMO)/plan.svg
	$(PY) -m ultraplan run $(DEMO) --check
	$(PY) -m ultraplan data prepare README.md docs/*.md -o $(DEMO)/docs.bin --val-fraction 0.1
	rm -rf $(DEMO)/checkpoint
	$(PY) -m ultraplan run $(DEMO) --data $(DEMO)/docs.bin --val-data $(DEMO)/docs.val.bin --val-every 25 \
		--steps $(DEMO_HALF) --checkpoint-dir $(DEMO)/checkpoint --checkpoint-every 50
	$(PY) -m ultraplan run $(DEMO) --data $(DEMO)/docs.bin --val-data $(DEMO)/docs.val.bin --val-every 25 \
		--steps $(DEMO_STEPS) --checkpoint-dir $(DEMO)/checkpoint --checkpoint-every 50 --resume
	$(PY) -m ultraplan report $(DEMO)
	$(PY) -m ultraplan export $(DEMO)/checkpoint -o $(DEMO)/model.safetensors

test: $(STAMP)
	$(PY) -m ruff check . tests/dist  # ruff skips folders named dist unless named
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder  # the order: tests/conftest.py

docs: $(STAMP)
	$(PY) tools/gen_spec_reference.py

golden: $(STAMP)
	$(PY) tools/regen_golden.py

clean:
	rm -rf out .pytest_cache .ruff_cache
