# shellcheck shell=bash
# Sourced by scripts/test (and by hand: `source scripts/_env.sh` before running tox yourself).
#
# tox (through uv) finds interpreters by name on PATH. pyenv's shims answer only for the
# global version: `python3.9` from a shim fails, and uv stops at the first failing candidate.
# So put every installed pyenv 3.x bin directory on PATH ahead of the shims, with the
# directory of the current `python3` first so that `python3` keeps meaning what it meant.

_cr_pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
if [ -d "$_cr_pyenv_root/versions" ]; then
    _cr_current="$(python3 -c 'import os, sys; print(os.path.dirname(os.path.realpath(sys.executable)))' 2>/dev/null || true)"
    _cr_dirs=""
    for _cr_dir in "$_cr_pyenv_root"/versions/3.*/bin; do
        [ -d "$_cr_dir" ] || continue
        [ "$_cr_dir" = "$_cr_current" ] && continue
        _cr_dirs="$_cr_dirs$_cr_dir:"
    done
    case "$_cr_current" in
        "$_cr_pyenv_root"/versions/*) _cr_dirs="$_cr_current:$_cr_dirs" ;;
    esac
    PATH="$_cr_dirs$PATH"
    export PATH
    unset _cr_current _cr_dirs _cr_dir
fi
unset _cr_pyenv_root

# Never let uv download a Python build: only this machine's interpreters count.
export UV_PYTHON_DOWNLOADS=never
