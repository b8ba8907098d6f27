"""``make audit``: known vulnerabilities in the locked dependency set.

Usage: ``python security/audit.py [requirements.lock] [--strict]``.

1. ``pip-audit`` checks every pinned package of the lock against PyPI's advisory data (the
   per-release JSON API), without installing anything.
2. A package pip-audit could not look up is looked up once more in PyPI's project JSON, whose
   advisories are those of the project's latest release: exact when the locked version is that
   release. (Some PyPI mirrors, this workplace's among them, serve only the project JSON.)
3. A finding fails the run (exit 1) unless ``security/audit-ignore.toml`` lists its id for that
   package with a written reason. An entry that no longer matches anything is reported, so the
   list does not outlive its findings.
4. PyPI out of reach fails the run (exit 2) with a message saying so: a security check that
   could not run never passes. A package that could be looked up in neither way is listed by
   name; with ``--strict`` that fails too (by default it does not, so a new upstream release,
   which makes the locked one "not the latest", does not break CI overnight).

Prints one summary line with the counts and the time taken; never prints anything else from
the advisories than their ids, packages, versions and fixed-in versions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import Version

__all__ = ["Allowed", "Finding", "apply_allow_list", "load_allow_list", "locked_packages", "main"]

HERE = Path(__file__).resolve().parent
ALLOW_LIST = HERE / "audit-ignore.toml"
PYPI = "https://pypi.org/pypi"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")


class Unreachable(Exception):
    """PyPI's advisory data could not be read: the audit did not run."""


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    id: str
    fixed_in: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Allowed:
    id: str
    package: str
    reason: str


@dataclass
class Result:
    findings: list[Finding] = field(default_factory=list)
    checked_by_pip_audit: int = 0
    checked_latest: int = 0
    unaudited: list[str] = field(default_factory=list)


def locked_packages(lock_text: str) -> dict[str, str]:
    """``{canonical name: version}`` for every ``name==version`` line of a requirements lock."""
    out: dict[str, str] = {}
    for line in lock_text.splitlines():
        match = _PIN.match(line)
        if match:
            out[canonicalize_name(match.group(1))] = match.group(2)
    return out


