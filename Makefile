# Everyday commands; CI runs .ci/run.
.PHONY: demo test test-interpret test-gpu inspect bench lint

demo:
	dbrx-fast demo

test:
	pytest -q

test-interpret:  # kernels through the Triton interpreter, even on a GPU machine
	TRITON_INTERPRET=1 pytest -q -m interpreter

test-gpu:
	pytest -q -m "gpu or interpreter"

inspect:  # registers, spills, shared memory and wgmma of every kernel config for sm_80 and sm_90
	python -m dbrx_fast.inspect

bench:
	python -m benchmarks.bench_moe

lint:
	ruff check . && ruff format --check .
