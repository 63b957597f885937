#!/usr/bin/env python3
"""Checks that the workspace's `rust-version` (its MSRV) is true, as far as one toolchain can.

- every workspace crate inherits the one `rust-version` of the workspace;
- no dependency in Cargo.lock's resolution declares a higher `rust-version` than ours (the
  binding one is printed: raise ours when a dependency update raises it);
- the toolchain running this is at least that version.

Our own code's use of newer standard-library APIs is checked by clippy's `incompatible_msrv`
lint, which reads the same `rust-version` (CI runs clippy with `-D warnings`). A build on the
MSRV toolchain itself needs that toolchain, which this CI's machines cannot fetch (no network
but the package registries); where rustup can install it,
`rustup toolchain install $(MSRV) && cargo +$(MSRV) build --workspace --locked` completes the
check. Run by `.ci/run`.
"""

import json
import re
import subprocess
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    resolved = {n["id"] for n in meta["resolve"]["nodes"]}
    ours = {p["name"]: p.get("rust_version") for p in meta["packages"] if p["id"] in members}
    declared = set(ours.values())
    if len(declared) != 1 or None in declared:
        sys.exit(f"msrv: every workspace crate must inherit the workspace rust-version, got {ours}")
    msrv = declared.pop()

    deps = [
        (version(p["rust_version"]), p["name"], p["version"], p["rust_version"])
        for p in meta["packages"]
        if p["id"] in resolved and p["id"] not in members and p.get("rust_version")
    ]
    if not deps:
        sys.exit("msrv: no dependency declares a rust-version; cargo metadata changed shape?")
    deps.sort()
    needed, name, ver, text = deps[-1]
    if needed > version(msrv):
        too_new = [f"{n} {v} ({t})" for need, n, v, t in deps if need > version(msrv)]
        sys.exit(
            f"msrv: rust-version is {msrv}, but these dependencies need more: {', '.join(too_new)}. "
            "Raise `rust-version` in Cargo.toml (or hold the dependency back)."
        )

    rustc = subprocess.run(["rustc", "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"rustc (\d+\.\d+\.\d+)", rustc)
    if not match or version(match.group(1)) < version(msrv):
        sys.exit(f"msrv: this toolchain ({rustc.strip()}) is older than rust-version {msrv}")
    print(
        f"msrv: rust-version {msrv} holds: {len(deps)} dependencies declare one, the highest is "
        f"{name} {ver} ({text}); toolchain {match.group(1)}"
    )


if __name__ == "__main__":
    main()
