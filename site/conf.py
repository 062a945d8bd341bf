# Sphinx configuration of the documentation site (`make docs`; staged and built by tools/build_site.py).
# Sphinx + MyST-NB: installs from PyPI alone (Quarto, which nbdev_docs needs, does not), renders the notebooks with their
# committed outputs without executing them, reads the docs/*.md write-ups as MyST Markdown, and autodoc gives the API.
import os, sys
from pathlib import Path

ROOT = Path(os.environ.get('VQFLOW_SITE_ROOT', Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))                     # the worktree's package, whatever is installed

project = 'vqflow_nb'
author = 'vqflow_nb developers'
copyright = '2026 onwards, vqflow_nb developers'
extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.mathjax', 'sphinx.ext.viewcode']
root_doc = 'index'
exclude_patterns = ['_build', '_mathjax', '**.ipynb_checkpoints']
html_theme = 'furo'
html_title = 'vqflow_nb'
html_static_path = ['_mathjax']                 # MathJax 2.7 from PyPI's jupyter-server-mathjax, staged by tools/build_site.py
mathjax_path = 'mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full'   # served from the site itself: no CDN, works offline
mathjax2_config = {'tex2jax': {'inlineMath': [['\\(', '\\)']], 'displayMath': [['\\[', '\\]']],
                               'processClass': 'math|output_area', 'processEscapes': True},
                   # the package ships the STIX-Web fonts only (as Jupyter configures it): no TeX fonts to look for
                   'HTML-CSS': {'availableFonts': [], 'webFont': 'STIX-Web', 'imageFont': None, 'preferredFont': None},
                   'SVG': {'font': 'STIX-Web'}}

nb_execution_mode = 'off'                         # the committed outputs are the record: never re-run at build time
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist', 'html_image']
myst_heading_anchors = 3
suppress_warnings = ['myst.header', 'myst.xref_missing', 'mystnb.unknown_mime_type', 'misc.highlighting_failure']

autodoc_default_options = dict(members=True, undoc_members=False, show_inheritance=False)
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_mock_imports = ['ray']                    # the optional [cluster] extra
