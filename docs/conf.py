"""Sphinx configuration of the pyro_vae documentation site."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "pyro_vae"
author = "pyro_vae authors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "spec_reference"]
myst_enable_extensions = ["dollarmath"]
nb_execution_mode = "off"
html_theme = "furo"
html_title = "pyro_vae"
exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
myst_heading_anchors = 2
