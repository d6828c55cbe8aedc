"""Build the documentation site from the notebooks (`nbdev_docs` needs Quarto, which cannot be installed here).

`python .ci/docs.py [--out _docs]` writes one HTML page per notebook of nbs/, named as nbdev names them
(`00_metrics.ipynb` -> `metrics.html`, `index.ipynb` -> `index.html`). Each notebook goes through nbdev's own
documentation processors, the ones `nbdev_docs` runs before Quarto: hidden and exported cells are dropped, `show_doc`
is added for exported names that have none, and the `show_doc` cells are executed, so the API reference shows the
library's current signatures and docments. nbconvert then turns the notebook into HTML: Quarto's `#| echo: false`,
`#| output: false` and `#| include: false` are honoured and `#|` lines are not shown. Every page gets a sidebar of all
pages and previous/next links; nbs/images is copied; links to notebooks (`05_rollback.ipynb#anchor`) point to their
pages; headings get the ids Quarto gives them (`metrics.html#reid_metrics`, `data.html#reiddl.new`).

Figures are never typed by hand: a `{{name.path:fmt}}` placeholder in a markdown cell is filled from
`benchmarks/results/name.json` by the README generator's `fill_results`.

Every link and image of every page is checked: a missing page, file or anchor stops the build with exit status 1 and
a line `page: link (what is missing)` for each.
"""
import argparse, ast, contextlib, html, os, re, shutil, sys, warnings
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit, unquote
import nbformat, yaml
from nbconvert import HTMLExporter
from traitlets.config import Config
from pygments.formatters import HtmlFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme import fill_results                                   # noqa: E402  (one placeholder filler for README and site)

root = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- notebooks -> processed notebooks
def page_name(nb_path) -> str:
    "The page nbdev gives the notebook `nb_path`: its name without the number prefix, as .html"
    return re.sub(r'^\d+_', '', Path(nb_path).stem) + '.html'

@contextlib.contextmanager
def _cwd(path):
    "Run in `path`: nbdev reads settings.ini from the working directory up"
    old = os.getcwd(); os.chdir(path)
    try: yield
    finally: os.chdir(old)

def _join(x): return ''.join(x) if isinstance(x, list) else x

def _as_nbformat(d):
    "nbdev's processed notebook (a dict) as an nbformat notebook, sources and outputs as strings"
    d = {**d, 'nbformat': d.get('nbformat', 4), 'nbformat_minor': max(d.get('nbformat_minor', 5), 5)}
    for c in d['cells']:
        c['source'] = _join(c.get('source', ''))
        c.setdefault('metadata', {})
        for o in c.get('outputs', []):
            if 'text' in o: o['text'] = _join(o['text'])
            for k, v in o.get('data', {}).items(): o['data'][k] = _join(v)
    return nbformat.from_dict(d)

_exported = {'export', 'exports', 'exporti', 'exec_doc'}

def _imports_of_mixed_cell(cell):
    "The import statements of a code cell that mixes imports with other code (and is not exported); else None"
    if cell.cell_type != 'code' or cell.directives_.keys() & _exported: return None
    try: stmts = ast.parse(cell.source).body
    except SyntaxError: return None
    imps = [t for t in stmts if isinstance(t, (ast.Import, ast.ImportFrom))]
    return '\n'.join(ast.unparse(t) for t in imps) if imps and len(imps) < len(stmts) else None

def _doc_procs():
    "nbdev's documentation processors, except that of a cell mixing imports with other code only the imports run"
    from execnb.nbio import mk_cell
    from nbdev.processors import FilterDefaults, exec_show_docs
    class exec_show_docs_imports(exec_show_docs):
        # nbdev_docs runs such a cell whole, warning "Found cells containing imports and other code" (tests and examples
        # then run while the docs build, and fail without the cells before them); the notebooks have several
        def __call__(self, cell):
            imps = _imports_of_mixed_cell(cell)
            if imps is None or not getattr(self.nb, 'has_docs_', True): return super().__call__(cell)
            self.mixed.append(cell.source.splitlines()[0])
            return super().__call__(mk_cell(imps))
        def begin(self): self.mixed = []; super().begin()
    return [exec_show_docs_imports if p is exec_show_docs else p for p in FilterDefaults().procs()]

def nbdev_processed(nb_path, log=print):
    "The notebook as nbdev prepares it for the docs (placeholders filled first), as an nbformat notebook"
    from execnb.nbio import read_nb, nb2dict
    from nbdev.process import NBProcessor
    nb = read_nb(nb_path)
    for c in nb.cells:
        if c.cell_type == 'markdown': c.source = fill_results(c.source)
    with _cwd(root), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        proc = NBProcessor(nb=nb, procs=_doc_procs())
        proc.process()
    mixed = [m for p in proc.procs if hasattr(p, 'mixed') for m in p.mixed]
    for m in mixed: log(f'  note: {Path(nb_path).name}: the cell starting {m!r} mixes imports with other code: only its imports '
                        'ran (nbdev_docs runs it whole, tests and all; imports in a cell of their own avoid that)')
    return _as_nbformat(nb2dict(nb))

