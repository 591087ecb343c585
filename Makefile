# Two commands on a fresh machine: `make demo` and `make test`. Both start with `make install`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# No model hub is reachable: everything loads from installed packages or local files.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install test demo bench bench-gpu clean

install: $(VENV)/.installed

# GPU=1 adds the gpu extra (faiss-gpu) and removes faiss-cpu: both install the one `faiss` module, so
# faiss-gpu is re-installed last to own its files (and a switch back to CPU removes both first).
# The choice sticks (later `make test` keeps the GPU build); `make install GPU=` goes back to CPU FAISS.
GPU ?= $(if $(wildcard $(VENV)/.gpu),1,)
comma := ,
EXTRAS = test,ray$(if $(GPU),$(comma)gpu)

# Re-installs only when the project's dependencies change (or GPU changes).
$(VENV)/.installed: pyproject.toml $(if $(GPU),$(VENV)/.gpu,$(VENV)/.cpu)
	@echo "make install: creating the virtual environment $(VENV) (once)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make install: upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "make install: installing phrasefuse and its dependencies into $(VENV) (torch, open_clip, FAISS, LightGBM, Ray...: about 3 minutes the first time)"
	$(if $(GPU),,$(PY) -m pip show --quiet faiss-gpu 2>/dev/null && $(PY) -m pip uninstall --quiet --yes faiss-gpu faiss-cpu || true)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(if $(GPU),$(PY) -m pip uninstall --quiet --yes faiss-cpu)
	$(if $(GPU),$(PY) -m pip install --quiet --force-reinstall --no-deps "faiss-gpu==$$($(PY) -c 'from importlib.metadata import version; print(version("faiss-gpu"))')")
	touch $@
	@echo "make install: done; the CLI is $(VENV)/bin/phrasefuse (or 'source $(VENV)/bin/activate', then 'phrasefuse')"

# Markers of the last install's kind: a change of GPU makes .installed stale.
$(VENV)/.gpu $(VENV)/.cpu:
	mkdir -p $(VENV)
	rm -f $(VENV)/.gpu $(VENV)/.cpu
	touch $@

# One worker per core (pytest-xdist); a file's tests stay on one worker, so its fixtures are built once.
# Files are handed out in collection order, longest first (tests/conftest.py), not by number of tests.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

demo: install
	$(VENV)/bin/phrasefuse demo --work work/demo

bench: install
	$(PY) bench/extract.py

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) work .pytest_cache
