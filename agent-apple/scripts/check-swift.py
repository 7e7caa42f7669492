#!/usr/bin/env python3
"""Checks the Swift sources of agent-apple/apple without a Swift compiler (none installs on
Linux here): every file parses with tree-sitter-swift (no ERROR or MISSING node), every
`ztna_*` function the Swift code calls exists in include/ztna.h with the same number of
arguments, and every function of the header is called somewhere (the Swift side covers the
whole ABI). Needs `tree-sitter` and `tree-sitter-swift` from PyPI (scripts/setup.sh puts them
in a venv). Exit status 1 on any problem."""
import pathlib
import re
import sys

from tree_sitter import Language, Parser
import tree_sitter_swift

HERE = pathlib.Path(__file__).resolve().parent.parent
HEADER = HERE / "include" / "ztna.h"
SWIFT_ROOT = HERE / "apple"


def header_functions(text):
    """name -> arity of every function prototype in the header."""
    funcs = {}
    for m in re.finditer(r"\b(ztna_\w+)\s*\(([^)]*)\)\s*;", text):
        params = " ".join(m.group(2).split())
        funcs[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return funcs


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def check_file(parser, path, funcs, used):
    problems = []
    src = path.read_bytes()
    tree = parser.parse(src)
    for node in walk(tree.root_node):
        if node.type == "ERROR" or node.is_missing:
            line = node.start_point[0] + 1
            snippet = src[node.start_byte:node.end_byte][:60].decode(errors="replace")
            problems.append(f"{path}:{line}: syntax error near {snippet!r}")
        if node.type != "call_expression" or not node.children:
            continue
        callee = node.children[0]
        if callee.type != "simple_identifier":
            continue
        name = src[callee.start_byte:callee.end_byte].decode()
        if not name.startswith("ztna_"):
            continue
        suffix = next((c for c in node.children if c.type == "call_suffix"), None)
        args = 0
        if suffix is not None:
            for c in walk(suffix):
                if c.type == "value_arguments":
                    args = sum(1 for a in c.children if a.type == "value_argument")
                    break
        line = callee.start_point[0] + 1
        used.setdefault(name, []).append(f"{path.relative_to(HERE)}:{line}")
        if name not in funcs:
            problems.append(f"{path}:{line}: {name} is not in {HEADER.name}")
        elif funcs[name] != args:
            problems.append(f"{path}:{line}: {name} called with {args} arguments, the header has {funcs[name]}")
    return problems


def main():
    funcs = header_functions(HEADER.read_text())
    if not funcs:
        print(f"check-swift: no ztna_* functions found in {HEADER}", file=sys.stderr)
        return 1
    parser = Parser(Language(tree_sitter_swift.language()))
    files = sorted(SWIFT_ROOT.rglob("*.swift"))
    problems, used = [], {}
    for f in files:
        problems += check_file(parser, f, funcs, used)
    for name in sorted(set(funcs) - set(used)):
        problems.append(f"{name} (in the header) is never called from Swift")
    for name in sorted(used):
        print(f"  {name}/{funcs.get(name, '?')}: {len(used[name])} call(s), first at {used[name][0]}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"check-swift: {len(files)} Swift files parse; {sum(map(len, used.values()))} calls to "
          f"{len(used)} ztna_* functions match the header's {len(funcs)} functions and their arity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
