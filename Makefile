# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean etcd

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stalwart train

# A real etcd for the control-plane tests: Debian's etcd-server, where this is root and
# apt works; elsewhere those tests skip and say why.
etcd:
	@command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null 2>&1; }; }; } || \
	  echo "etcd-server is not installed (needs root and apt): the etcd tests will skip"

test: $(STAMP) etcd
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
