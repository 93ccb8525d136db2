# The test command (README, .ci/run): installs the package with its test extras, then runs pytest.
PIP_INSTALL = python3 -m pip install -q --disable-pip-version-check -c constraints-cpu.txt

.PHONY: test install
install:
	$(PIP_INSTALL) -e '.[test]'

test: install
	python3 -m pytest -q
