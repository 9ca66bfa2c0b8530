"""Checks every committed npm lockfile (scripts/audit): the lockfile exists beside its
package.json, pins exact versions, and every locked package has a sha512 integrity hash and a
permissive licence. Prints one line per lockfile; exits 1 on the first rule broken."""

import json
import subprocess
import sys

# The same permissive licences deny.toml allows for crates, in npm's SPDX spelling.
PERMISSIVE = {
    "MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Zlib", "0BSD", "CC0-1.0",
    "BlueOak-1.0.0", "Unicode-3.0",
}

# Exceptions name one locked package of one lockfile, the licence it may have, and the reason.
EXCEPTIONS = {
    ("bench/peers/graphile-worker/package-lock.json", "node_modules/argparse"): (
        "Python-2.0",
        "the PSF licence 2.0 is permissive (no copyleft); argparse comes with js-yaml under "
        "cosmiconfig under graphile-worker, a benchmark peer that is never shipped",
    ),
}


def permissive(expression: str) -> bool:
    """An SPDX expression is permissive when one alternative of an OR is all permissive."""
    expression = expression.strip().strip("()")
    return any(
        all(part.strip().strip("()") in PERMISSIVE for part in alternative.split(" AND "))
        for alternative in expression.split(" OR ")
    )


def tracked(pattern: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", pattern], check=True, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "node_modules/" not in line]


def main() -> int:
    problems: list[str] = []
    for manifest in tracked("*package.json"):
        folder = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
        lock_path = f"{folder}/package-lock.json"
        try:
            with open(lock_path, encoding="utf-8") as f:
                lock = json.load(f)
        except FileNotFoundError:
            problems.append(f"{manifest}: no package-lock.json committed beside it")
            continue
        with open(manifest, encoding="utf-8") as f:
            package = json.load(f)
        for section in ("dependencies", "devDependencies", "optionalDependencies"):
            for name, wanted in package.get(section, {}).items():
                if not wanted[:1].isdigit():
                    problems.append(f"{manifest}: {name} is {wanted!r}, not an exact version")
        before = len(problems)
        excepted_here = 0
        packages = {k: v for k, v in lock.get("packages", {}).items() if k}
        if lock.get("lockfileVersion", 0) < 2:
            problems.append(f"{lock_path}: lockfileVersion {lock.get('lockfileVersion')} < 2")
        for path, entry in packages.items():
            if entry.get("link"):
                continue
            if not str(entry.get("integrity", "")).startswith("sha512-"):
                problems.append(f"{lock_path}: {path} has no sha512 integrity hash")
            licence = entry.get("license")
            excepted = EXCEPTIONS.get((lock_path, path), (None,))[0]
            if excepted is not None and licence == excepted:
                excepted_here += 1
                continue
            if not isinstance(licence, str) or not permissive(licence):
                problems.append(f"{lock_path}: {path} is under {licence!r}, not a permissive licence")
        if len(problems) == before:
            but = f" ({excepted_here} by a named exception)" if excepted_here else ""
            print(f"{lock_path}: {len(packages)} packages, each with a sha512 integrity hash "
                  f"and a permissive licence{but}")
    for problem in problems:
        print(f"npm lockfiles: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
