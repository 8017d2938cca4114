#!/usr/bin/env bash
# A build never links against a libtorch that has vanished (issue #17).
#
# Reproduces the failure shape: two builds of torch-sys in one target
# directory, the second seeing torch at another path (here a symlinked
# copy first on PYTHONPATH, as pip's temporary build environment or
# another venv would put it). With LIBTORCH_USE_PYTORCH as
# scripts/libtorch.sh exports it (the torch directory), the second build
# must rerun torch-sys's build script and link the new path; with an
# unchanged value (the old `=1`), cargo would reuse the first link path.
# Uses its own target directory, so the workspace's stays warm.
#
# The C++ wrapper's sources are swapped for an empty file by a compiler
# wrapper (CXX): what is checked is which libtorch the build script finds and
# records, and compiling libtorch's 30 MB of generated bindings twice (about
# ten minutes on two cores) would add nothing to that. The build script,
# its environment, cc's compiler probes and the link search path are real.
#
#   eval "$(scripts/libtorch.sh)"; scripts/check-libtorch-relink.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
target="$VTP_CACHE/relink-target"
elsewhere="$(mktemp -d)"
trap 'rm -rf "$elsewhere"' EXIT

# A C++ compiler that compiles an empty unit in place of torch-sys's
# libtch/*.cpp and passes every other argument through unchanged.
real_cxx="${CXX:-c++}"
: >"$elsewhere/empty.cpp"
cat >"$elsewhere/cxx" <<WRAPPER
#!/usr/bin/env bash
args=()
for arg in "\$@"; do
    case "\$arg" in
        *libtch/*.cpp) args+=("$elsewhere/empty.cpp") ;;
        *) args+=("\$arg") ;;
    esac
done
exec $real_cxx "\${args[@]}"
WRAPPER
chmod +x "$elsewhere/cxx"
export CXX="$elsewhere/cxx"

expected_a="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
if [ "$LIBTORCH_USE_PYTORCH" != "$expected_a" ]; then
    echo "libtorch.sh exports LIBTORCH_USE_PYTORCH=$LIBTORCH_USE_PYTORCH, not the torch on PATH ($expected_a)" >&2
    exit 1
fi
ln -s "$expected_a" "$elsewhere/torch"
expected_b="$(PYTHONPATH="$elsewhere" python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
[ "$expected_b" = "$elsewhere/torch" ] || { echo "torch did not move to $elsewhere ($expected_b)" >&2; exit 1; }

linked() {
    # The native search path of the newest torch-sys build-script run.
    local output
    output="$(ls -t "$target"/debug/build/torch-sys-*/output | head -1)"
    sed -n 's/^cargo:rustc-link-search=native=\(.*\/lib\)$/\1/p' "$output" | head -1
}

CARGO_TARGET_DIR="$target" cargo build -q --locked -p torch-sys
[ "$(linked)" = "$expected_a/lib" ] || { echo "first build links $(linked), not $expected_a/lib" >&2; exit 1; }
echo "first build links $(linked)"

PYTHONPATH="$elsewhere" LIBTORCH_USE_PYTORCH="$expected_b" CARGO_TARGET_DIR="$target" \
    cargo build -q --locked -p torch-sys
[ "$(linked)" = "$expected_b/lib" ] || { echo "second build links $(linked), not $expected_b/lib: a stale link" >&2; exit 1; }
echo "second build, torch moved, links $(linked)"
echo "relink check passed"
