"""The notebook server in which TFMA's own views render: `make notebooks`.

TFMA 0.47 ships the front end of its widgets (`render_slicing_metrics`, `render_time_series`,
`render_plot`) only as a classic-Notebook extension (`share/jupyter/nbextensions/
tensorflow_model_analysis/` of the venv); JupyterLab 4 and Notebook 7 cannot load it. nbclassic
(in the lock) serves the classic Notebook UI from the same Jupyter server, under /nbclassic/.
Two things make the widget draw there:
  * the lock's widget front end: widgetsnbextension 3.5.x (with ipywidgets 7.6.x, which requires
    it). TFMA's models extend `DOMWidgetModel` Backbone-style, which 3.6's ES2017 classes break
    ("n._deserialize_state is not a function", "Could not create a model");
  * TFMA's nbextension enabled: `enable()` below, which the Makefile's venv target runs (and this
    module's main, and the browser test tests/notebooks/test_tfma_widget.py, through the same code).

    python -m notebooks.server [jupyter nbclassic options...]

enables the extension (idempotent), then starts `jupyter nbclassic` on the repository's notebooks/
and opens the notebook list in your browser.
"""

import json
import os
import pathlib
import sys

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
NBEXTENSION = "tensorflow_model_analysis/extension"  # TFMA's _jupyter_nbextension_paths()
WIDGETS_NBEXTENSION = "jupyter-js-widgets/extension"  # widgetsnbextension's own, on install
# This project's own: TFMA's templates loaded so that a second TFMA widget on a page draws too
# (notebooks/tfma_loader.js says why), installed from notebooks/ by `enable()`.
LOADER = "capsnet_tfx/tfma_loader"
LOADER_SOURCE = NOTEBOOKS / "tfma_loader.js"
# The classic Notebook UI, beside Notebook 7, in the server nbclassic starts.
TREE_URL = "/nbclassic/tree"
NOTEBOOK_URL = "/nbclassic/notebooks/"


def nbconfig_file(prefix=sys.prefix) -> pathlib.Path:
    """Where `enable()` writes: the environment's (--sys-prefix) nbconfig for the notebook page."""
    return pathlib.Path(prefix, "etc", "jupyter", "nbconfig", "notebook.d",
                        "tensorflow_model_analysis.json")


def enable(prefix=sys.prefix) -> pathlib.Path:
    """Enables TFMA's nbextension for the classic Notebook UI of the environment at `prefix`,
    and this project's loader of TFMA's templates (LOADER, copied into the environment).

    Writes what `jupyter nbclassic-extension enable --py --sys-prefix tensorflow_model_analysis`
    writes, without importing TFMA (and so TensorFlow), plus the loader's entry. Idempotent;
    returns the nbconfig file. Raises if the front-end files that the lock installs are
    missing."""
    share = pathlib.Path(prefix, "share", "jupyter", "nbextensions")
    for module in (NBEXTENSION, WIDGETS_NBEXTENSION):
        if not (share / f"{module}.js").is_file():
            raise FileNotFoundError(f"{share / module}.js is missing: install requirements.lock "
                                    f"into {prefix} (make venv)")
    loader = share / f"{LOADER}.js"
    if not loader.is_file() or loader.read_bytes() != LOADER_SOURCE.read_bytes():
        loader.parent.mkdir(parents=True, exist_ok=True)
        loader.write_bytes(LOADER_SOURCE.read_bytes())
    path = nbconfig_file(prefix)
    config = json.loads(path.read_text()) if path.is_file() else {}
    wanted = {LOADER: True, NBEXTENSION: True}  # the loader first: before any widget draws
    if config.get("load_extensions") != {**config.get("load_extensions", {}), **wanted}:
        config["load_extensions"] = {**wanted, **config.get("load_extensions", {}), **wanted}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def command(root_dir=NOTEBOOKS, *, kernel_dir=None, ip="127.0.0.1", port=None, token=None,
            open_browser=True) -> list:
    """The `jupyter nbclassic` command line: contents from `root_dir`; kernels start in the
    notebook's dir under `kernel_dir` (default: root_dir). As root, with --allow-root (Jupyter
    refuses root otherwise; the server listens on `ip` only and asks for its token)."""
    args = [os.path.join(os.path.dirname(sys.executable), "jupyter-nbclassic"),
            f"--ServerApp.root_dir={root_dir}", f"--ServerApp.ip={ip}",
            f"--ServerApp.default_url={TREE_URL}",
            f"--ServerApp.open_browser={open_browser}"]
    # (Not --NotebookApp.show_banner=False: nbclassic 1.3.3's page script then fails, "Cannot
    # read properties of null (reading 'addEventListener')".)
    if kernel_dir is not None:
        args.append(f"--MappingKernelManager.root_dir={kernel_dir}")
    if port is not None:
        args += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        args.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    print(f"TFMA's nbextension enabled: {enable()}", flush=True)
    args = command() + list(argv)
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
