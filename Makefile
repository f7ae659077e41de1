# Everyday commands; CI runs .ci/run.
.PHONY: demo test test-interpret test-gpu inspect bench gpu-check lint

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

# On a lent GPU, first thing: the GPU test tier, then the MoE, attention, QKV and decode benchmarks (under 10 minutes), into OUT; see CONTRIBUTING.md.
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=dir [COMMIT=hash]" >&2; exit 2; }
	python3 benchmarks/gpu_check.py --out "$(OUT)" $(if $(COMMIT),--commit $(COMMIT))

lint:
	ruff check . && ruff format --check .
