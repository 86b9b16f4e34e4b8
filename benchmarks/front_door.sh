#!/usr/bin/env bash
# The README's two set-up commands, exactly as written there, each in a fresh clone in an empty
# temporary folder; prints both wall times and writes them to docs/benchmarks.md.
#
#   bash benchmarks/front_door.sh
#
# The demo's workdir (/tmp/avsiam_demo in the README) is moved into the temporary folder so an
# earlier demo run is neither resumed nor touched.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The first two ```bash blocks under "## Start here": the demo, then the tests.
mapfile -t cmds < <(awk '/^## Start here/{s=1} s&&/^```bash/{b=1; next} b&&/^```/{b=0; n++; if(n==2) exit; next} b' "$repo/README.md")
[[ ${#cmds[@]} -eq 2 ]] || { echo "expected two one-line commands in README's Start here" >&2; exit 1; }
demo_cmd="${cmds[0]//\/tmp\/avsiam_demo/$tmp/avsiam_demo}"
test_cmd="${cmds[1]}"

run() {  # name, command: a fresh clone in its own empty folder, timed
  mkdir -p "$tmp/$1" && git clone -q "$repo" "$tmp/$1/avsiam_jax"
  local t0=$SECONDS
  (cd "$tmp/$1/avsiam_jax" && env -u VIRTUAL_ENV bash -c "$2") > "$tmp/$1.log" 2>&1 \
    || { tail -30 "$tmp/$1.log"; echo "$1 failed" >&2; exit 1; }
  echo $((SECONDS - t0))
}
demo_s=$(run demo "$demo_cmd")
test_s=$(run tests "$test_cmd")
summary="$(grep -E '^[0-9]+ passed' "$tmp/tests.log" | tail -1)"
results="$(grep -E 'Pretraining:|Finetuning:' "$tmp/demo.log" | sed -E 's/^.*\] //')"

cd "$repo"
python3 - "$demo_s" "$test_s" "$summary" "$results" "$(nproc)" <<'PY'
import sys
from benchmarks.report import write_section  # `python3 -` puts the cwd (the repo) on sys.path
demo_s, test_s, summary, results, cores = sys.argv[1:]
fmt = lambda s: f"{int(s) // 60} min {int(s) % 60:02d} s"
cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # one table cell
md = f"""`bash benchmarks/front_door.sh` on {cores} cores: each of README's two commands in a fresh clone
in an empty temporary folder, pip install included (packages from pip's cache).

| command | wall time | outcome |
|---|---|---|
| demo (install + `python main.py --config=configs/demo.py ...`) | {fmt(demo_s)} | {cell(results)} |
| tests (install + `python -m pytest -q tests`) | {fmt(test_s)} | {summary} |
"""
write_section("Front door", md)
PY
