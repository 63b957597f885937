"""BENCHMARKS.md sections between `<!-- bench:NAME -->` markers, as `kvmesh bench` writes them
(`node/src/cli/bench.rs`, `write_section`): a section is replaced in place, or appended."""
import re


def write_section(path, name, body):
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body}\n{end}"
    try:
        old = open(path).read()
    except FileNotFoundError:
        old = "# Benchmarks\n"
    if start in old and end in old:
        new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    open(path, "w").write(new)
