# Two commands, each doing all its own set-up on a fresh machine:
#   make demo   the main job on this machine's default device
#   make test   the whole test suite (what .ci/run calls)
# and, for CI, `make test-triton-newest`: a subset of the tests on the newest Triton we support
# (TRITON_NEWEST), in a second venv, so a Triton release that breaks the kernels shows at once.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
JOBS    ?= 2
TRITON_NEWEST ?= 3.9.0
VENV_NEWEST   := .venv-triton-newest
STAMP_NEWEST  := $(VENV_NEWEST)/.installed
# the write kernel, the README examples, the planner (strides, layouts, re-planning) and split-KV:
# a smoke test of the language features the kernels use, about a minute plus the install
NEWEST_TESTS  := tests/test_write.py tests/test_readme.py tests/test_planner.py \
                 tests/test_kernels.py::test_split_kv_path_is_exercised_and_matches_single_pass

.PHONY: demo test test-triton-newest venv clean

# -qq: errors only (this machine's pip configuration warns once per package otherwise)
$(STAMP): requirements.lock pyproject.toml
	@echo "installing requirements.lock into $(VENV) (once; about 2 minutes)"
	@python3 -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -m pip install -qq -r requirements.lock
	@$(PY) -m pip install -qq --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# Without a GPU the Triton kernels run through Triton's interpreter (the same kernels, on CPU).
demo: $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VENV)/bin/pagedattn demo; \
	else \
		TRITON_INTERPRET=1 $(VENV)/bin/pagedattn demo; \
	fi

test: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) -q --durations=15

$(STAMP_NEWEST): requirements.lock pyproject.toml
	@echo "installing requirements.lock with triton==$(TRITON_NEWEST) into $(VENV_NEWEST) (once)"
	@python3 -m venv $(VENV_NEWEST)
	@$(VENV_NEWEST)/bin/python -m pip install -qq --upgrade pip
	@grep -v '^triton==' requirements.lock > $(VENV_NEWEST)/requirements.txt
	@$(VENV_NEWEST)/bin/python -m pip install -qq -r $(VENV_NEWEST)/requirements.txt triton==$(TRITON_NEWEST)
	@$(VENV_NEWEST)/bin/python -m pip install -qq --no-deps -e .
	@touch $(STAMP_NEWEST)

test-triton-newest: $(STAMP_NEWEST)
	TRITON_INTERPRET=1 $(VENV_NEWEST)/bin/python -m pytest -n $(JOBS) -q $(NEWEST_TESTS)

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .pytest_cache .hypothesis
