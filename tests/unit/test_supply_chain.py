"""The supply chain: bounded dependencies, a hashed lock that `make setup` installs from, and
the audit's policy (a finding fails unless allowed with a reason; PyPI out of reach fails)."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "requirements.lock").read_text()


def _audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("security_audit", ROOT / "security" / "audit.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["security_audit"] = module
    spec.loader.exec_module(module)
    return module


audit = _audit_module()


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = [*project["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def test_every_dependency_has_an_upper_bound() -> None:
    unbounded = [str(r) for r in _requirements() if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert unbounded == []


def test_orjson_excludes_both_recursion_advisories() -> None:
    (orjson,) = [r for r in _requirements() if r.name == "orjson"]
    assert not orjson.specifier.contains("3.9.14") and not orjson.specifier.contains("3.11.5")  # loads, dumps
    assert orjson.specifier.contains("3.11.6")


def test_the_lock_pins_every_requirement_with_hashes_within_its_bounds() -> None:
    pins = audit.locked_packages(LOCK)
    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7"}
    for req in _requirements():
        if req.marker and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{req}: locked {pins[name]}"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.split("\n", 2)[2])
    for block in blocks:
        if re.match(r"[A-Za-z0-9]", block):
            assert "==" in block.splitlines()[0] and "--hash=sha256:" in block, block.splitlines()[0]
    assert {"pip", "setuptools", "wheel", "pip-audit", "uv"} <= set(pins)  # nothing unlocked at setup


def test_make_setup_installs_only_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(LOCK\)", makefile, re.M)
    assert "pip install -q --require-hashes -r $(LOCK)" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert re.search(r"^test: setup audit", makefile, re.M) and re.search(r"^lock: ", makefile, re.M)


def test_the_allow_list_parses_and_every_entry_has_a_reason() -> None:
    allowed = audit.load_allow_list((ROOT / "security" / "audit-ignore.toml").read_text())
    assert all(len(a.reason) >= 20 for a in allowed)
    with pytest.raises(ValueError, match="ignore entry 1: `reason` is required"):
        audit.load_allow_list('[[ignore]]\nid = "GHSA-1"\npackage = "x"\n')
    with pytest.raises(ValueError, match=r"ignore entry 1 \(GHSA-1\): `reason` must say why"):
        audit.load_allow_list('[[ignore]]\nid = "GHSA-1"\npackage = "x"\nreason = "later"\n')


def _fake_pypi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pip_audit: Any, projects: dict[str, dict[str, Any]]
) -> Path:
    lock = tmp_path / "requirements.lock"
    lock.write_text("orjson==3.9.10 \\\n    --hash=sha256:aa\nrich==15.0.0 \\\n    --hash=sha256:bb\n")
    monkeypatch.setattr(audit, "_pip_audit", pip_audit)

    def project_json(name: str, attempts: int = 3) -> dict[str, Any]:
        if name not in projects:
            raise audit.Unreachable(f"{name}: connection refused")
        return projects[name]

    monkeypatch.setattr(audit, "_project_json", project_json)
    return lock


def _allow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "audit-ignore.toml"
    path.write_text(text)
    monkeypatch.setattr(audit, "ALLOW_LIST", path)


FINDING = audit.Finding("orjson", "3.9.10", "PYSEC-2024-40", ("3.9.15",), ("CVE-2024-27454", "GHSA-pwr2-4v36-6qpr"))


def test_a_finding_fails_unless_allowed_by_an_alias_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = _fake_pypi(monkeypatch, tmp_path, lambda _lock: ([FINDING], set(), 2), {})
    _allow(monkeypatch, tmp_path, "")
    assert audit.main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "VULNERABLE orjson==3.9.10: PYSEC-2024-40; fixed in 3.9.15" in err and "1 vulnerable" in err

    entry = (
        '[[ignore]]\nid = "GHSA-pwr2-4v36-6qpr"\npackage = "orjson"\nreason = "only trusted input reaches loads here"\n'
    )
    _allow(monkeypatch, tmp_path, entry + entry.replace("orjson", "rich"))
    assert audit.main([str(lock)]) == 0
    err = capsys.readouterr().err
    assert "allowed orjson==3.9.10: PYSEC-2024-40" in err and "entry GHSA-pwr2-4v36-6qpr (rich) matches no" in err


def test_packages_pip_audit_cannot_look_up_are_checked_by_their_latest_release(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    projects = {
        "rich": {"info": {"version": "15.0.0"}, "vulnerabilities": [
            {"id": "GHSA-rich", "fixed_in": [], "aliases": [], "withdrawn": None},
            {"id": "GHSA-old", "fixed_in": ["1"], "aliases": [], "withdrawn": "2026-01-01"},
        ]},
        "orjson": {"info": {"version": "3.13.0"}, "vulnerabilities": []},  # 3.9.10 is not the latest
        "pip": {"info": {"version": "26.3"}, "vulnerabilities": []},
    }  # fmt: skip
    lock = _fake_pypi(monkeypatch, tmp_path, lambda _lock: ([], {"orjson", "rich"}, 0), projects)
    _allow(monkeypatch, tmp_path, "")
    assert audit.main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "VULNERABLE rich==15.0.0: GHSA-rich; no fixed version yet" in err and "GHSA-old" not in err
    assert "not auditable here" in err and "orjson==3.9.10" in err
    assert "0 checked by pip-audit, 1 by their latest release's advisories, 1 not auditable" in err

    projects["rich"]["vulnerabilities"] = []
    assert audit.main([str(lock)]) == 0  # not auditable is a warning...
    assert audit.main([str(lock), "--strict"]) == 1  # ...and a failure with --strict


def test_pypi_out_of_reach_fails_saying_nothing_was_audited(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(_lock: Path) -> Any:
        raise audit.Unreachable("pip-audit exited 1 without a report: ConnectionError")

    lock = _fake_pypi(monkeypatch, tmp_path, unreachable, {})
    _allow(monkeypatch, tmp_path, "")
    assert audit.main([str(lock)]) == 2
    assert "out of reach, so nothing was audited" in capsys.readouterr().err
    # pip-audit answered "not found" for everything and PyPI does not answer either: the same.
    lock = _fake_pypi(monkeypatch, tmp_path, lambda _lock: ([], {"orjson", "rich"}, 0), {})
    assert audit.main([str(lock)]) == 2