_re_directive = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def _directives(src):
    "Quarto/nbdev `#| key: value` lines of a cell, and its source without them"
    d, keep = {}, []
    for l in src.splitlines():
        m = _re_directive.match(l)
        if m: d[m[1]] = m[2].lower()
        else: keep.append(l)
    return d, '\n'.join(keep).strip('\n')

def shown_cells(nb):
    "`nb` with its front matter taken out (as `nb.metadata.frontmatter`) and the cells as the page shows them"
    cells, fm = [], {}
    for c in nb.cells:
        if c.cell_type == 'raw':
            if c.source.lstrip().startswith('---'): fm = yaml.safe_load(c.source.strip().strip('-')) or {}
            continue
        d, c.source = _directives(c.source)
        if d.get('include') == 'false' or 'hide' in d: continue
        if c.cell_type == 'markdown' and re.fullmatch(r'\s*(<!--.*?-->\s*)*', c.source, re.S): continue   # nbdev's "do not edit" comment
        if c.cell_type == 'code':
            if d.get('output') == 'false': c.outputs = []
            if not c.source.strip() and not c.outputs: continue
            if d.get('echo') == 'false' or not c.source.strip(): c.metadata['tags'] = ['remove_input']
        cells.append(c)
    nb.cells, nb.metadata['frontmatter'] = cells, fm
    return nb

# ---------------------------------------------------------------- processed notebook -> HTML
def _pandoc_id(nbconvert_id):
    "The id pandoc (Quarto) gives the heading nbconvert gave `nbconvert_id`: lower case, only letters, digits, _ - ., from the first letter"
    s = re.sub(r'[^\w.-]', '', html.unescape(nbconvert_id).lower())
    return re.sub(r'^[^a-z]+', '', s) or 'section'

def _quarto_ids(body):
    "`body` with every heading id (and its anchor link) as Quarto makes it"
    ids = {i: _pandoc_id(i) for i in re.findall(r'<h[1-6] id="([^"]+)"', body)}
    body = re.sub(r'(<h[1-6] id=")([^"]+)(")', lambda m: m[1] + ids[m[2]] + m[3], body)
    return re.sub(r'(href="#)([^"]+)(")', lambda m: m[1] + ids.get(m[2], m[2]) + m[3], body)

def _notebook_links(body, pages):
    "`body` with links to notebooks (`05_rollback.ipynb#x`) pointing to their pages (`rollback.html#x`)"
    def fix(m):
        path, frag = m[2], m[3] or ''
        name = Path(unquote(path)).name
        return m[1] + (pages[name] if name in pages else path) + frag + m[4]
    return re.sub(r'((?:href|src)=")([^"#:]*\.ipynb)(#[^"]*)?(")', fix, body)

