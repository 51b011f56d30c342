#!/usr/bin/env python3
"""Checks the import structure of the project's packages (issue 10, DESIGN §5):

- no import cycle among the project's modules (module-level imports only:
  imports inside functions are how a cycle is deliberately broken, so they are
  listed separately, not failed);
- no module imports another module's `_private` name (`from .x import _y`);
- no Python module over LIMIT lines.

Usage: python3 scripts/check_imports.py [--limit 500]   (exit 1 on a violation)
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sandbox", "netns")


def modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-9] if rel.endswith(".__init__") else rel] = path
                elif f.endswith(".so"):     # a compiled module: importable, never scanned
                    rel = os.path.relpath(os.path.join(dirpath, f.split(".")[0]), ROOT)
                    out[rel.replace(os.sep, ".")] = ""
    return out


def resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def scan(mods: dict[str, str]):
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private, lazy = [], []
    for mod, path in mods.items():
        if not path:
            continue
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path).read(), path)
        top_level = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    # importing a module (even one named _x) is not reaching into privates
                    targets.append((sub, None) if sub in mods else (base, a.name))
            for target, name in targets:
                if target.split(".")[0] not in PACKAGES or target not in mods:
                    continue
                if name and name.startswith("_") and not name.startswith("__") and target != mod:
                    private.append(f"{mod}: from {target} import {name}")
                if _in_type_checking(tree, node):
                    continue            # typing only: never executed
                if id(node) in top_level:
                    if target != mod:
                        edges[mod].add(target)
                else:
                    lazy.append(f"{mod} -> {target}")
    return edges, private, lazy


def _in_type_checking(tree, node) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test):
            if any(node is x for x in ast.walk(n)):
                return True
    return False


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            # a package's __init__ importing its own submodules is not a cycle of concern
            if state.get(n) == 1:
                cyc = stack[stack.index(n):] + [n]
                if not all(c.startswith(cyc[0] + ".") or c == cyc[0] for c in cyc[1:-1]):
                    found.append(cyc)
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=500)
    args = ap.parse_args()
    mods = modules()
    edges, private, lazy = scan(mods)
    bad = 0
    for c in cycles(edges):
        print("cycle:", " -> ".join(c))
        bad += 1
    for p in private:
        print("private import:", p)
        bad += 1
    for mod, path in sorted(mods.items()):
        if not path:
            continue
        n = sum(1 for _ in open(path))
        if n > args.limit:
            print(f"too long: {mod} ({n} lines > {args.limit})")
            bad += 1
    print(f"{len(mods)} modules, {sum(map(len, edges.values()))} module-level imports, "
          f"{len(lazy)} function-level imports, {bad} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
