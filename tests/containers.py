"""A real Docker engine for the tests (no tests here): dockerd, local base images, the Dockerfile and compose.

No container registry is reachable here, so the base images are made locally: ``debootstrap`` a
Debian root file system and ``docker import`` it. They are kept (under a label that names their
recipe) and reused by later runs; so are the project image's build layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from processes import REPO, ManagedProcess, wait_until

DOCKER_DIR = REPO / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
WHEELHOUSE = DOCKER_DIR / "wheels"
BUILD_CERTS = DOCKER_DIR / "certs"

#: The host's trust store; copied into docker/certs so that pip inside the build reaches the index
#: through whatever TLS interception this machine's network does.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RECIPE_LABEL = "org.cogalora.test.recipe"


# ---- the Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and line continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str | None]:
    """Each ARG's default (None where it has none); the first declaration wins."""
    defaults: dict[str, str | None] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG":
            name, has_default, value = rest.partition("=")
            defaults.setdefault(name, value if has_default else None)
    return defaults


# ---- the engine ------------------------------------------------------------------------------


class NoDockerEngine(Exception):
    """No Docker engine runs here and none can be started (the reason is the message)."""


def docker(*args: str, timeout: float = 120, stdin: bytes | None = None) -> str:
    """Run the docker CLI; its stdout, or an AssertionError with its output."""
    done = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr.decode()[-4000:]}")
    return done.stdout.decode()


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


class DockerEngine:
    """The engine the tests use: the one already running, or a ``dockerd`` started here.

    ``close()`` stops the daemon only if it was started here; images and build cache stay on disk
    (/var/lib/docker) for the next run either way.
    """

    def __init__(self, log_dir: Path, timeout: float = 60.0) -> None:
        self.daemon: ManagedProcess | None = None
        if shutil.which("docker") is None:
            raise NoDockerEngine("the docker CLI is not installed (apt-get install docker.io)")
        if engine_answers():
            return
        if shutil.which("dockerd") is None:
            raise NoDockerEngine("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise NoDockerEngine("no Docker engine answers, and starting dockerd needs root")
        # nice: the daemon runs the image builds (containerd and the containers inherit it), and the
        # machine may be shared; a compose client's own nice would not reach them.
        self.daemon = ManagedProcess("dockerd", ["nice", "-n", "10", "dockerd"], log_dir / "dockerd.log")
        try:
            wait_until(self._answers, timeout, interval=0.5, what="dockerd answering `docker info`")
        except (TimeoutError, RuntimeError) as exc:
            log = self.daemon.log_tail(2000)
            self.close()
            raise NoDockerEngine(f"dockerd did not start: {exc}\n--- dockerd log ---\n{log}") from exc

    def _answers(self) -> bool:
        assert self.daemon is not None
        self.daemon.check_alive()
        return engine_answers()

    @property
    def started_here(self) -> bool:
        return self.daemon is not None

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=30)
            self.daemon = None


# ---- local base images -----------------------------------------------------------------------


