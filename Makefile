# The two commands a newcomer needs (README.md): `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The runtime extra (torch, diffusers) lets the embedded server generate images itself.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[runtime]"
	touch $@

# k-diffusion (the samplers A1111 runs) is the test oracle for gpu_runtime.kdiffusion; only its sampling code is
# loaded, so it is installed without its training dependencies (torchvision, CLIP, wandb).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,runtime]"
	$(BIN)/pip install --quiet --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
	touch $@

## Set up and start the embedded server on http://127.0.0.1:8000 (HTTP and background work in one process).
run: $(VENV)/.installed-run
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py runesd $(ARGS)

## Set up and run lint, format check and the test suite.
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest $(ARGS)

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/api_bench.py $(ARGS)

clean:
	rm -rf $(VENV) var
