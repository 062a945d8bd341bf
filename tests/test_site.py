"""The documentation site (`make docs`) opened in headless Chromium: every page loads, its images load, its maths
renders, and it shows no error output.

Builds the site into a temporary folder with tools/build_site.py (about 20 s), serves it on 127.0.0.1 and visits
every page with Selenium. Skips, saying why, when Chromium, its driver or the docs extras are missing
(Debian: `apt-get install -y chromium chromium-driver`; Python: `pip install -e ".[dev]"`).
"""
import functools, http.server, shutil, socketserver, subprocess, sys, threading, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
DRIVER = shutil.which('chromedriver')

def _missing():
    if not CHROMIUM: return 'no Chromium on PATH (Debian: apt-get install -y chromium chromium-driver)'
    if not DRIVER: return 'no chromedriver on PATH (Debian: apt-get install -y chromium-driver)'
    for m in ('selenium', 'sphinx', 'myst_nb', 'furo', 'jupyter_server_mathjax'):
        try: __import__(m)
        except ImportError: return f'{m} is not installed (the [dev] extra: pip install -e ".[dev]")'
    return None

pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    p = subprocess.run([sys.executable, str(ROOT/'tools'/'build_site.py'), '--out', str(out)], capture_output=True, text=True)
    assert p.returncode == 0, f'the site did not build:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return out/'html'

@pytest.fixture(scope='module')
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    handler = functools.partial(Quiet, directory=str(site))
    httpd = socketserver.ThreadingTCPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown(); httpd.server_close()

@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1280,900'):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()

def pages(site:Path) -> list:
    "Every content page: the landing page, the README, notebooks, write-ups and API pages (not Sphinx's own search/index)."
    skip = {'search.html', 'genindex.html', 'py-modindex.html'}
    return sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html')
                  if p.name not in skip and not p.relative_to(site).parts[0].startswith('_'))

def test_site_has_every_page(site):
    "A page per notebook, per docs/*.md and per exported module, plus the landing page."
    got = set(pages(site))
    want = {'index.html', 'readme.html'}
    want |= {p.relative_to(ROOT).with_suffix('.html').as_posix() for p in (ROOT/'nbs').rglob('*.ipynb')
             if p.name != 'index.ipynb' and '.ipynb_checkpoints' not in p.parts}
    want |= {f'docs/{p.stem}.html' for p in (ROOT/'docs').glob('*.md')}
    want |= {f'api/{p.stem}.html' for p in (ROOT/'vqflow_nb').glob('*.py') if not p.stem.startswith('_')}
    assert not want - got, f'pages missing from the site: {sorted(want - got)}'

_STATE = '''
const imgs = Array.from(document.images).filter(i => !i.closest('.headerlink'));
return {
  title: document.title,
  broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  n_images: imgs.length,
  n_math_src: document.querySelectorAll('.math, span.math, div.math').length,
  n_math_done: document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML, .MathJax_SVG, mjx-container').length,
  mj_errors: Array.from(document.querySelectorAll('.MathJax_Error, merror, mjx-merror')).map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120)),
  errors: Array.from(document.querySelectorAll('.output.error, .output.traceback, div.cell_output .traceback, .system-message, .problematic')).map(e => e.textContent.slice(0, 200)),
  body: document.body ? document.body.innerText.length : 0,
};'''

def _wait_math(browser, timeout=30):
    "Wait for MathJax 2 to finish typesetting (its queue), if the page loaded it."
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = browser.execute_script('''
            if (typeof MathJax === 'undefined') return true;
            if (!MathJax.Hub || !MathJax.Hub.queue) return false;
            return MathJax.Hub.queue.pending === 0 && MathJax.Hub.queue.running === 0 &&
                   document.querySelectorAll('.MathJax_Processing, .MathJax_Preview:not(:empty)').length === 0;''')
        if done: return
        time.sleep(0.2)

def test_every_page_renders(site, server, browser):
    "Each page loads (HTTP 200, a title, text), every image has pixels, maths is typeset without errors, no error output."
    problems = {}
    for page in pages(site):
        browser.get(f'{server}/{page}')
        _wait_math(browser)
        s = browser.execute_script(_STATE)
        why = []
        if not s['title'] or s['body'] < 50 or '404' in s['title']: why.append(f"empty or missing page (title {s['title']!r})")
        if s['broken']: why.append(f"images that do not load: {s['broken'][:5]}")
        if s['n_math_src'] and not s['n_math_done']: why.append(f"{s['n_math_src']} maths elements, none typeset")
        if s['mj_errors']: why.append(f"MathJax errors: {s['mj_errors'][:3]}")
        if s['errors']: why.append(f"error output: {s['errors'][:3]}")
        if why: problems[page] = why
    assert not problems, '\n'.join(f'{p}: {w}' for p, w in problems.items())

def test_figures_and_maths_exist(site, server, browser):
    "The checks above are not vacuous: a notebook page with figures and maths has them loaded and typeset."
    browser.get(f'{server}/nbs/04_flows.html'); _wait_math(browser)
    s = browser.execute_script(_STATE)
    assert s['n_images'] >= 2 and not s['broken'], s
    assert s['n_math_src'] >= 5 and s['n_math_done'] >= 5 and not s['mj_errors'], s
