# Two entry points for a fresh machine (see README):
#   make demo   creates .venv, installs vdit-accel, generates a clip with the embedded model and scores it
#   make test   installs the dev extras and runs the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

$(BIN)/vdit-accel: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

install: $(BIN)/vdit-accel

demo: install
	$(BIN)/vdit-accel generate "a red circle moves right on a blue background" --steps 50 --seed 0 --out results/demo/clip.mp4 --overwrite
	$(BIN)/vdit-accel score results/demo/clip.mp4 --prompt "a red circle moves right on a blue background"

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

.PHONY: install demo test