@dataclass(frozen=True)
class DebianImage:
    """A Debian bookworm image made without a registry: debootstrap (minbase + ``packages``), then import.

    ``changes``: Dockerfile instructions applied at import (``docker import --change``);
    ``directories``: (path, owner user) created in the root file system before import.
    """

    tag: str
    packages: tuple[str, ...]
    changes: tuple[str, ...] = ()
    directories: tuple[tuple[str, str], ...] = ()

    @property
    def recipe(self) -> str:
        text = json.dumps([self.packages, self.changes, self.directories])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def exists(self) -> bool:
        """The image is there and was made from this recipe."""
        done = subprocess.run(
            ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{RECIPE_LABEL}"}}}}', self.tag],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.returncode == 0 and done.stdout.strip() == self.recipe

    def make(self, workdir: Path) -> None:
        """debootstrap into ``workdir`` (removed afterwards) and import the result as ``tag``."""
        rootfs = workdir / "rootfs"
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(self.packages)}", "bookworm", str(rootfs)]
        done = subprocess.run(["nice", "-n", "10", *command], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
        try:
            # What apt needs only to install more: the image has no use for it (about 100 MB).
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            for path, user in self.directories:
                uid, gid = _passwd_ids(rootfs, user)
                target = rootfs / path.lstrip("/")
                target.mkdir(parents=True, exist_ok=True)
                os.chown(target, uid, gid)
            changes = [*self.changes, f"LABEL {RECIPE_LABEL}={self.recipe}"]
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            try:
                imported = subprocess.run(
                    ["docker", "import", *(f"--change={change}" for change in changes), "-", self.tag],
                    stdin=tar.stdout,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(timeout=60)
            if imported.returncode != 0 or tar.returncode != 0:
                raise AssertionError(f"docker import {self.tag} failed:\n{imported.stderr[-4000:]}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)


def _passwd_ids(rootfs: Path, user: str) -> tuple[int, int]:
    for line in (rootfs / "etc" / "passwd").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {user!r} in {rootfs}/etc/passwd")


#: What the project image is built FROM here (BASE_IMAGE), in place of python:3.11-slim.
PYTHON_BASE = DebianImage("local/python:3.11-bookworm", ("python3", "python3-venv", "python3-pip", "ca-certificates"))

#: PROMETHEUS_IMAGE here: Debian's prometheus package, started like prom/prometheus (the compose
#: command passes only flags) and as its unprivileged user; wget for compose's healthcheck.
PROMETHEUS = DebianImage(
    "local/prometheus:bookworm",
    ("prometheus", "wget"),
    changes=('ENTRYPOINT ["/usr/bin/prometheus"]', "USER prometheus", "WORKDIR /prometheus", "EXPOSE 9090"),
    directories=(("/prometheus", "prometheus"),),
)


def ensure_images(images: list[DebianImage]) -> list[str]:
    """Make the images that are missing (in parallel: debootstrap mostly waits on downloads); their tags."""
    missing = [image for image in images if not image.exists()]
    if missing and shutil.which("debootstrap") is None:
        raise AssertionError(
            f"{', '.join(image.tag for image in missing)} must be made, and debootstrap is not installed "
            "(apt-get install debootstrap, or bash scripts/setup.sh --dev)"
        )
    with tempfile.TemporaryDirectory(prefix="cogalora-rootfs-", dir="/var/tmp") as scratch:
        workdirs = [Path(scratch) / str(i) for i in range(len(missing))]
        with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
            list(pool.map(lambda pair: pair[0].make(pair[1]), zip(missing, workdirs, strict=True)))
    return [image.tag for image in missing]


# ---- build inputs ----------------------------------------------------------------------------


def stock_build_inputs() -> str:
    """Fill docker/wheels and docker/certs as a proxied, partly offline user would; says what it did.

    The wheelhouse gets the torch wheel the Dockerfile pins (with its dependencies), from this
    machine's pip configuration (here: the CPU wheel on local disk, found through PIP_FIND_LINKS);
    the build then needs no PyTorch index. The host's CA bundle lets pip inside the build reach the
    package index for the rest. Files already there are kept.
    """
    args = dockerfile_args()
    torch = f"torch=={args['TORCH_VERSION']}+{args['TORCH_VARIANT']}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(WHEELHOUSE), torch],
        capture_output=True,
        text=True,
        timeout=600,
    )
    notes = [f"wheelhouse: {torch} and its dependencies"]
    if done.returncode != 0:  # not fatal: the build then takes torch from the PyTorch index
        notes = [f"wheelhouse: {torch} is not available to pip here ({done.stderr.strip()[-300:]})"]
    if HOST_CA_BUNDLE.is_file():
        target = BUILD_CERTS / "host-ca-certificates.crt"
        if not target.is_file() or target.read_bytes() != HOST_CA_BUNDLE.read_bytes():
            shutil.copyfile(HOST_CA_BUNDLE, target)
        notes.append(f"certs: {HOST_CA_BUNDLE}")
    return "; ".join(notes)


# ---- compose ---------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """``docker-compose`` (Debian's 1.29) when installed, else the ``docker compose`` plugin (v2), else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def compose_variables() -> set[str]:
    """Every variable docker/compose.yaml interpolates (``${NAME:-default}``)."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text(encoding="utf-8")))


class ComposeProject:
    """docker/compose.yaml as project ``name``, with ``variables`` in the environment it interpolates."""

    def __init__(self, name: str, variables: dict[str, str], log_dir: Path) -> None:
        command = compose_command()
        if command is None:
            raise AssertionError("neither docker-compose nor the docker compose plugin is installed")
        self.name = name
        self.command = [*command, "-f", str(COMPOSE_FILE), "-p", name]
        # Only the variables given here: a developer's own COGALORA_* or image settings must not leak in.
        self.env = {key: value for key, value in os.environ.items() if key not in compose_variables()}
        self.env.update(variables)
        self.log_dir = log_dir

    def run(self, *args: str, timeout: float = 300) -> str:
        """Run a compose command; its stdout, or an AssertionError with its output."""
        done = subprocess.run([*self.command, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        with (self.log_dir / "compose.log").open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}\n")
        if done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def container(self, service: str) -> str:
        """The id of the service's (single) container, running or stopped."""
        ids = self.run("ps", "-a", "-q", service, timeout=60).split()  # -a: v2 lists only running ones otherwise
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict:
        return json.loads(docker("inspect", self.container(service), timeout=60))[0]

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks still labelled with this project."""
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for kind in ("container", "volume", "network"):
            extra = ["-a"] if kind == "container" else []
            found += [f"{kind} {item}" for item in docker(kind, "ls", *extra, "-q", "--filter", label).split()]
        return found
