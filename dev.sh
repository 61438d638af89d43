#!/bin/sh
# Set up .venv when it is missing or older than pyproject.toml, then run
# the sandbox or the test suite. Needs only Python 3.11+ and git.
set -eu
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.ghappd-installed

usage() {
    echo "usage: ./dev.sh sandbox [ghappd sandbox options]" >&2
    echo "       ./dev.sh test [pytest options]" >&2
}

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "ghappd needs Python 3.11 or newer; set PYTHON to one" >&2
        exit 2
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV with $("$PYTHON" --version)" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
        echo "installing ghappd and its test tools into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet -e '.[test]'
        touch "$STAMP"
    fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    sandbox) setup; exec "$VENV/bin/ghappd" sandbox "$@" ;;
    test) setup; exec "$VENV/bin/pytest" "$@" ;;
    *) usage; exit 2 ;;
esac
