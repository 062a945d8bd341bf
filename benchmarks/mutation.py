"""Mutation testing of the maths modules with cosmic-ray: how many plausible one-token breaks the fast pytest tests catch.

    python benchmarks/mutation.py                 # sample, run, write results/benchmarks/mutation.md (~30-40 min on 2 cores)
    python benchmarks/mutation.py --n 60          # a quicker, smaller sample
    python benchmarks/mutation.py --hand          # replay the hand-written breaks of issue 23 against tests/test_pinned.py
    python benchmarks/mutation.py --report-only   # rewrite the markdown from the last session's database

Why cosmic-ray (PyPI `cosmic-ray`): it mutates the source file in place and runs an arbitrary test command, so it works
with nbdev's exported modules and an editable install unchanged, and it mutates every function, including the
`fastcore.patch`-decorated methods that carry most of this package's maths (`VQFlow.score`, `HGAD.finalize_scores`,
`FusionCoupling.log_e`, ...). mutmut 3 skips decorated functions and needs its own `mutants/` copy of the tree on the
import path. Its work database (SQLite) keeps every mutant, its diff and its outcome; `cr-report` reads it too.

How a run goes: the package and tests are copied to a scratch folder (never mutating the working tree); cosmic-ray's
`init` lists every mutant of the modules in `SCOPE`; we keep the ones inside the listed functions, drop operators whose
mutants are crashes by construction on float tensors (see `_plausible`), and draw a seeded sample stratified by function.
Each mutant is applied by cosmic-ray (`mutate_and_test`) and judged by the module's fast pytest subset, `-x` (stop at the
first failure). The tests run in a child forked from a server that has already imported torch, numpy, scikit-learn...
(not `vqflow_nb`), which saves ~5 s of imports per mutant; the child imports the mutated package from the scratch copy.
"""
from __future__ import annotations
import argparse, ast, json, os, random, shutil, signal, socket, subprocess, sys, time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / 'results' / '_scratch' / 'mutation'
MD = ROOT / 'results' / 'benchmarks' / 'mutation.md'

# module -> functions mutated (qualified as Class.method; a fastcore `@patch` function by its `self:`/`cls:` annotation)
SCOPE = {
    'flows': ['positional_encoding_2d', 'ConvLNSubnet.forward', 'conv_broadcast', '_tap_mask', '_global_affine_init',
              'AllInOneBlock._mix', 'AllInOneBlock.scale', 'AllInOneBlock._global_affine', 'AllInOneBlock._global_logdet',
              'AllInOneBlock._scale_shift', 'AllInOneBlock._couple', 'AllInOneBlock.forward', 'SequenceFlow.forward',
              'FusionSubnet.forward', 'FusionCoupling._permute', 'FusionCoupling.log_e', 'FusionCoupling._affine',
              'FusionCoupling._log_det', 'FusionCoupling.forward'],
    'codebooks': ['EMACodebook.nearest', 'EMACodebook._ema_update', 'EMACodebook.forward', 'kmeans', 'EMACodebook.init_codes',
                  'CPC.forward', 'CSPC._local', 'CSPC.forward', 'HierarchicalCodebooks.forward'],
    'prior': ['MixedGaussianPrior.params', 'MixedGaussianPrior.forward', 'MixedGaussianPrior.log_prob', 'mixture_log_prob'],
    'vqflow': ['VQFlow.conditions', 'VQFlow.forward', 'flow_nll', 'VQFlow.loss', 'vqflow_maps', 'VQFlow.score'],
    'hgad': ['init_main_centres', 'sq_dists', 'HierarchicalPrior.centres', 'HierarchicalPrior.inter_logits',
             'HierarchicalPrior.intra_logits', 'HierarchicalPrior.log_prob_inter', 'HierarchicalPrior.log_prob_intra', 'loss_g',
             'smooth_onehot', 'loss_mi', 'loss_e', 'loss_g_intra', 'logp_per_dim', 'loss_z', 'hgad_losses', 'meta_layout',
             'hgad_lr_factor', 'HGAD._meta', 'HGAD.lr_factor', 'HGAD.stage2', 'HGAD._level_loss', 'HGAD.loss',
             'anomaly_from_levels', 'HGAD._predict_class', 'HGAD.score', 'HGAD.finalize_scores'],
    'hvqtrans': ['ClassCodebooks.quantise', 'HVQTrans._quantise', 'pot_score', 'HVQTrans.loss', 'HVQTrans.route', 'hvq_maps',
                 'HVQTrans.score'],
    'metrics': ['f1_max', 'image_metrics', 'trapezoid_to', 'pro_curve_exact', '_pro_from_sorted', '_approx_thresholds',
                '_approx_from_curve', 'pro_curve_approx', 'aupro', '_roc_pr_from_sorted', 'pixel_metrics', 'class_metrics',
                '_with_mean'],
    'method': ['Schedule.lr_factor'],
    'train': ['set_lr', '_selection_score', '_record_eval', 'FitResult.best_per_metric', 'metric_table'],
}
# the fast pytest subset judging a module's mutants: tests/test_pinned.py first (6 s), then the module's own file(s)
SLOW = ['test_approx_equals_independent_reference_at_800_thresholds', 'test_static_padding_values_and_identity_at_native_size',
        'test_vqflow_parameter_count', 'test_viz_returns_figures', 'test_image_mode_backbone']