def body_html(nb, pages):
    "The page content of the shown notebook `nb`"
    cfg = Config({'TagRemovePreprocessor': {'enabled': True, 'remove_input_tags': {'remove_input'}}})
    exp = HTMLExporter(config=cfg, template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exp.from_notebook_node(nb)
    return _notebook_links(_quarto_ids(body), pages)

_page = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{head_title}</title><link rel="stylesheet" href="site.css"></head>
<body><nav class="sidebar"><a class="site" href="index.html">{site}</a><ul>
{nav}
</ul></nav>
<main><header><h1 class="title">{title}</h1>{description}</header>
{body}
<nav class="pager">{prev}{next}</nav></main></body></html>
"""

_css = """body{margin:0;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212529;display:flex}
.sidebar{position:sticky;top:0;height:100vh;overflow:auto;width:15rem;flex:none;padding:1.2rem;border-right:1px solid #dee2e6;background:#f8f9fa;box-sizing:border-box}
.sidebar .site{font-weight:600;font-size:1.1rem;color:#212529;text-decoration:none}.sidebar ul{list-style:none;padding:0;margin:1rem 0}
.sidebar li a{display:block;padding:.25rem .5rem;border-radius:4px;color:#495057;text-decoration:none}.sidebar li a.active{background:#e9ecef;font-weight:600}
main{max-width:56rem;padding:1.5rem 2.5rem;min-width:0;flex:1}h1.title{margin-bottom:.2rem}.description{color:#6c757d;font-size:1.1rem}
a{color:#2761a5}code{font-size:.9em;background:#f6f8fa;padding:.1em .3em;border-radius:3px}pre{overflow:auto}
.input_area pre,.highlight pre{background:#f6f8fa;padding:.7rem;border-radius:4px;font-size:.85em;line-height:1.4}
.output_area pre{padding:.3rem .7rem;font-size:.85em;max-height:30rem}.output_area img{max-width:100%}
.output_markdown hr{border:0;border-top:1px solid #dee2e6;margin:2rem 0 0}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9em}th,td{border:1px solid #dee2e6;padding:.3rem .6rem;text-align:left}
.anchor-link{visibility:hidden;margin-left:.3rem;text-decoration:none}h1:hover .anchor-link,h2:hover .anchor-link,h3:hover .anchor-link,h4:hover .anchor-link{visibility:visible}
img{max-width:100%}.pager{display:flex;justify-content:space-between;margin-top:3rem;padding-top:1rem;border-top:1px solid #dee2e6}
"""

def page_html(site, pages, i, body):
    "The full page `i` of `pages` (a list of (file name, title, description))"
    name, title, desc = pages[i]
    active = lambda n: ' class="active"' if n == name else ''
    nav = '\n'.join(f'<li><a href="{n}"{active(n)}>{html.escape(t)}</a></li>' for n, t, _ in pages)
    link = lambda j, cls, arrow: (f'<a class="{cls}" href="{pages[j][0]}">{arrow} {html.escape(pages[j][1])}</a>'
                                  if 0 <= j < len(pages) else '<span></span>')
    return _page.format(site=html.escape(site), title=html.escape(title), nav=nav, body=body,
                        head_title=html.escape(title if title == site else f'{title} – {site}'),
                        description=f'<p class="description">{html.escape(desc)}</p>' if desc else '',
                        prev=link(i - 1, 'prev', '&larr;'), next=link(i + 1, 'next', '&rarr;'))

# ---------------------------------------------------------------- link check
class _Refs(HTMLParser):
    "The ids and the links (href/src) of an HTML page"
    def __init__(self, text):
        super().__init__(); self.ids, self.links = set(), []
        self.feed(text)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('name'): self.ids.add(a['name'])
        self.links += [a[k] for k in ('href', 'src') if a.get(k)]

def broken_links(out) -> list:
    "`page: link (what is missing)` for every link or image of the pages in `out` that leads nowhere"
    out = Path(out).resolve()
    refs = {p: _Refs(p.read_text(encoding='utf-8')) for p in sorted(out.rglob('*.html'))}
    bad = []
    for page, r in refs.items():
        for link in r.links:
            u = urlsplit(link)
            if u.scheme or link.startswith('//'): continue                 # external (http, mailto, data: images)
            target = (page.parent/unquote(u.path)).resolve() if u.path else page
            if target.is_dir(): target = target/'index.html'
            where = page.relative_to(out)
            if out not in target.parents and target != out: bad.append(f'{where}: {link} (outside the site)')
            elif not target.is_file(): bad.append(f'{where}: {link} (no such page or file)')
            elif u.fragment and target.suffix == '.html' and unquote(u.fragment) not in refs[target].ids:
                bad.append(f'{where}: {link} (no anchor #{u.fragment} in {target.name})')
    return bad

# ---------------------------------------------------------------- the site
def notebooks(nbs):
    "The notebooks of the site, index first, then in file name order"
    nbs = sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return sorted(nbs, key=lambda p: p.name != 'index.ipynb')

def build(nbs=root/'nbs', out=root/'_docs', site=None, log=print) -> list:
    "Write the site of the notebooks in `nbs` into `out`; the broken links found (an empty list when all work)"
    nbs, out = Path(nbs), Path(out)
    site = site or _site_title()
    if out.exists() and any(out.iterdir()) and not (out/'site.css').is_file():
        raise SystemExit(f'--out {out}: the folder exists and is not a site this script wrote; it is replaced, so give another')
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    if (nbs/'images').is_dir(): shutil.copytree(nbs/'images', out/'images')
    nb_paths = notebooks(nbs)
    names = {p.name: page_name(p) for p in nb_paths}
    shown = [shown_cells(nbdev_processed(p, log)) for p in nb_paths]
    pages = [(names[p.name], str(nb.metadata.frontmatter.get('title') or p.stem), str(nb.metadata.frontmatter.get('description') or ''))
             for p, nb in zip(nb_paths, shown)]
    for i, nb in enumerate(shown):
        (out/pages[i][0]).write_text(page_html(site, pages, i, body_html(nb, names)), encoding='utf-8')
        log(f'{nb_paths[i].name} -> {out/pages[i][0]}')
    (out/'site.css').write_text(_css + HtmlFormatter().get_style_defs('.highlight'), encoding='utf-8')
    return broken_links(out)

def _site_title():
    "The project's title from settings.ini"
    import configparser
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    return cfg.get('DEFAULT', 'title', fallback=root.name)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', default=str(root/'nbs'), help='folder of the notebooks')
    ap.add_argument('--out', default=str(root/'_docs'), help='folder the site is written to (replaced)')
    a = ap.parse_args()
    bad = build(a.nbs, a.out)
    if bad: sys.exit(f'{len(bad)} broken link(s) in the site:\n' + '\n'.join(f'  {b}' for b in bad))
    print(f'the site is in {a.out}; every internal link works')
