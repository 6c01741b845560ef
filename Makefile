# The two commands of the README's quick start: `make demo` and `make test`. Both set up everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/breathcast demo --out demo-output
	$(VENV)/bin/breathcast stream-demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_cvae.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_stream.py --latency-s 60 --sustained-25hz-s 600 --sustained-100hz-s 60
	$(PY) benchmarks/bench_forecast.py
	$(PY) benchmarks/bench_ldm.py
	$(VENV)/bin/breathcast export --ldm breathcast/models/ldm64/model.pt --out packages/ldm64 --overwrite --sampling-steps 5
	$(PY) benchmarks/bench_engine.py --package packages/ldm64 --patients 3 --windows 5
	$(PY) benchmarks/bench_stream.py --package packages/ldm64 --cases distilled distilled_target_only --latency-s 60
	$(PY) benchmarks/bench_response.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
