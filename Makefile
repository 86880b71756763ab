# Every target creates (or reuses) the local virtual environment .venv itself.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: on a machine without a GPU this takes the CPU wheel, not a multi-GB CUDA build
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: answer a question about an image. The tiny random checkpoint is made on first use (its answers
# are random text; point --model at a Kimi-VL-A3B directory for real ones).
DEMO := runs/demo-tiny
$(DEMO)/config.json: | $(STAMP)
	$(VENV)/bin/python -m weights_tools make-tiny $(DEMO) --force  # --force: over a half-written earlier try

demo: $(STAMP) $(DEMO)/config.json
	$(VENV)/bin/kimivl generate --model $(DEMO) --image assets/sample.png --prompt "What is in this image?" \
		--max-new-tokens 48

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# On a CUDA machine, with its own torch (no venv: the venv's pin is the CPU wheel): kernel tests, model agreement,
# MoE / MLA / A3B timings against the machine's limits -> $(GPU_OUT)/gpu_check.{json,md}
GPU_OUT ?= runs/gpu-check
gpu-check:
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) benchmarks/gpu_check.py $(GPU_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
