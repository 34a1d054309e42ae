"""The clone stands alone and installs reproducibly.

* every runtime and test dependency has an upper bound below its next major, and
  ``constraints.txt`` pins an exact version of each one that the install can pull in;
* the installers (``.ci/run``, the Dockerfile, the README's set-up lines) use the constraints;
* nothing tracked reaches outside the repository (``../shared``), and the test data the suite
  and the README read is in it;
* package discovery maps kvr's packages and nothing else (``bench*`` once mapped ``bench-results``).
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[tuple[str, str]]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out = []
    for req in reqs:
        m = _REQ.match(req)
        assert m, req
        out.append((_norm(m.group(1)), m.group(2)))
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin"
        pins[_norm(name)] = version
    return pins


def test_every_dependency_has_an_upper_bound_and_an_exact_pin():
    pins = _constraints()
    for name, spec in _requirements():
        assert "<" in spec, f"{name}{spec}: no upper bound"
        assert name in pins, f"{name} is not pinned in constraints.txt"


def test_every_pin_satisfies_its_range():
    from packaging.specifiers import SpecifierSet

    pins = _constraints()
    for name, spec in _requirements():
        assert SpecifierSet(spec).contains(pins[name]), f"{name}=={pins[name]} is outside {spec}"


def test_installers_use_the_constraints():
    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()
    assert "-c constraints.txt" in (REPO / "Dockerfile").read_text()
    setup_lines = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(setup_lines) == 2 and all("pip install -c constraints.txt" in line for line in setup_lines)


def test_nothing_tracked_reaches_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for rel in tracked:
        path = REPO / rel
        if path.suffix not in (".py", ".md", ".yml", ".yaml", ".toml", ".txt", "") or not path.is_file():
            continue
        if rel == "tests/test_repository.py":
            continue
        text = path.read_text(errors="replace")
        if "../shared" in text:
            offenders.append(rel)
    assert offenders == []


def test_the_data_tests_and_readme_read_is_in_the_repository():
    fixtures = REPO / "tests" / "fixtures" / "vllm_kv_events"
    assert (fixtures / "hash_vectors.json").is_file() and len(list(fixtures.glob("*.bin"))) >= 7
    assert "Apache-2.0" in (fixtures / "README.md").read_text()
    traces = REPO / "traces"
    readme = (traces / "README.md").read_text()
    for name in ("mooncake_fast25_conversation_trace.jsonl", "mooncake_fast25_synthetic_trace.jsonl"):
        assert (traces / name).is_file() and name in readme
    assert "Apache-2.0" in readme


def _packages() -> list[str]:
    """Every importable package folder under the repository, dotted (setuptools' view of it)."""
    out = []
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if not any(part.startswith(".") for part in rel.parts):
            out.append(".".join(rel.parts))
    return out


def test_package_discovery_maps_kvr_packages_only():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = {p for p in _packages() if any(fnmatch.fnmatchcase(p, pattern) for pattern in include)}
    assert {p.split(".")[0] for p in found} == {"core", "bus", "router", "worker", "monitor", "cluster", "sim", "cli",
                                                "bench"}
    # A pattern such as "bench*" would also match a folder named bench-results or bench_old.
    assert all(pattern.split(".")[0].isidentifier() and "*" not in pattern.split(".")[0] for pattern in include)
