"""The project's dependencies point one way (docs/architecture.md):

    data  <-  models  <-  components  <-  pipeline  <-  runners, notebooks, bench

A package imports only from packages to its left (and itself); models/capsnet, the model itself,
imports nothing of the project but data. Checked by parsing every import statement, those inside
functions included; tests/ may import anything.
"""

import ast
import os

import pytest

from tests.conftest import REPO

LAYERS = {"data": 0, "models": 1, "components": 2, "pipeline": 3,
          "local_runner": 4, "kubeflow_runner": 4, "notebooks": 4, "bench": 4, "docker": 4}


def project_imports(path):
    """(line, imported project module) for every import of a project module in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS:
                yield node.lineno, name


def project_files():
    for top in LAYERS:
        path = os.path.join(REPO, top)
        if os.path.isfile(path + ".py"):
            yield path + ".py"
        for root, _, files in os.walk(path):
            yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


FILES = sorted(project_files())


def test_every_package_is_covered():
    tops = {os.path.relpath(f, REPO).split(os.sep)[0].removesuffix(".py") for f in FILES}
    assert tops == set(LAYERS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_imports_point_one_way(path):
    rel = os.path.relpath(path, REPO)
    top = rel.split(os.sep)[0].removesuffix(".py")
    in_capsnet = rel.startswith(os.path.join("models", "capsnet") + os.sep)
    for line, name in project_imports(path):
        target = name.split(".")[0]
        assert LAYERS[target] <= LAYERS[top] and (target == top or LAYERS[target] < LAYERS[top]), \
            f"{rel}:{line} imports {name}: {top} may not depend on {target}"
        if in_capsnet:
            assert name.startswith(("data", "models.capsnet")), \
                f"{rel}:{line} imports {name}: models/capsnet imports nothing but data and itself"


def test_the_check_catches_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline import configs\n")
    assert list(project_imports(str(bad))) == [(2, "pipeline"), (2, "pipeline.configs")]
