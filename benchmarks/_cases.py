"""What the per-method benchmarks share: each case runs in a fresh subprocess of the calling script (so its peak
resident memory is its own), and reports one JSON line."""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def vmhwm_gb() -> float:
    "This process's peak resident memory (VmHWM), GB."
    for l in open('/proc/self/status'):
        if l.startswith('VmHWM'): return int(l.split()[1]) / 1024**2

def run_cases(script:str, cases:list) -> list:
    "Run `script --case NAME STEPS` for each (name, steps, what) of `cases`; the rows of their JSON output."
    rows = []
    for name, steps, what in cases:
        print(f'running {name} ...', flush=True)
        out = subprocess.run([sys.executable, script, '--case', name, str(steps)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode: print(out.stderr[-3000:]); sys.exit(1)
        rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), what=what)); print(rows[-1], flush=True)
    return rows
