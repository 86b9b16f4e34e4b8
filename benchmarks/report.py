"""Shared output for the benchmark scripts: one section per benchmark in docs/benchmarks.md.

Each section sits between `<!-- begin: TITLE -->` and `<!-- end: TITLE -->`; rerunning a
benchmark replaces its own section and leaves the others as they are.
"""
from __future__ import annotations

import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("# Benchmarks\n\nWritten by the scripts in `benchmarks/`; each section is replaced "
          "when its script is rerun.\n")


def command(argv: list[str] | None = None) -> str:
  """The command that ran this benchmark, `python -m benchmarks.NAME ARGS` (argv: sys.argv)."""
  argv = sys.argv if argv is None else argv
  name = os.path.splitext(os.path.basename(argv[0]))[0]
  return " ".join(["python", "-m", f"benchmarks.{name}"] + list(argv[1:]))


def write_section(title: str, markdown: str, path: str = "docs/benchmarks.md") -> str:
  """Prints `markdown` and puts it in `path` (relative paths: from the repo root) as a section.

  Returns the path written.
  """
  print(markdown)
  path = os.path.join(REPO, path)  # an absolute `path` stays as it is
  text = open(path).read() if os.path.exists(path) else HEADER
  begin, end = f"<!-- begin: {title} -->", f"<!-- end: {title} -->"
  section = f"{begin}\n## {title}\n\n{markdown.strip()}\n{end}"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(f"(written to {path}, section {title!r})")
  return path