def load_allow_list(text: str) -> list[Allowed]:
    """The ``[[ignore]]`` entries of ``audit-ignore.toml``. Raises ``ValueError`` naming the entry
    and the rule when one lacks an ``id``, a ``package`` or a reason of at least 20 characters."""
    data = tomllib.loads(text)
    entries = []
    for number, entry in enumerate(data.get("ignore", []), start=1):
        for key in ("id", "package", "reason"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ValueError(f"audit-ignore.toml: ignore entry {number}: `{key}` is required (a string)")
        if len(entry["reason"].strip()) < 20:
            raise ValueError(f"audit-ignore.toml: ignore entry {number} ({entry['id']}): `reason` must say why "
                             "the finding does not apply or cannot be fixed yet (20+ characters)")  # fmt: skip
        entries.append(Allowed(entry["id"].strip(), canonicalize_name(entry["package"]), entry["reason"].strip()))
    return entries


def apply_allow_list(
    findings: list[Finding], allowed: list[Allowed]
) -> tuple[list[Finding], list[Finding], list[Allowed]]:
    """(failing findings, allowed findings, allow-list entries that matched nothing). An entry
    matches a finding of its package by the finding's id or any of its aliases (CVE, GHSA, PYSEC)."""
    used: set[Allowed] = set()
    failing, accepted = [], []
    for finding in findings:
        ids = {finding.id, *finding.aliases}
        entry = next((a for a in allowed if a.package == finding.package and a.id in ids), None)
        if entry is None:
            failing.append(finding)
        else:
            used.add(entry)
            accepted.append(finding)
    return failing, accepted, [a for a in allowed if a not in used]


def _pip_audit(lock: Path) -> tuple[list[Finding], set[str], int]:
    """pip-audit over the lock: (findings, packages it could not look up, packages it checked)."""
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(lock), "--disable-pip", "--no-deps", "--format", "json",
           "--progress-spinner", "off", "--vulnerability-service", "pypi", "--timeout", "30"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unreachable(f"pip-audit exited {proc.returncode} without a report: {last[:300]}") from None
    findings, skipped, checked = [], set(), 0
    for dep in report.get("dependencies", []):
        name = canonicalize_name(dep["name"])
        if "skip_reason" in dep:
            skipped.add(name)
            continue
        checked += 1
        for vuln in dep.get("vulns", []):
            findings.append(Finding(name, dep["version"], vuln["id"], tuple(vuln.get("fix_versions", ())),
                                    tuple(vuln.get("aliases", ()))))  # fmt: skip
    return findings, skipped, checked


def _project_json(name: str, attempts: int = 3) -> dict[str, Any]:
    url = f"{PYPI}/{name}/json"
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data: dict[str, Any] = json.load(response)
                return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {}
            error: Exception = exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            error = exc
        time.sleep(2**attempt)
    raise Unreachable(f"{url}: {type(error).__name__}: {str(error)[:200]}")


def _latest_release_findings(name: str, version: str) -> list[Finding] | None:
    """The advisories of ``name`` ``version`` from the project JSON, or None when ``version`` is
    not the project's latest release (the JSON then says nothing about it)."""
    data = _project_json(name)
    latest = data.get("info", {}).get("version")
    if not latest or Version(latest) != Version(version):
        return None
    return [
        Finding(name, version, v["id"], tuple(v.get("fixed_in") or ()), tuple(v.get("aliases") or ()))
        for v in data.get("vulnerabilities", [])
        if not v.get("withdrawn")
    ]


def audit(lock: Path) -> Result:
    """Every package of ``lock`` checked (see the module docstring). Raises :class:`Unreachable`."""
    pins = locked_packages(lock.read_text(encoding="utf-8"))
    if not pins:
        raise ValueError(f"{lock}: no `name==version` lines: not a requirements lock")
    result = Result()
    findings, skipped, result.checked_by_pip_audit = _pip_audit(lock)
    result.findings.extend(findings)
    if skipped and not result.checked_by_pip_audit:
        # Not one per-release lookup worked: check that PyPI answers at all before going on.
        _project_json("pip", attempts=2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = sorted(skipped)
        later = dict(zip(names, pool.map(lambda n: _latest_release_findings(n, pins[n]), names), strict=True))
    for name, found in later.items():
        if found is None:
            result.unaudited.append(f"{name}=={pins[name]}")
        else:
            result.checked_latest += 1
            result.findings.extend(found)
    return result


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    args = [a for a in argv if a != "--strict"]
    lock = Path(args[0] if args else "requirements.lock")
    started = time.monotonic()
    try:
        allowed = load_allow_list(ALLOW_LIST.read_text(encoding="utf-8"))
        result = audit(lock)
    except Unreachable as exc:
        print(f"audit: FAILED: PyPI's vulnerability data is out of reach, so nothing was audited ({exc}). "
              "Retry when PyPI answers; SKIP_AUDIT=1 skips the audit on purpose.", file=sys.stderr)  # fmt: skip
        return 2
    except ValueError as exc:
        print(f"audit: FAILED: {exc}", file=sys.stderr)
        return 2
    failing, accepted, stale = apply_allow_list(result.findings, allowed)
    for f in failing:
        fixed = f"; fixed in {', '.join(f.fixed_in)}" if f.fixed_in else "; no fixed version yet"
        print(f"audit: VULNERABLE {f.package}=={f.version}: {f.id}{fixed}", file=sys.stderr)
    for f in accepted:
        print(f"audit: allowed {f.package}=={f.version}: {f.id} (reason in {ALLOW_LIST.name})", file=sys.stderr)
    for a in stale:
        print(
            f"audit: note: {ALLOW_LIST.name} entry {a.id} ({a.package}) matches no finding: remove it", file=sys.stderr
        )
    if result.unaudited:
        print(f"audit: {'FAILED' if strict else 'warning'}: not auditable here (PyPI gave advisories for neither "
              f"this release nor, as it is not the latest, the project): {', '.join(result.unaudited)}; "
              "held back by a bound, or a newer release is out: `make lock` takes what it can",
              file=sys.stderr)  # fmt: skip
    packages = result.checked_by_pip_audit + result.checked_latest + len(result.unaudited)
    print(f"audit: {packages} locked packages: {result.checked_by_pip_audit} checked by pip-audit, "
          f"{result.checked_latest} by their latest release's advisories, {len(result.unaudited)} not auditable; "
          f"{len(failing)} vulnerable, {len(accepted)} allowed ({time.monotonic() - started:.1f} s)",
          file=sys.stderr)  # fmt: skip
    if failing:
        return 1
    return 1 if strict and result.unaudited else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
