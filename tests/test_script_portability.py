"""The shell scripts users run on GPU clusters, checked for what old bash (RHEL/CentOS 7: bash 4.2) does
differently from the bash 5 these tests run under.

Under `set -u`, bash before 4.4 treats the expansion of an EMPTY array ("${a[@]}", "${!a[@]}") as an
unbound variable and aborts the script; bash 5 expands it to nothing. No bash 4.2 binary is at hand, so
the check is static: every expansion of an array that may be empty at run time must be guarded as
${a[@]+"${a[@]}"} (the same words on bash 5, none on an empty array on bash 4.2).

"May be empty": the script assigns it () or ("$@"), or fills it with `read -a` (an empty variable gives
an empty array). Arrays only ever assigned literal non-empty lists need no guard; the few filled by
`read -a` or "$@" that cannot be empty where they are expanded are listed below with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["examples/pretrain_single_node.sh", "examples/pretrain_slurm.sh", "examples/pretrain_osp_8b_slurm.sh",
           "examples/preprocess_slurm.sh", "examples/reproduce_osp_small.sh", "examples/quickstart_cpu.sh",
           "tools/device_checks.sh"]
NEVER_EMPTY = {
    ("tools/device_checks.sh", "STAGES"): 'set to (bench repro) right after STAGES=("$@") when empty',
    ("examples/preprocess_slurm.sh", "array_parts"): "read from ARRAY, checked first to start with a digit",
    ("examples/reproduce_osp_small.sh", "flags"): "read from the RUNS table's non-empty flag lists",
    ("examples/reproduce_osp_small.sh", "DIRS"): "DIRS=() gets one entry per row of the RUNS table (4 or 6)",
}
_EXPANSION = re.compile(r'\$\{(!?)(\w+)\[[@*]\]\}')
_ASSIGN = re.compile(r'(?<![\w+])(\w+)=\(([^)]*)\)')
_READ_A = re.compile(r'\bread\b[^\n;|]*?-a\s+(\w+)')


def _uses_nounset(text: str) -> bool:
    return any(re.search(r'-\w*u', line) for line in re.findall(r'^\s*set\s+(-[\w\s-]+)', text, re.M))


def _may_be_empty(text: str) -> set[str]:
    names = {name for name, body in _ASSIGN.findall(text) if body.strip() in ("", '"$@"')}
    return names | set(_READ_A.findall(text))


def _unguarded(text: str) -> list[tuple[int, str]]:
    """(line, array name) of each expansion that is not the inside of its own ${a[@]+"..."} guard."""
    found = []
    for m in _EXPANSION.finditer(text):
        name = m.group(2)
        if re.search(r'\$\{' + name + r'\[[@*]\]\+"$', text[:m.start()]):
            continue
        found.append((text.count("\n", 0, m.start()) + 1, name))
    return found


def _problems(rel: str, text: str) -> list[str]:
    if not _uses_nounset(text):
        return []
    empty = _may_be_empty(text)
    return [f"{rel}:{line}: ${{{name}[@]}} may be empty (bash < 4.4 with set -u: unbound variable); "
            f'write ${{{name}[@]+"${{{name}[@]}}"}}'
            for line, name in _unguarded(text) if name in empty and (rel, name) not in NEVER_EMPTY]


def test_no_unguarded_expansion_of_an_array_that_may_be_empty():
    problems = [p for rel in SCRIPTS for p in _problems(rel, (ROOT / rel).read_text())]
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_it_looks_for():
    """The check itself, on small scripts: flags an optional-arguments array, not a literal one, not a guarded
    one, not one in a script without set -u."""
    bad = 'set -euo pipefail\nextra=()\nread -r -a more <<< "${X:-}"\necho "${extra[@]}" "${!more[@]}"\n'
    assert [p.split(": ")[1] for p in _problems("t.sh", bad)] == ["${extra[@]} may be empty (bash < 4.4 with set -u",
                                                                   "${more[@]} may be empty (bash < 4.4 with set -u"]
    good = ('set -euo pipefail\nextra=()\nlit=(a "b c")\nread -r -a more <<< "${X:-}"\n'
            'echo ${extra[@]+"${extra[@]}"} "${lit[@]}" ${more[@]+"${!more[@]}"} ${#extra[@]}\n')
    assert _problems("t.sh", good) == []
    assert _problems("t.sh", bad.replace("set -euo pipefail", "set -eo pipefail")) == []


def test_the_never_empty_list_is_not_stale():
    for (rel, name), why in NEVER_EMPTY.items():
        text = (ROOT / rel).read_text()
        assert name in _may_be_empty(text) and any(n == name for _, n in _unguarded(text)), (rel, name, why)
