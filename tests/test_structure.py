"The package's shape: no import cycle between its modules, no private name imported across modules."
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'vqflow_nb'

def _imports():
    "{module: [(imported module, [names])]} for every vqflow_nb module, lazy imports inside functions included."
    out = {}
    for f in sorted(PKG.glob('*.py')):
        if f.name == '_modidx.py': continue
        deps = []
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ''
                if node.level == 1: mod = f'vqflow_nb.{mod}' if mod else 'vqflow_nb'
                if mod == 'vqflow_nb': deps += [(f'vqflow_nb.{a.name}', []) for a in node.names]
                elif mod.startswith('vqflow_nb.'): deps.append((mod, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                deps += [(a.name, []) for a in node.names if a.name.startswith('vqflow_nb.')]
        out[f'vqflow_nb.{f.stem}'] = deps
    return out

def test_no_private_names_across_modules():
    bad = [f'{m} imports {n} from {d}' for m, deps in _imports().items() for d, names in deps for n in names
           if n.startswith('_') and n != '__version__']
    assert not bad, bad

def test_no_import_cycles():
    graph = {m: {d for d, _ in deps if d != m and d in _imports()} for m, deps in _imports().items()}
    state, cycles = {}, []
    def visit(m, path):
        if state.get(m) == 1: cycles.append(path[path.index(m):] + [m]); return
        if state.get(m) == 2: return
        state[m] = 1
        for d in sorted(graph.get(m, ())): visit(d, path + [m])
        state[m] = 2
    for m in sorted(graph): visit(m, [])
    assert not cycles, cycles

def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    "The checks above can fail: two modules importing each other and a private name are found."
    (tmp_path/'a.py').write_text('from .b import _x\n'); (tmp_path/'b.py').write_text('from .a import y\n')
    monkeypatch.setattr(__import__(__name__), 'PKG', tmp_path)
    import pytest
    with pytest.raises(AssertionError): test_no_private_names_across_modules()
    with pytest.raises(AssertionError): test_no_import_cycles()

def test_trainer_and_runner_ask_no_method_for_its_hooks():
    "The method contract is code (07_method's `Method`): the trainer and the run layer never probe a method with hasattr/getattr."
    import re
    for mod in ('train', 'run', 'record', 'execute', 'replicate', 'plan', 'cluster'):
        src = (PKG/f'{mod}.py').read_text()
        bad = re.findall(r'(?:hasattr|getattr)\((?:method|model)\b[^)]*\)', src)
        assert not bad, (mod, bad)
