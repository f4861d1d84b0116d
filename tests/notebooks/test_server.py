"""notebooks/server.py, `make notebooks`: what enabling TFMA's views writes into an environment,
and the server's command line."""

import json

import pytest

from notebooks import server


def fake_prefix(tmp_path):
    share = tmp_path / "share" / "jupyter" / "nbextensions"
    for module in (server.NBEXTENSION, server.WIDGETS_NBEXTENSION):
        (share / f"{module}.js").parent.mkdir(parents=True, exist_ok=True)
        (share / f"{module}.js").write_text("define([], function () {});")
    return tmp_path


def test_enable_turns_on_the_loader_then_tfmas_extension_and_is_idempotent(tmp_path):
    prefix = fake_prefix(tmp_path)
    path = server.enable(prefix)
    config = json.loads(path.read_text())
    assert list(config["load_extensions"]) == [server.LOADER, server.NBEXTENSION]
    assert all(config["load_extensions"].values())
    installed = prefix / "share" / "jupyter" / "nbextensions" / f"{server.LOADER}.js"
    assert installed.read_bytes() == server.LOADER_SOURCE.read_bytes()
    before = path.stat().st_mtime_ns
    assert server.enable(prefix) == path and path.stat().st_mtime_ns == before
    # Someone's own extensions stay; a stale copy of the loader is replaced.
    path.write_text(json.dumps({"load_extensions": {"other/ext": True}}))
    installed.write_text("old")
    server.enable(prefix)
    assert json.loads(path.read_text())["load_extensions"] == {
        server.LOADER: True, "other/ext": True, server.NBEXTENSION: True}
    assert installed.read_bytes() == server.LOADER_SOURCE.read_bytes()


def test_enable_refuses_an_environment_without_the_locked_front_ends(tmp_path):
    with pytest.raises(FileNotFoundError, match="install requirements.lock"):
        server.enable(tmp_path)


def test_the_loader_loads_tfmas_templates_with_amd_hidden_under_tfmas_own_url():
    source = server.LOADER_SOURCE.read_text()
    # The URL TFMA's own loader looks for (index.js: data-base-url + this), so it adds no second.
    assert '"nbextensions/tensorflow_model_analysis/vulcanized_tfma.js"' in source
    assert "window.define.amd = undefined" in source and "window.define.amd = amd" in source


def test_the_command_serves_the_classic_ui_on_loopback():
    args = server.command(port=8899, token="t", open_browser=False)
    assert args[0].endswith("jupyter-nbclassic")
    assert "--ServerApp.ip=127.0.0.1" in args and "--ServerApp.port=8899" in args
    assert f"--ServerApp.default_url={server.TREE_URL}" in args
