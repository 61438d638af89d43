# Shortcuts for ./dev.sh, which creates .venv on first use.
.PHONY: sandbox test lint

sandbox:
	./dev.sh sandbox

test:
	./dev.sh test

lint:
	./dev.sh test --co -q >/dev/null
	.venv/bin/ruff check daemon tests bench
	.venv/bin/ruff format --check daemon tests bench
	.venv/bin/mypy
