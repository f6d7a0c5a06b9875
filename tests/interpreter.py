"""Run a test module's kernel cases in Triton's interpreter, in a subprocess.

The interpreter must be chosen before Triton compiles anything (TRITON_INTERPRET=1 at import)
and must not leak into other test modules, so a module's `case_*` functions run in one child
process (the module executed as a script, calling `print_case_results`), which prints each
case's measured errors and tolerance as JSON for the module's tests to read.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cases_of(namespace: dict) -> dict:
    """{name: fn} of the module's `case_*` functions; each returns ({quantity: error}, tol)."""
    return {name[len("case_"):]: fn for name, fn in sorted(namespace.items()) if name.startswith("case_")}


def print_case_results(cases: dict) -> None:
    out = {}
    for name, fn in cases.items():
        try:
            errors, tol = fn()
            out[name] = {"errors": errors, "tol": tol}
        except Exception as exc:  # reported by the test of this case
            out[name] = {"exception": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))


def run_interpreted(module_file: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, os.path.abspath(module_file)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_case(result: dict) -> None:
    assert "exception" not in result, result.get("exception")
    bad = {k: v for k, v in result["errors"].items() if not v <= result["tol"]}
    assert not bad, f"relative errors above {result['tol']}: {bad} (all: {result['errors']})"
