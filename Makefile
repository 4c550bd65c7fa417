# Two entry points: `make dashboard` and `make test`. Both build ./.venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8866

.PHONY: dashboard test venv browser screenshots demo bench clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

# Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "Chromium missing: run 'sudo apt-get install -y chromium' for the browser tests"; fi; \
	fi

dashboard: venv
	$(BIN)/voila notebooks/lab.ipynb --port=$(PORT) --Voila.ip=127.0.0.1 \
	  --MappingKernelManager.cull_idle_timeout=600 --MappingKernelManager.cull_interval=60 \
	  --MappingKernelManager.cull_connected=True

# Without Chromium the browser tests skip; with CI=true (set by CI services) they fail instead.
test: venv browser
	$(BIN)/python -m pytest -q

# Refresh docs/*.png (the README's screenshots) from the browser tests; the tests alone never
# write tracked files.
screenshots: venv browser
	MPVIZ_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_browser.py

demo: venv
	$(BIN)/python -m mpviz demo --task digits --precision fp16 --steps 200 --run-dir runs/demo

bench: venv
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
