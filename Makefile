# Two commands on a fresh machine: `make demo` and `make test`. Both start with `make install`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# No model hub is reachable: everything loads from installed packages or local files.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# Re-installs only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	@echo "make install: creating the virtual environment $(VENV) (once)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make install: upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "make install: installing phrasefuse and its dependencies into $(VENV) (torch, open_clip, FAISS, LightGBM, Ray...: about 3 minutes the first time)"
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@
	@echo "make install: done; the CLI is $(VENV)/bin/phrasefuse (or 'source $(VENV)/bin/activate', then 'phrasefuse')"

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/phrasefuse demo --work work/demo

bench: install
	$(PY) bench/extract.py

clean:
	rm -rf $(VENV) work .pytest_cache
