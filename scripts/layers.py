#!/usr/bin/env python3
"""The layering check (run by scripts/test.sh): weir's library is built in layers, and a
layer may name only the layers below it.

    model -> config -> telemetry -> dataplane -> control -> fleet -> admin -> lib.rs

`crate::X` paths are read from every source file of crates/weir/src (comments
included: a doc link upwards is an upward arrow too). Exits 1 naming every file that
names a higher layer. With --graph, prints the module import graph instead: arrows,
upward arrows and circles between modules, for reviews and the docs.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "weir", "src")
LAYERS = ["model", "config", "telemetry", "dataplane", "control", "fleet", "admin"]
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK["lib"] = len(LAYERS)
PATH = re.compile(r"\bcrate::([a-z_]+)(?:::([a-z_]+))?")


def modules():
    """(module name like `control::guard`, layer, path) for every source file."""
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            name = "::".join(rel)
            layer = rel[0] if rel[0] in RANK else "lib"
            yield name, layer, path


def arrows():
    """(from module, to module, to layer) for every crate path, once per pair."""
    names = {n for n, _, _ in modules()}
    seen = set()
    for name, layer, path in modules():
        text = open(path, encoding="utf-8").read()
        for m in PATH.finditer(text):
            top, sub = m.group(1), m.group(2)
            target = f"{top}::{sub}" if sub and f"{top}::{sub}" in names else top
            if top not in RANK and top not in names:
                continue  # a crate-root item (e.g. `crate::Weir`)
            key = (name, target)
            if key in seen or target == name:
                continue
            seen.add(key)
            yield name, layer, target, top if top in RANK else "lib"


def check():
    bad = []
    for name, layer, target, tlayer in arrows():
        if RANK[tlayer] > RANK[layer]:
            bad.append(f"{name} ({layer}) names crate::{target} ({tlayer}), a higher layer")
    for line in bad:
        print(f"layering: {line}", file=sys.stderr)
    if bad:
        print(
            f"layering: {len(bad)} upward arrow(s); order: {' -> '.join(LAYERS)} -> lib.rs",
            file=sys.stderr,
        )
        return 1
    return 0


def graph():
    edges = {}
    up = 0
    total = 0
    for name, layer, target, tlayer in arrows():
        edges.setdefault(name, set()).add(target)
        total += 1
        if RANK[tlayer] > RANK[layer]:
            up += 1
            print(f"upward: {name} -> {target}")
    # Strongly connected components (Tarjan) = circles of modules importing each other.
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    print(f"arrows: {total}, upward: {up}, circles: {len(comps)}")
    for c in comps:
        print(f"circle ({len(c)}): {', '.join(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(graph() if "--graph" in sys.argv else check())
