# Two commands, each doing all its own set-up on a fresh machine:
#   make demo   the main job on this machine's default device
#   make test   the whole test suite (what .ci/run calls)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
JOBS    ?= 2

.PHONY: demo test venv clean

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Without a GPU the Triton kernels run through Triton's interpreter (the same kernels, on CPU).
demo: $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VENV)/bin/pagedattn demo; \
	else \
		TRITON_INTERPRET=1 $(VENV)/bin/pagedattn demo; \
	fi

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
