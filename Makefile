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

# The shipped model's held-out test set (README "The shipped model"); needs ../shared/data.
TEST_SET := data/test64/dataset.json
SHARED_CT := ../shared/data/ct
$(TEST_SET): | $(STAMP)
	$(VENV)/bin/breathcast simulate --patients 8 --anatomy-ct $(SHARED_CT)/popi-phase00 \
		--anatomy-ct $(SHARED_CT)/lungct-examples/lungct-0001-phase5.nii.gz \
		--anatomy-ct $(SHARED_CT)/lungct-examples/lungct-0103-phase5.nii.gz --patients-per-ct 3 \
		--grid 64 --scans 25 --seed 3031 --out data/test64

bench: $(STAMP) $(TEST_SET)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_cvae.py --data data/test64
	$(PY) benchmarks/bench_real.py --model breathcast/models/cvae64/model.pt --test-data data/test64
	$(PY) benchmarks/bench_motion_realism.py --kind cartoon --kind realct --patients 20
	$(PY) benchmarks/bench_faults.py
	$(PY) benchmarks/bench_4dct.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_stream.py --latency-s 60 --sustained-25hz-s 600 --sustained-100hz-s 60
	$(PY) benchmarks/bench_igtl.py
	$(PY) benchmarks/bench_forecast.py
	$(PY) benchmarks/bench_ldm.py
	$(VENV)/bin/breathcast export --ldm breathcast/models/ldm64/model.pt --out packages/ldm64 --overwrite --sampling-steps 1
	$(PY) benchmarks/bench_engine.py --package packages/ldm64 --patients 3 --windows 5
	$(PY) benchmarks/bench_stream.py --package packages/ldm64 --cases distilled distilled_target_only --latency-s 60
	$(PY) benchmarks/bench_response.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
