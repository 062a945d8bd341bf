#!/usr/bin/env python
"""Give every notebook under nbs/ the `python3` kernelspec (papermill needs one; notebooks authored as text lack it)."""
import sys
from pathlib import Path
import nbformat

SPEC = dict(display_name='python3', language='python', name='python3')
for fn in sorted(Path(__file__).resolve().parents[1].glob('nbs/**/*.ipynb')):
    nb = nbformat.read(fn, as_version=4)
    if nb.metadata.get('kernelspec') != SPEC:
        nb.metadata['kernelspec'] = SPEC
        nbformat.write(nb, fn); print('kernelspec set:', fn.name)
