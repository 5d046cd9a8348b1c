# The two set-up commands of a fresh clone; both create .venv with CPU torch and the requirements
# (scripts/setup.sh, which also runs without make: bash scripts/setup.sh demo|test).
.PHONY: demo test

demo:  # encode + decode + codes + spectrograms of the bundled sample into demo/
	bash scripts/setup.sh demo

test:  # the test suite exactly as CI runs it (.ci/run)
	bash scripts/setup.sh test