TESTS = dict(flows=['test_flows.py', 'test_hgad.py'], codebooks=['test_codebooks.py', 'test_vqflow_ablation.py', 'test_hvqtrans.py'],
             prior=['test_vqflow_ablation.py', 'test_codebooks.py', 'test_amp.py'], vqflow=['test_vqflow_ablation.py', 'test_amp.py'],
             hgad=['test_hgad.py'], hvqtrans=['test_hvqtrans.py'], metrics=['test_metrics.py'],
             method=['test_hgad.py', 'test_hvqtrans.py'], train=['test_hgad.py', 'test_hvqtrans.py', 'test_amp.py'])


def pytest_args(module:str) -> list:
    files = ['tests/test_pinned.py', 'tests/test_pinned_*.py'] + [f'tests/{f}' for f in TESTS[module]]   # globs: expanded by the server
    return ['-x', '-q', '-p', 'no:cacheprovider', '-k', ' and '.join(f'not {t}' for t in SLOW), *files]


# ----------------------------------------------------------------------------------------- test server (fork per run)
HEAVY = ['torch', 'numpy', 'pandas', 'scipy.ndimage', 'scipy.stats', 'sklearn.metrics', 'skimage.measure', 'einops',
         'fastcore.basics', 'tqdm.auto', 'timm', 'pytest', 'matplotlib', 'torchvision']


def serve(sock_path:str, root:str):
    "Import the heavy dependencies once, then run each request's pytest in a forked child importing `root`'s package."
    import importlib
    for m in HEAVY:
        try: importlib.import_module(m)
        except ImportError: pass
    assert not any(k.split('.')[0] == 'vqflow_nb' for k in sys.modules), 'the server must not import the package'
    sys.dont_write_bytecode = True      # the mutated sources change faster than .pyc timestamps can tell
    if os.path.exists(sock_path): os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX); srv.bind(sock_path); srv.listen(1)
    while True:
        conn, _ = srv.accept()
        req = json.loads(conn.makefile().readline())
        if req.get('stop'): conn.close(); break
        t0 = time.time()
        pid = os.fork()
        if pid == 0:   # child: fresh import of the (mutated) package from `root`
            fd = os.open(req.get('log', os.devnull), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1); os.dup2(fd, 2)
            os.chdir(root); sys.path.insert(0, root)
            os.environ['MPLBACKEND'] = 'Agg'
            import glob, pytest
            args = [x for a in req['args'] for x in (sorted(glob.glob(a)) if '*' in a else [a])]
            try: rc = int(pytest.main(args))
            except BaseException: rc = 3
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
        rc = None
        while rc is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done: rc = os.waitstatus_to_exitcode(status)
            elif time.time() - t0 > req['timeout']: os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); rc = 124
            else: time.sleep(0.02)
        conn.sendall(json.dumps(dict(rc=rc, seconds=time.time() - t0)).encode() + b'\n'); conn.close()
    srv.close(); os.unlink(sock_path)


def ask(sock_path:str, **req) -> dict:
    s = socket.socket(socket.AF_UNIX); s.connect(sock_path)
    s.sendall(json.dumps(req).encode() + b'\n')
    out = s.makefile().readline(); s.close()
    return json.loads(out) if out else {}


def client(sock_path:str, module:str, timeout:float):
    "cosmic-ray's test command: run the module's subset in the server; exit with pytest's code (0 = the mutant survived)."
    sys.exit(ask(sock_path, args=pytest_args(module), timeout=timeout).get('rc', 3))


DRIVER = __file__

