"""Where the Hydra configs live — the one definition every entry point and test imports.

The repository keeps ``conf/`` at its top level. The wheel ships the same files inside the package
as ``transquant/conf/`` (``pyproject.toml`` maps the package ``transquant.conf`` to ``conf/``):

* installed from a wheel (``pip install .``): ``<site-packages>/transquant/conf``;
* a checkout or an editable install (``pip install -e .``): ``<repo>/conf``, so edits there take
  effect at once (the editable install maps the package to the checkout; nothing is copied).

The packaged copy wins when both exist: beside an installed package, ``../conf`` would be a
stranger's ``<site-packages>/conf``. Hydra needs a real directory, so no zip import is supported.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the transquant package


def _conf_path() -> Path:
    candidates = (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf")
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError("transquant: no Hydra configs (conf/config.yaml) in "
                            + " or ".join(str(c) for c in candidates)
                            + "; reinstall the package (pip install .) or run from a checkout")


CONF_PATH: Path = _conf_path()
"""The config directory as a :class:`~pathlib.Path`."""
CONF_DIR: str = str(CONF_PATH)
"""The same as an absolute ``str`` (what ``hydra.main`` and ``initialize_config_dir`` take)."""