class Server:
    "The test server, started from a copy of this script in the scratch folder (edits to the script cannot reach a run)."
    def __init__(self, root:Path):
        global DRIVER
        DRIVER = str(root / 'mutation_driver.py'); shutil.copy(__file__, DRIVER)
        self.sock = str(root / 'server.sock')
        self.log = open(root / 'server.log', 'w')
        self.proc = subprocess.Popen([sys.executable, DRIVER, 'serve', '--socket', self.sock, '--root', str(root)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):
            if os.path.exists(self.sock): break
            if self.proc.poll() is not None: raise RuntimeError(f'test server died: see {root / "server.log"}')
            time.sleep(0.1)
    def run(self, args, timeout, log=None): return ask(self.sock, args=args, timeout=timeout, **({'log': str(log)} if log else {}))
    def close(self):
        try: ask(self.sock, stop=True)
        except OSError: pass
        self.proc.wait(timeout=30); self.log.close()


# ----------------------------------------------------------------------------------------- scope and sampling
def scratch_copy(dst:Path) -> Path:
    "The package, tests and settings in `dst` (no __pycache__): cosmic-ray mutates these files, never the working tree."
    if dst.exists(): shutil.rmtree(dst)
    dst.mkdir(parents=True)
    ign = shutil.ignore_patterns('__pycache__', '*.pyc')
    for d in ('vqflow_nb', 'tests'): shutil.copytree(ROOT / d, dst / d, ignore=ign)
    for f in ('settings.ini', 'setup.py', 'pyproject.toml'): shutil.copy(ROOT / f, dst / f)
    return dst


def definitions(path:Path) -> list:
    "(qualified name, first line incl. decorators, last line) of every function and method of a module."
    tree, out = ast.parse(path.read_text()), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args.args[0].annotation if node.args.args else None
            patched = any('patch' in ast.unparse(d) for d in node.decorator_list)
            name = f'{ast.unparse(a)}.{node.name}' if patched and a is not None else node.name
            out.append((name, min([node.lineno, *[d.lineno for d in node.decorator_list]]), node.end_lineno))
        elif isinstance(node, ast.ClassDef):
            for f in node.body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((f'{node.name}.{f.name}', min([f.lineno, *[d.lineno for d in f.decorator_list]]), f.end_lineno))
    return out


def annotation_spans(path:Path) -> list:
    "((line, col), (end line, end col)) of every annotation: never evaluated under `from __future__ import annotations`."
    src = path.read_text(); lines = src.splitlines()
    ch = lambda ln, byte: len(lines[ln - 1].encode()[:byte].decode(errors='ignore'))   # ast columns are UTF-8 bytes
    out = []
    for node in ast.walk(ast.parse(src)):
        anns = []
        if isinstance(node, ast.arg) and node.annotation is not None: anns.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None: anns.append(node.returns)
        if isinstance(node, ast.AnnAssign): anns.append(node.annotation)
        out += [((a.lineno, ch(a.lineno, a.col_offset)), (a.end_lineno, ch(a.end_lineno, a.end_col_offset))) for a in anns]
    return out


BITS = ('BitOr', 'BitAnd', 'BitXor', 'LShift', 'RShift')

def _plausible(op:str) -> bool:
    "Operators kept: one-token slips that run on tensors (arithmetic <-> bitwise/shift and unary ~/not on numbers only crash)."
    p = op.split('/')[-1].split('_')
    if p[0] == 'RemoveDecorator': return False   # drops @patch (method missing: a crash) or @torch.no_grad (no behaviour)
    if p[0] == 'ReplaceBinaryOperator': return not (p[2] in BITS and p[1] not in BITS)
    if p[0] == 'ReplaceComparisonOperator': return p[2] not in ('Is', 'IsNot') or p[1] in ('Is', 'IsNot')
    if p[0] == 'ReplaceUnaryOperator': return p[2] not in ('Invert', 'Not') or p[1] == 'Not'
    return True


def build_session(db_path:Path, root:Path, n:int, seed:int) -> dict:
    "cosmic-ray `init` over the scope's modules; keep in-scope plausible mutants; mark all but a stratified sample skipped."
    from cosmic_ray.commands.init import init
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkResult, WorkerOutcome
    if db_path.exists(): db_path.unlink()
    paths = [root / 'vqflow_nb' / f'{m}.py' for m in SCOPE]
    with use_db(str(db_path), WorkDB.Mode.create) as db:
        init(paths, db, {})
        spans = {m: [d for d in definitions(root / 'vqflow_nb' / f'{m}.py') if d[0] in SCOPE[m]] for m in SCOPE}
        for m, names in SCOPE.items():
            missing = set(names) - {d[0] for d in spans[m]}
            if missing: raise SystemExit(f'scope: {m}.py has no function(s) {sorted(missing)}')
        anns = {m: annotation_spans(root / 'vqflow_nb' / f'{m}.py') for m in SCOPE}
        by_fn, skip, total = defaultdict(list), [], 0
        for item in db.work_items:
            mut = item.mutations[0]
            mod, line = Path(mut.module_path).stem, mut.start_pos[0]
            fn = next((d[0] for d in spans[mod] if d[1] <= line <= d[2]), None)
            total += 1
            in_ann = any(a <= tuple(mut.start_pos) < b for a, b in anns[mod])
            if fn is None or in_ann or not _plausible(mut.operator_name): skip.append(item.job_id)
            else: by_fn[mod, fn].append((tuple(mut.start_pos), mut.operator_name, mut.occurrence, item.job_id))
        in_scope = sum(len(v) for v in by_fn.values())
        rng, keep = random.Random(seed), set()
        frac = min(1.0, n / max(in_scope, 1))
        for k in sorted(by_fn):   # stratified: each function gets its share (at least 1); source order, so a seed is a sample
            ids = [j for *_, j in sorted(by_fn[k])]
            keep.update(rng.sample(ids, min(len(ids), max(1, round(frac * len(ids))))))
        by_fn = {k: [j for *_, j in v] for k, v in by_fn.items()}
        skip += [j for ids in by_fn.values() for j in ids if j not in keep]
        db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
        fn_of = {j: f'{m}.{f}' for (m, f), ids in by_fn.items() for j in ids}
    meta = dict(total=total, in_scope=in_scope, sampled=len(keep), seed=seed, sample_order='source', fn_of={j: fn_of[j] for j in keep},
                per_fn_in_scope={f'{m}.{f}': len(v) for (m, f), v in sorted(by_fn.items())})
    (db_path.parent / 'session.json').write_text(json.dumps(meta, indent=1))
    return meta


def execute(db_path:Path, root:Path, minutes:float, server:Server):
    "Run the pending sampled mutants (resumable) until done or the time budget is spent."
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    base = {}
    for m in SCOPE:   # unmutated: the subset must pass, and its time sets the timeout
        r = server.run(pytest_args(m), timeout=600, log=root / f'baseline_{m}.log')
        if r['rc'] != 0: raise SystemExit(f'baseline tests fail for {m} (rc {r["rc"]}): see {root}/baseline_{m}.log')
        base[m] = r['seconds']; print(f'baseline {m}: {r["seconds"]:.1f} s', flush=True)
    t0, done = time.time(), 0
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        key = lambda it: (str(it.mutations[0].module_path), tuple(it.mutations[0].start_pos), it.mutations[0].operator_name, it.mutations[0].occurrence)
        pending = sorted(db.pending_work_items, key=key)
        random.Random(0).shuffle(pending)   # a budget cut leaves a uniform subsample, not the first modules only
        for item in pending:
            if time.time() - t0 > minutes * 60: print('time budget spent', flush=True); break
            m = Path(item.mutations[0].module_path).stem
            timeout = max(60., 3 * base[m])
            cmd = f'{sys.executable} {DRIVER} client --socket {server.sock} --module {m} --timeout {timeout}'
            res = mutate_and_test(item.mutations, cmd, timeout + 30)
            db.set_result(item.job_id, res); done += 1
            if done % 10 == 0: print(f'{done}/{len(pending)} mutants, {time.time() - t0:.0f} s', flush=True)
    return dict(base=base, seconds=time.time() - t0, run=done)


# ----------------------------------------------------------------------------------------- survivors' dispositions
# (module, mutated line as cosmic-ray writes it, stripped) -> why the mutant is equivalent, or which test now pins it
# (the survivors of the committed run, seed 0; a mutant not listed here shows as 'open' in the report)
DISPOSITIONS: dict = {
    ('codebooks', "h = h + self.upsampler(F.interpolate(sem, size=feat.shape[-2:], mode='bilinear', align_corners=True))"):
        'test_pinned_mutants.py::test_cspc_residual_pattern_is_anchor_plus_quantised_residual',
    ('codebooks', "pattern = h if self.quantize <= 'residual' else torch.cat([h, pe], 1)"):
        'test_pinned_mutants.py::test_cspc_without_codebook_naive_pattern_keeps_the_pe',
    ('codebooks', "pattern = anchor * rearrange(qr, 'b h w c -> b c h w')"):
        'test_pinned_mutants.py::test_cspc_residual_pattern_is_anchor_plus_quantised_residual',
    ('codebooks', 'if len(feats) > len(self.channels):'):
        'test_pinned_mutants.py::test_hierarchical_codebooks_refuse_a_missing_map',
    ('flows', 'if height < 2 or width < 1:'):
        'test_pinned_mutants.py::test_positional_encoding_of_a_single_row_or_column',
    ('flows', 'if conv.groups != 1 or conv.padding_mode != "zeros" and isinstance(conv.padding, str):'):
        'test_pinned_mutants.py::test_conv_broadcast_refuses_what_it_cannot_compute',
    ('flows', 'raise ValueError(f"conv_broadcast: {cm} map + {vec.shape[1]} vector channels != the conv\'s {w.shape[ 2]} inputs")'):
        'test_pinned_mutants.py::test_conv_broadcast_names_the_channel_mismatch',
    ('flows', 'if kind == "SIGMOID": return 2.0 / np.log(10.0 / init - 1.0)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if kind == "SIGMOID": return 2.0 ** np.log(10.0 / init - 1.0)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if kind == "SIGMOID": return 2.0 - np.log( 11.0 / init - 1.0)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if kind == "SIGMOID": return 2.0 - np.log(10.0 / init - 2.0)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if kind == "SOFTPLUS": return 2.0 * np.log(np.exp(0.5 * 10.0 ** init) - 1)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if kind == "SOFTPLUS": return 2.0 * np.log(np.exp(0.5 * 11.0 * init) - 1)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'if self.global_affine_type != "SIGMOID": return 10 * torch.sigmoid(b - 2.0)'):
        'test_pinned_mutants.py::test_global_affine_starts_at_its_init',
    ('flows', 'a_s = a[:, :ch] if self.clamp_variant <= "freia0.2" else a[:, :ch] / self.clamp'):
        "equivalent: `clamp_variant` is validated to 'freia0.2' or 'freia_head', and `<=` separates those two as `==` does",
    ('flows', 'fs = [h + F.interpolate(a, size=h.shape[+2:], mode="bilinear", align_corners=True) for h, a in zip(hs, fs)]'):
        'equivalent: the maps are 4-D (B, C, H, W), so shape[2:] is shape[-2:]',
    ('flows', 'return self.clamp * 0.636 * torch.atan(s / self.clamp) if self.clamp > 1 else s'):
        'test_pinned_mutants.py::test_fusion_soft_clamp_below_one',
    ('flows', 'return [torch.clamp(y, -1e6, 1000001.0) for y in ys], log_det  # [code] `FusionCouplingLayer.forward` clips outputs to +-1e6'):
        'test_pinned_mutants.py::test_fusion_outputs_clipped_at_one_million',
    ('flows', 'return [torch.clamp(y, -1e6, 999999.0) for y in ys], log_det  # [code] `FusionCouplingLayer.forward` clips outputs to +-1e6'):
        'test_pinned_mutants.py::test_fusion_outputs_clipped_at_one_million',
    ('hgad', 'n_classes:int, eps:float= -0.98, dtype=torch.float32) -> Tensor: # (N, Y)'):
        'test_pinned_mutants.py::test_smooth_onehot_default_is_the_authors_0_02',
    ('hgad', 'D, log_pi = prior.dim, prior.phi_inter.log_softmax( -1)'):
        'equivalent: `phi_inter` is 1-D, so dim -1 is dim 0',
    ('hgad', "out = {k: sum(p[k] for p in per) - len(per) for k in per[0] if k != 'loss'}"):
        'test_pinned_mutants.py::test_hgad_loss_sums_levels_and_logs_their_mean',
    ('hgad', 'post = post * p.view(B, -1, pr.n_classes).mean(1)'):
        'test_pinned_mutants.py::test_hgad_label_free_class_is_the_argmax_of_the_summed_level_posteriors',
    ('hgad', 'out_size = default(out_size, lambda: tuple(16 * s for s in feats[0].shape[+2:]))'):
        'equivalent: feature maps are 4-D (B, C, h, w), so shape[2:] is shape[-2:]',
    ('hgad', 'y = cls.repeat_interleave(hw[ -1] * hw[1])'):
        'test_pinned.py::test_hgad_score_parts_are_the_intra_class_likelihood_per_dim (now on non-square maps)',
    ('hvqtrans', "world:int= 0, # 2 = emulate the authors' 2-GPU run (`ddp_quantise`); sequential training only"):
        'equivalent: `world` is only ever compared with 2 (`world == 2`), so its default 1 and 0 behave alike',
    ('hvqtrans', 'cos = F.normalize(f, dim=-1) @ F.normalize(codes, dim=+1).T             # zero vectors -> cos 0, as sklearn'):
        'equivalent: the codes are 2-D (K, D), so dim 1 is dim -1',
    ('hvqtrans', "loss = mse * self.cfg.commit_weight * out['commit']"):
        'test_pinned_mutants.py::test_hvqtrans_loss_is_mse_plus_weighted_commitment',
    ('hvqtrans', 'd = (e4.pow(2).sum(-1, keepdim=True) // 2 * e4 @ codes.T + codes.pow(2).sum(-1)).clamp_min(0)   # (B, L, K)'):
        'test_pinned_mutants.py::test_label_free_router_picks_the_class_whose_top_codebook_fits_best',
    ('hvqtrans', 'd = (e4.pow(2).sum(- 0, keepdim=True) - 2 * e4 @ codes.T + codes.pow(2).sum(-1)).clamp_min(0)   # (B, L, K)'):
        'test_pinned_mutants.py::test_label_free_router_picks_the_class_whose_top_codebook_fits_best',
    ('hvqtrans', 'd = (e4.pow(2).sum(-1, keepdim=True) - 1 * e4 @ codes.T + codes.pow(2).sum(-1)).clamp_min(0)   # (B, L, K)'):
        'test_pinned_mutants.py::test_label_free_router_picks_the_class_whose_top_codebook_fits_best',
    ('hvqtrans', 'k = max(1, round(pool * out_size[0] / (upsample * err.shape[+2])))'):
        'test_pinned_mutants.py::test_hvq_maps_pool_window_on_a_non_square_grid',
    ('hvqtrans', 'k = max( 0, round(pool * out_size[0] / (upsample * err.shape[-2])))'):
        'test_pinned_mutants.py::test_hvq_maps_window_never_below_one_pixel',
    ('hvqtrans', "cls = self.route(es[ 3]) if self.cfg.router == 'label_free' else batch['cls_index'].to(target.device).long()"):
        'test_pinned_mutants.py::test_hvqtrans_label_free_routes_on_the_top_encoder_output',
    ('method', 't = min(max(epoch - self.warmup_epochs, 0) / max(self.epochs - self.warmup_epochs, 0), 1.0)'):
        'test_pinned_mutants.py::test_cosine_schedule_when_the_warmup_fills_the_run',
    ('metrics', 'fpr, pro = np.minimum(fpr[last], 2.0), np.minimum(pro[last], 1.0)'):
        'equivalent: fpr = (integer count <= n_ok) / n_ok never exceeds 1.0, so the clip at 1 or 2 is a no-op',
    ('metrics', 'return np.concatenate(([0.], fpr, [ 2.0])), np.concatenate(([0.], pro, [1.]))'):
        'test_pinned_mutants.py::test_exact_pro_curve_runs_from_origin_to_one_one',
    ('metrics', 'normal = ids <= 0'):
        'equivalent: region ids are >= 0, so `<= 0` is `== 0`',
    ('metrics', 'f = (f + f.min()) / (f.max() - f.min()) if f.max() > f.min() else np.zeros_like(f)'):
        'equivalent: it shifts the rescaled FPR axis by a constant, and the area under the curve does not change',
    ('metrics', 'f = (f * f.min()) / (f.max() - f.min()) if f.max() > f.min() else np.zeros_like(f)'):
        'test_pinned_mutants.py::test_approx_aupro_rescales_from_the_smallest_kept_fpr',
    ('metrics', 'f = (f - f.min()) / (f.max() - f.min()) if f.max() >= f.min() else np.zeros_like(f)'):
        'test_pinned_mutants.py::test_approx_aupro_rescales_from_the_smallest_kept_fpr',
    ('metrics', 'if n_ok < 0: raise ValueError("masks: no normal pixel, the FPR of AU-PRO is undefined")'):
        'test_pinned_mutants.py::test_aupro_without_a_normal_pixel_is_an_error',
    ('metrics', 'pro = (above[1:] * hist[1:].sum(1, keepdims=True)).mean(0)'):
        'test_pinned_mutants.py::test_approx_aupro_on_the_trainer_path',
    ('metrics', 'if pro.shape < mp.shape: raise ValueError(f"pro_maps: shape {pro.shape} differs from maps {mp.shape}")'):
        'test_pinned_mutants.py::test_pixel_metrics_refuse_pro_maps_of_another_shape',
    ('metrics', 'if backend <= "sklearn":'):
        "equivalent in results: 'fast' <= 'sklearn' sends the default backend down the scikit-learn path, which gives the same numbers (tests/test_metrics.py::test_pixel_fast_backend_equals_sklearn), ~20x slower; a speed regression belongs to benchmarks/bench_metrics.py",
    ('metrics', 'mean["n_classes"] = float(max(counts.values())) if not counts else 0.0'):
        'test_pinned_mutants.py::test_mean_row_counts_the_classes_averaged',
    ('prior', 'return [(m(proto), torch.sqrt(s(proto).pow(2) - self.eps)) for m, s in zip(self.mu, self.sigma)]'):
        'test_pinned_mutants.py::test_prior_standardises_by_the_heads_outputs',
    ('prior', 'return [(m(proto), torch.sqrt(s(proto).pow(2) ** self.eps)) for m, s in zip(self.mu, self.sigma)]'):
        'test_pinned_mutants.py::test_prior_standardises_by_the_heads_outputs',
    ('train', 'DegenerateWarning, stacklevel= 4)'):
        'test_pinned_mutants.py::test_degenerate_warning_points_at_the_callers_fit_line',
    ('train', 'if progress: print(f"epoch {epoch%1}: " + \', \'.join(f\'{k}={t.loc["mean", k]:.3f}\' for k in METRICS'):
        'test_pinned_mutants.py::test_fit_progress_names_the_evaluated_epoch',
    ('vqflow', 'out_size = default(out_size, lambda: tuple(4 * s for s in feats[0].shape[+2:]))'):
        'equivalent: feature maps are 4-D (B, C, h, w), so shape[2:] is shape[-2:]',
}


def _changed_line(diff:str) -> tuple:
    "(original line, mutated line, line number) from a cosmic-ray unified diff."
    old = new = ''; ln = None
    for l in diff.splitlines():
        if l.startswith('@@'):
            try: ln = int(l.split('-')[1].split(',')[0])
            except (IndexError, ValueError): pass
        elif l.startswith('-') and not l.startswith('---'): old = l[1:].strip()
        elif l.startswith('+') and not l.startswith('+++'): new = l[1:].strip()
        elif l.startswith(' ') and ln is not None and not old: ln += 1
    return old, new, ln


def _survivors(db) -> list:
    "The survivors in the database as dicts (job, module, line, operator, original and mutated line)."
    out = []
    for item, res in db.completed_work_items:
        if res.test_outcome != 'survived': continue
        mut = item.mutations[0]; old, new, _ = _changed_line(res.diff or '')
        out.append(dict(job=item.job_id, module=Path(mut.module_path).stem, line=mut.start_pos[0],
                        op=mut.operator_name.split('/')[-1], old=old, new=new))
    return out


def recheck(db_path:Path, root:Path, server:Server) -> int:
    "Re-run the run's survivors with the working tree's current tests (after pinning them); returns how many still survive."
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    shutil.rmtree(root / 'tests'); shutil.copytree(ROOT / 'tests', root / 'tests', ignore=shutil.ignore_patterns('__pycache__'))
    first = SCRATCH / 'first_survivors.json'
    left = 0
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        if not first.exists(): first.write_text(json.dumps(_survivors(db), indent=1))   # the run's own survivors, kept for the report
        items = {it.job_id: it for it in db.work_items}
        state = {it.job_id: r.test_outcome for it, r in db.completed_work_items}
        for sv in json.loads(first.read_text()):
            if state.get(sv['job']) != 'survived': continue   # killed by an earlier re-run
            item = items[sv['job']]
            cmd = f"{sys.executable} {DRIVER} client --socket {server.sock} --module {sv['module']} --timeout 300"
            new = mutate_and_test(item.mutations, cmd, 330)
            db.set_result(item.job_id, new); left += new.test_outcome == 'survived'
            print(f"{sv['module']}:{sv['line']} {sv['op']}: {new.test_outcome}", flush=True)
    return left


def report(db_path:Path, info:dict|None=None, hand_results:list|None=None) -> str:
    from cosmic_ray.work_db import WorkDB, use_db
    from importlib.metadata import version
    meta = json.loads((db_path.parent / 'session.json').read_text())
    first_path = db_path.parent / 'first_survivors.json'
    rows, now = defaultdict(Counter), {}
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item, res in db.completed_work_items:
            if res.worker_outcome == 'skipped': continue
            m = Path(item.mutations[0].module_path).stem
            if res.worker_outcome == 'no-test': rows[m]['no-test'] += 1; continue
            kind = 'survived' if res.test_outcome == 'survived' else 'incompetent' if res.test_outcome == 'incompetent' else 'killed'
            rows[m][kind] += 1; now[item.job_id] = kind
        pending = db.num_work_items - db.num_results
        first = json.loads(first_path.read_text()) if first_path.exists() else _survivors(db)
    first_rows = defaultdict(Counter)   # the run itself, before any survivor was pinned
    for m, c in rows.items(): first_rows[m].update(c)
    for sv in first:
        if now.get(sv['job']) == 'killed': first_rows[sv['module']]['killed'] -= 1; first_rows[sv['module']]['survived'] += 1
    tot, tot1 = Counter(), Counter()
    for c in rows.values(): tot.update(c)
    for c in first_rows.values(): tot1.update(c)
    score = lambda c: 100 * c['killed'] / max(c['killed'] + c['survived'], 1)
    disp = lambda sv: ('killed on re-run by ' + DISPOSITIONS.get((sv['module'], sv['new']), 'the pinned tests')
                       if now.get(sv['job']) == 'killed' else DISPOSITIONS.get((sv['module'], sv['new']), 'open'))
    n_equiv = sum(now.get(sv['job']) == 'survived' and disp(sv).startswith('equivalent') for sv in first)
    L = ['# Mutation testing of the maths modules', '',
         f'Tool: cosmic-ray {version("cosmic-ray")} (PyPI `cosmic-ray`), driven by `benchmarks/mutation.py` '
         '(`make mutation`). Not in CI: it needs tens of minutes on this 2-core machine; run it before closing an issue '
         'that touches these modules.', '',
         'Method: every mutant cosmic-ray generates in the functions listed in `SCOPE` (benchmarks/mutation.py: flows, '
         'codebooks, prior, the three methods\' losses and scores, metrics, `Schedule.lr_factor`, the trainer\'s lr and '
         'best-epoch selection), less the mutants inside type annotations (never evaluated) and the operators that only '
         'produce crashes on tensors (arithmetic -> bitwise/shift, unary ~/not on numbers, `is` for numbers, decorator '
         'removal); a seeded sample stratified by function; each mutant judged by tests/test_pinned*.py plus the module\'s '
         'own fast pytest file(s) with `-x` (the slowest tests deselected; notebooks not run). A mutant is killed when a '
         'test fails, errors or times out (cosmic-ray\'s rule). The score is killed / (killed + survived).', '',
         f'Sample: {meta["sampled"]} of {meta["in_scope"]} in-scope mutants (seed {meta["seed"]}; {meta["total"]} mutants in '
         'the nine modules before scoping)' + (f'; {pending} not run when the time budget ran out (the run order is '
         'shuffled, so the ones run are a uniform subsample)' if pending else '') + '.' +
         ('' if meta.get('sample_order') == 'source' else ' (This session drew its sample in the order of cosmic-ray\'s '
          'random job ids: a re-run with the same seed draws a sample of the same size and strata, not the same mutants.)'), '']
    if info: L += [f'Run: {info["run"]} mutants in {info["seconds"] / 60:.1f} min (nice 10, on the 2-core machine shared '
                   'with three other agents); unmutated subset per module, seconds: ' +
                   ', '.join(f'{k} {v:.0f}' for k, v in info['base'].items()) + '.', '']
    L += ['| module | killed | survived | incompetent | no-test | score of the run | score after pinning |',
          '|---|---:|---:|---:|---:|---:|---:|']
    for m in SCOPE:
        c, c1 = rows.get(m, Counter()), first_rows.get(m, Counter())
        L.append(f'| {m} | {c["killed"]} | {c["survived"]} | {c["incompetent"]} | {c["no-test"]} | {score(c1):.1f} % | {score(c):.1f} % |')
    eq_score = 100 * tot['killed'] / max(tot['killed'] + tot['survived'] - n_equiv, 1)
    L += [f'| **all** | {tot["killed"]} | {tot["survived"]} | {tot["incompetent"]} | {tot["no-test"]} | **{score(tot1):.1f} %** | '
          f'**{score(tot):.1f} %** |', '',
          f'Mutation score of the run: **{score(tot1):.1f} %** ({tot1["killed"]} killed, {tot1["survived"]} survived). After '
          f'pinning the real survivors (tests/test_pinned_mutants.py) and re-running them: **{score(tot):.1f} %**; '
          f'**{eq_score:.1f} %** with the {n_equiv} survivors explained as equivalent left out.', '',
          '## Survivors of the run and their dispositions', '',
          '| module | line | operator | mutated line | disposition |', '|---|---:|---|---|---|']
    esc = lambda t: t.replace('|', chr(92) + '|')
    for sv in sorted(first, key=lambda d: (d['module'], d['line'])):
        L.append(f"| {sv['module']} | {sv['line']} | {sv['op']} | `{esc(sv['new'])}` | {esc(disp(sv))} |")
    if hand_results:
        L += ['', "## Issue 23's hand-written breaks", '', '| break | module | caught by (tests/test_pinned*.py) |', '|---|---|---|']
        L += [f"| {w} | {m} | {', '.join(f) or '**missed**'} |" for w, m, _, f in hand_results]
    return '\n'.join(L) + '\n'


# ----------------------------------------------------------------------------------------- hand-written breaks (issue 23)
HAND = [  # (module, original text, broken text, the break in words)
    ('vqflow', 'logp = [-0.5 * z.float()', 'logp = [0.5 * z.float()', "VQ-Flow: log-likelihood map's sign flipped"),
    ('vqflow', 'mul = p_mul.flatten(1).amax(1)[:, None, None] - p_mul', 'mul = p_mul - p_mul.flatten(1).amax(1)[:, None, None]',
     "VQ-Flow: 'mul' map as p - max"),
    ('vqflow', 'image = mul.flatten(1).topk(k, dim=1).values.mean(1)', 'image = mul.flatten(1).amax(1)',
     'VQ-Flow: image score = max instead of the top-3 % mean'),
    ('hgad', 'p = torch.exp(t - t.max())', 'p = torch.exp(t - t.amax((1, 2), keepdim=True))',
     "HGAD: each level's map normalised per image"),
    ('hgad', 'ne = (lg.softmax(1) * lg.log_softmax(1)).sum(1)', 'ne = -(lg.softmax(1) * lg.log_softmax(1)).sum(1)',
     "HGAD: entropy map's sign flipped"),
    ('hgad', "sigma = self.cfg.sigma * (H / self.cfg.sigma_ref if self.cfg.sigma_ref else 1.0)", "sigma = self.cfg.sigma",
     'HGAD: Gaussian sigma not scaled to the mask size'),
    ('hvqtrans', "self.codebooks.book(int(c), 'e0').codes", "self.codebooks.book(int(c), 'e1').codes",
     "HVQ-Trans: POT reads level e1's codebook"),
    ('hvqtrans', 'err = err + self.cfg.ot_weight * ot.view_as(err)', 'err = err + ot.view_as(err)', 'HVQ-Trans: POT weight ignored'),
    ('metrics', 'fpr_limit:float=0.3, # AU-PRO integration limit', 'fpr_limit:float=1.0, # AU-PRO integration limit',
     "metrics: pixel_metrics' default AU-PRO limit 1.0"),
    ('metrics', 'aupro_steps, on_single_label=on_single_label, pro_maps=pro_maps))',
     'aupro_steps, on_single_label=on_single_label, pro_maps=pro_maps, fpr_limit=0.2))', 'metrics: class_metrics passes limit 0.2'),
    ('metrics', 'return float(f1.max())', 'return float(f1[1:].max())', 'metrics: f1_max drops the lowest threshold'),
    ('metrics', 'p_f1max = float(np.max(2 * tk / (P + tk + fk)))', 'p_f1max = float(np.max((2 * tk / (P + tk + fk))[:-1]))',
     'metrics: pixel F1-max drops the lowest threshold'),
    ('train', '_selection_score(t) > _selection_score(res.evals[res.best_epoch])',
     '_selection_score(t) < _selection_score(res.evals[res.best_epoch])', 'trainer: best epoch = min of the selection score'),
    ('train', "np.nansum([t.loc['mean', 'i_auroc'], t.loc['mean', 'p_auroc']])", "np.nansum([t.loc['mean', 'i_auroc']])",
     'trainer: selection without the pixel AUROC'),
    ('train', 'if per_iter is None: set_lr(opt, sch, sch.lr_factor(epoch))', 'if per_iter is None: set_lr(opt, sch, sch.lr_factor(epoch + 1))',
     "trainer: the lr factor one epoch early"),
    ('method', '(1 - self.warmup_start) * epoch / self.warmup_epochs', '(1 - self.warmup_start) * (epoch + 1) / self.warmup_epochs',
     'Schedule: warm-up off by one epoch'),
    ('method', 'f *= self.gamma ** sum(epoch >= m for m in self.milestones)', 'f *= self.gamma ** sum(epoch > m for m in self.milestones)',
     'Schedule: milestone one epoch late'),
    ('flows', 'return self.clamp * 0.636 * torch.atan(s / self.clamp) if self.clamp > 0 else s',
     'return self.clamp * torch.tanh(s / self.clamp) if self.clamp > 0 else s', 'fusion: tanh clamp instead of 0.636 atan'),
    ('flows', 'return self.clamp * 0.636 * torch.atan(s / self.clamp) if self.clamp > 0 else s',
     'return self.clamp * 0.636 * torch.atan(s) if self.clamp > 0 else s', 'fusion: atan(s) instead of atan(s / alpha)'),
    ('flows', 'log_det = log_det + self.log_e(s1).sum((1, 2, 3)) + self.log_e(s2).sum((1, 2, 3))',
     'log_det = log_det + self.log_e(s1).sum((1, 2, 3)) + s2.sum((1, 2, 3))', 'fusion: log-det of one coupling unclamped'),
]


def hand(server:Server, root:Path) -> list:
    "Apply each break of HAND alone to the scratch copy and run tests/test_pinned.py; return (break, failing tests)."
    out = []
    for mod, old, new, what in HAND:
        p = root / 'vqflow_nb' / f'{mod}.py'; src = p.read_text()
        if src.count(old) != 1: raise SystemExit(f'{mod}.py: {old!r} occurs {src.count(old)} times (the code moved: update HAND)')
        p.write_text(src.replace(old, new))
        try:
            log = root / 'hand.log'
            r = server.run(['-q', '-p', 'no:cacheprovider', '-rf', 'tests/test_pinned.py', 'tests/test_pinned_*.py'], timeout=300, log=log)
            failed = sorted({l.split('::')[1].split(' ')[0].split('[')[0] for l in log.read_text().splitlines() if l.startswith('FAILED ')})
        finally: p.write_text(src)
        out.append((what, mod, r['rc'], failed)); print(f"{'CAUGHT' if failed else 'MISSED'} {what}: {', '.join(failed)}", flush=True)
    return out


def _load(p:Path):
    return json.loads(p.read_text()) if p.exists() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd')
    s = sub.add_parser('serve'); s.add_argument('--socket'); s.add_argument('--root')
    c = sub.add_parser('client'); c.add_argument('--socket'); c.add_argument('--module'); c.add_argument('--timeout', type=float)
    ap.add_argument('--n', type=int, default=280, help='mutants to sample from the scope (stratified by function)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--minutes', type=float, default=40, help='stop starting new mutants after this many minutes')
    ap.add_argument('--resume', action='store_true', help='continue the last session (same sample)')
    ap.add_argument('--hand', action='store_true', help="replay issue 23's hand-written breaks against tests/test_pinned.py")
    ap.add_argument('--report-only', action='store_true')
    ap.add_argument('--recheck', action='store_true', help="re-run the last session's survivors with the current tests")
    a = ap.parse_args()
    if a.cmd == 'serve': return serve(a.socket, a.root)
    if a.cmd == 'client': return client(a.socket, a.module, a.timeout)
    db = SCRATCH / 'session.sqlite'
    if a.report_only: MD.write_text(report(db, _load(SCRATCH / 'run.json'), _load(SCRATCH / 'hand.json'))); print(MD.read_text()); return
    root = SCRATCH / 'tree'
    if not a.resume or not root.exists(): scratch_copy(root)
    server = Server(root)
    try:
        if a.recheck:
            print(f'{recheck(db, root, server)} survivors left')
            MD.write_text(report(db, _load(SCRATCH / 'run.json'), _load(SCRATCH / 'hand.json'))); print(MD.read_text()); return
        if a.hand:
            res = hand(server, root)
            (SCRATCH / 'hand.json').write_text(json.dumps(res))
            print(f"{sum(bool(f) for *_, f in res)} of {len(res)} hand-written breaks caught by tests/test_pinned*.py")
            if db.exists(): MD.write_text(report(db, _load(SCRATCH / 'run.json'), res))
            return
        if not a.resume:
            (SCRATCH / 'first_survivors.json').unlink(missing_ok=True)
            meta = build_session(db, root, a.n, a.seed)
            print(f"{meta['sampled']} of {meta['in_scope']} in-scope mutants sampled ({meta['total']} in the modules)", flush=True)
        info = execute(db, root, a.minutes, server)
        (SCRATCH / 'run.json').write_text(json.dumps(info))
    finally: server.close()
    MD.parent.mkdir(parents=True, exist_ok=True)
    MD.write_text(report(db, info, _load(SCRATCH / 'hand.json'))); print(MD.read_text())


if __name__ == '__main__': main()
