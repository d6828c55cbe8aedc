"""Build the documentation site from the notebooks (`nbdev_docs` needs Quarto, which cannot be installed here).

`python .ci/docs.py [--out _docs]` writes one HTML page per notebook of nbs/, named as nbdev names them: the number
prefix dropped (`00_metrics.ipynb` -> `metrics.html`, `00a_retrieval.ipynb` -> `retrieval.html`, `index.ipynb` ->
`index.html`). Each notebook goes through nbdev's own documentation processors, the ones `nbdev_docs` runs before
Quarto: hidden and exported cells are dropped, `show_doc` is added for exported names that have none, and the
`show_doc` cells are executed, so the API reference shows the library's current signatures and docments. Unlike
plain nbdev, every `show_doc` of a cell is shown (a cell shows only its last value, so each call gets a cell of its
own), a patched method that has its `show_doc(Class.method)` gets no second one, and an exported public constant gets
its definition shown. nbconvert then turns the notebook into HTML: Quarto's `#| echo: false`, `#| output: false` and
`#| include: false` are honoured and `#|` lines are not shown. Every page gets a sidebar of all pages with a search
box (a client-side index written as `search_index.js`, so the site also works opened from disk) and previous/next
links; nbs/images is copied, and a wide figure of several side-by-side plots is shown as its plots, two to a row;
links to notebooks (`05_rollback.ipynb#anchor`) point to their pages; headings get the ids Quarto gives them
(`metrics.html#reid_metrics`, `data.html#reiddl.new`, `-1` added to a repeated one).

Figures are never typed by hand: a `{{name.path:fmt}}` placeholder in a markdown cell is filled from
`benchmarks/results/name.json` by the README generator's `fill_results`.

Two checks stop the build with exit status 1, a line for each problem:
- every link and image of every page works (`page: link (what is missing)`);
- the API reference has every public name exactly once: every `__all__` name of the modules the site's notebooks
  export, and every public method they patch onto a class (`API reference: ...`).
"""
import argparse, ast, configparser, contextlib, html, json, os, re, shutil, sys, warnings
from collections import Counter
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

def _settings():
    "The DEFAULT section of settings.ini"
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    return cfg['DEFAULT']

# ---------------------------------------------------------------- notebooks -> processed notebooks
def page_name(nb_path) -> str:
    "The page nbdev gives the notebook `nb_path`: its name without the number prefix (`00a_`), as .html"
    return re.sub(r'^\d+[a-z]?_', '', Path(nb_path).stem) + '.html'

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

def _show_doc_stmts(cell) -> list:
    "The top-level `show_doc(...)` statements of a code cell"
    trees = cell.parsed_() if cell.cell_type == 'code' else None
    return [t for t in trees or [] if isinstance(t, ast.Expr) and isinstance(t.value, ast.Call)
            and getattr(t.value.func, 'id', None) == 'show_doc']

def _cell_like(cell, source, i):
    "A new code cell `source`, with the directives and metadata of `cell`"
    from execnb.nbio import mk_cell
    c = mk_cell(source, metadata=dict(cell.metadata), id=f'{cell.id}-{i}' if i else cell.id)
    c.directives_ = cell.directives_
    return c

def split_show_docs(cell) -> list:
    "`cell` as cells that each end with one of its `show_doc` calls (a cell shows only its last value)"
    stmts = _show_doc_stmts(cell)
    if len(stmts) < 2: return [cell]
    lines = cell.source.splitlines()
    cuts = [0, *(t.end_lineno for t in stmts[:-1]), len(lines)]
    return [_cell_like(cell, '\n'.join(lines[a:b]), i) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

_max_constant_lines = 12

def constant_doc(name, source) -> str:
    "The API entry (as `show_doc` writes one) of the constant `name` defined by `source`"
    lines = source.splitlines()
    if len(lines) > _max_constant_lines: lines = lines[:_max_constant_lines] + ['...']
    code = '\n'.join(lines)
    return f'---\n\n### {name}\n\n```python\n{code}\n```'

def _target_names(t) -> list:
    "The names an assignment target binds (`a`, `a, b`; not `x.a` or `x[0]`)"
    if isinstance(t, ast.Name): return [t.id]
    return [n for e in t.elts for n in _target_names(e)] if isinstance(t, (ast.Tuple, ast.List)) else []

def _public_constants(cell) -> list:
    "(name, its definition's source lines) of the public names a code cell assigns at top level"
    lines, res = cell.source.splitlines(), []
    for t in cell.parsed_() or []:
        targets = t.targets if isinstance(t, ast.Assign) else [t.target] if isinstance(t, ast.AnnAssign) else []
        names = [n for tg in targets for n in _target_names(tg) if not n.startswith('_')]
        res += [(n, '\n'.join(lines[t.lineno-1:t.end_lineno])) for n in names]
    return res

def _constant_doc_cell(name, source):
    "A cell (no input) that shows the API entry of the constant `name`"
    from execnb.nbio import mk_cell
    c = mk_cell('', metadata={'tags': ['remove_input']})
    c.outputs = [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/markdown': constant_doc(name, source)}}]
    return c

def _api_doc_cells(cell, shown) -> list:
    "New cells documenting the public names that the exported `cell` defines and `shown` lacks"
    from execnb.nbio import mk_cell
    from nbdev.processors import _def_names
    new = [mk_cell(f'show_doc({n})') for n in _def_names(cell, set()) if n not in shown]   # patched: `Learner.fit`
    for c in new: c.has_sd = True
    new += [_constant_doc_cell(n, src) for n, src in _public_constants(cell) if n not in shown]
    for c in new: c.directives_ = {}
    return new

def _doc_position(cells, cell) -> int:
    "Where the added `show_doc`s of the exported `cell` go: after the last `show_doc` of a name it defines, else after it"
    from nbdev.processors import _get_nm
    i = next(k for k, c in enumerate(cells) if c is cell)
    defined = {t.name for t in cell.parsed_() or [] if isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    shows = [k for k, c in enumerate(cells) if k > i and {_get_nm(t) for t in _show_doc_stmts(c)} & defined]
    return max(shows, default=i) + 1

def _doc_procs():
    "nbdev's documentation processors, with every `show_doc` shown once, and of a mixed cell only the imports run"
    from nbdev.processors import FilterDefaults, exec_show_docs, add_show_docs, _want_doc, _get_nm
    class add_show_docs_once(add_show_docs):
        # nbdev compares a patched method's plain name (`fit`) with the documented ones (`Learner.fit`) and adds a
        # second `show_doc`; and of a cell with several `show_doc` calls only the last is shown
        def begin(self):
            nb = self.nb
            nb.cells = [c for cell in nb.cells for c in split_show_docs(cell)]
            shown = {_get_nm(t) for c in nb.cells for t in _show_doc_stmts(c)}
            for cell in reversed([c for c in nb.cells if _want_doc(c)]):
                i = _doc_position(nb.cells, cell)
                nb.cells[i:i] = _api_doc_cells(cell, shown)
            for i, c in enumerate(nb.cells): c.idx_ = i
            nb.has_docs_ = shown or any(_want_doc(c) for c in nb.cells)
    class exec_show_docs_imports(exec_show_docs):
        # nbdev_docs runs such a cell whole, warning "Found cells containing imports and other code" (tests and examples
        # then run while the docs build, and fail without the cells before them); the notebooks have several
        def __call__(self, cell):
            imps = _imports_of_mixed_cell(cell)
            if imps is None or not getattr(self.nb, 'has_docs_', True): return super().__call__(cell)
            self.mixed.append(cell.source.splitlines()[0])
            from execnb.nbio import mk_cell
            return super().__call__(mk_cell(imps))
        def begin(self): self.mixed = []; super().begin()
    ours = {exec_show_docs: exec_show_docs_imports, add_show_docs: add_show_docs_once}
    return [ours.get(p, p) for p in FilterDefaults().procs()]

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

def _heading_level(cell):
    "The level of the heading a markdown cell is made of alone (`## Title` -> 2), else None"
    m = re.fullmatch(r'(#{1,6}) [^\n]*', cell.source.strip()) if cell.cell_type == 'markdown' else None
    return len(m[1]) if m else None

def drop_empty_sections(cells) -> list:
    "`cells` without the headings that nothing follows before the next heading of the same or a higher level"
    def next_level(i):
        "The level of the heading that starts the cell after `i`: 0 at the end, 7 when it starts with no heading"
        if i+1 == len(cells): return 0
        m = re.match(r'(#{1,6}) ', cells[i+1].source.lstrip()) if cells[i+1].cell_type == 'markdown' else None
        return len(m[1]) if m else 7
    return [c for i, c in enumerate(cells) if _heading_level(c) is None or next_level(i) > _heading_level(c)]

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
    nb.cells, nb.metadata['frontmatter'] = drop_empty_sections(cells), fm
    return nb

# ---------------------------------------------------------------- the API reference: what is documented, what must be
_re_api_heading = re.compile(r'\A\s*---\s*\n(?:.*\n)*?#{1,6} +(\S+)[ \t]*$', re.M)

def _api_outputs(cell) -> list:
    "The `show_doc` outputs (markdown) of `cell`"
    return [o for o in cell.get('outputs', []) if _re_api_heading.match(o.get('data', {}).get('text/markdown', ''))]

def documented_names(nb) -> list:
    "The names the API reference of the shown notebook `nb` documents, in page order"
    return [_re_api_heading.match(o['data']['text/markdown'])[1] for c in nb.cells for o in _api_outputs(c)]

def _shown_name(cell):
    "`Class.method` when `cell` is a `show_doc(Class.method)` with no `name` (show_doc names a wrapped method `method`)"
    try: stmts = ast.parse(cell.source).body if cell.cell_type == 'code' else []
    except SyntaxError: return None
    call = stmts[0].value if len(stmts) == 1 and isinstance(stmts[0], ast.Expr) else None
    if not isinstance(call, ast.Call) or getattr(call.func, 'id', None) != 'show_doc' or len(call.args) != 1: return None
    return ast.unparse(call.args[0]) if isinstance(call.args[0], ast.Attribute) and not call.keywords else None

def _tidy_api_doc(md, full=None) -> str:
    "The `show_doc` entry `md` with `ax=None`, not the `ax:NoneType=None` docments infers, and named `full` if given"
    md = re.sub(r'(\w):NoneType=None\b', r'\1=None', md)
    if not full: return md
    short = re.escape(full.rsplit('.', 1)[-1])
    return re.sub(rf'^(#{{1,6}}) {short}[ \t]*$', lambda m: f'{m[1]} {full}', md, count=1, flags=re.M)

def tidy_api_docs(nb):
    "`nb` with its `show_doc` entries tidied (`_tidy_api_doc`)"
    for c in nb.cells:
        full = _shown_name(c)
        for o in _api_outputs(c): o['data']['text/markdown'] = _tidy_api_doc(o['data']['text/markdown'], full)
    return nb

def _module_all(tree) -> list:
    "The names of a module's `__all__`"
    for t in tree.body:
        if isinstance(t, ast.Assign) and any(getattr(tg, 'id', None) == '__all__' for tg in t.targets):
            return list(ast.literal_eval(t.value))
    return []

def _patched_methods(tree) -> list:
    "`Class.method` of the public methods a module patches onto a class (`@patch`, `@patch_to`), as `show_doc` names them"
    from nbdev.doclinks import patch_name
    res = []
    for t in tree.body:
        if not isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef)) or t.name.startswith('_'): continue
        nm = patch_name(t)
        res += [n for n in (nm if isinstance(nm, list) else [nm]) if n != t.name]
    return res

_re_source_nb = re.compile(r'^# AUTOGENERATED! DO NOT EDIT! File to edit: (\S+\.ipynb)', re.M)

def public_names(nb_names, lib=None) -> dict:
    "{name: module} of the public names of the library modules exported from the notebooks `nb_names`"
    lib = Path(lib or root/_settings().get('lib_path', root.name))
    names = {}
    for py in sorted(lib.rglob('*.py')):
        src = py.read_text(encoding='utf-8')
        m = _re_source_nb.search(src)
        if not m or Path(m[1]).name not in nb_names: continue
        tree, mod = ast.parse(src), py.relative_to(lib.parent).with_suffix('').as_posix().replace('/', '.')
        for n in _module_all(tree) + _patched_methods(tree): names.setdefault(n, mod)
    return names

def api_problems(documented:dict, public:dict) -> list:
    "`API reference: ...` for each public name not documented, and each name documented more than once"
    count = Counter(n for names in documented.values() for n in names)
    where = lambda n: ', '.join(p for p, names in documented.items() if n in names)
    return ([f'API reference: {n} (from {m}) is documented on no page' for n, m in public.items() if not count[n]] +
            [f'API reference: {n} is documented {k} times ({where(n)})' for n, k in count.items() if k > 1])

# ---------------------------------------------------------------- processed notebook -> HTML
def _pandoc_id(nbconvert_id):
    "The id pandoc (Quarto) gives the heading nbconvert gave `nbconvert_id`: lower case, only letters, digits, _ - ., from the first letter"
    s = re.sub(r'[^\w.-]', '', html.unescape(nbconvert_id).lower())
    return re.sub(r'^[^a-z]+', '', s) or 'section'

def _quarto_ids(body):
    "`body` with every heading id (and its anchor link) as Quarto makes it, a repeated one numbered (`x-1`) as pandoc does"
    seen, first = Counter(), {}
    def heading(m):
        old = re.search(r' id="([^"]+)"', m[0])[1]
        i = _pandoc_id(old)
        new = f'{i}-{seen[i]}' if seen[i] else i
        seen[i] += 1; first.setdefault(old, new)
        return m[0].replace(f' id="{old}"', f' id="{new}"').replace(f'href="#{old}"', f'href="#{new}"')
    body = re.sub(r'<h[1-6] id="[^"]+">.*?</h[1-6]>', heading, body, flags=re.S)
    return re.sub(r'(href="#)([^"]+)(")', lambda m: m[1] + first.get(m[2], m[2]) + m[3], body)

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

def inline_markdown(text) -> str:
    "`text` (a page description) as HTML, its `code` spans as code"
    return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(text, quote=False))

# ---------------------------------------------------------------- wide figures as their plots
def _runs(mask):
    "(start, end) of each run of True in the 1-D boolean array `mask`"
    import numpy as np
    e = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return list(zip(e[::2], e[1::2]))

def panel_cuts(img) -> list:
    "The columns between the side-by-side plots of the matplotlib figure `img` (a PIL image): [] for one plot"
    import numpy as np
    a = np.asarray(img.convert('L'))
    spines = [(s+e)//2 for s, e in _runs((a < 128).sum(0) >= .65*a.shape[0])]   # an axes' frame: long vertical lines
    if len(spines) < 4 or len(spines) % 2: return []
    blank = (a >= 245).all(0)
    cuts = []
    for r, l in zip(spines[1:-1:2], spines[2::2]):                   # right edge of a plot, left edge of the next
        gaps = [(e-s, (s+e)//2) for s, e in _runs(blank[r:l])]
        if not gaps: return []
        cuts.append(r + max(gaps)[1])
    return cuts

_min_wide = 2.2   # width / height from which a figure of several plots is shown as its plots

def split_figure(fn) -> list:
    "The plots of the wide figure file `fn`, written next to it as `name.1.png`, ...; [] when it is not one"
    from PIL import Image, UnidentifiedImageError
    try: img = Image.open(fn)
    except UnidentifiedImageError: return []
    with img:
        cuts = panel_cuts(img) if img.width >= _min_wide*img.height else []
        edges = [0, *cuts, img.width]
        parts = [fn.with_name(f'{fn.stem}.{i+1}.png') for i in range(len(cuts) + 1)] if cuts else []
        for p, a, b in zip(parts, edges, edges[1:]): img.crop((a, 0, b, img.height)).save(p)
    return parts

def _attr(tag, name):
    "The value of the attribute `name` of the HTML start tag `tag` ('' when it has none)"
    m = re.search(rf'\s{name}="([^"]*)"', tag)
    return html.unescape(m[1]) if m else ''

def figures_as_plots(body, out) -> str:
    "`body` with each wide figure of several plots (an image file of the site) shown as its plots, two to a row"
    def fix(m):
        src, alt = _attr(m[0], 'src'), _attr(m[0], 'alt')
        fn = out/unquote(src)
        parts = split_figure(fn) if src and ':' not in src and fn.is_file() and fn.suffix == '.png' else []
        if not parts: return m[0]
        imgs = ''.join(f'<img src="{p.relative_to(out).as_posix()}" alt="{html.escape(alt)} ({i+1} of {len(parts)})">'
                       for i, p in enumerate(parts))
        return f'<a class="plots" href="{html.escape(src)}" title="{html.escape(alt)}: the whole figure">{imgs}</a>'
    return re.sub(r'<img\b[^>]*>', fix, body)

# ---------------------------------------------------------------- search
class _Sections(HTMLParser):
    "The text of a page cut at its headings: [id, heading, text] per heading, the text before the first first"
    def __init__(self, text):
        super().__init__(); self.secs, self.in_heading, self.skip = [['', '', '']], False, 0
        self.feed(text)
    def handle_starttag(self, tag, attrs):
        if tag in ('script', 'style'): self.skip += 1
        elif re.fullmatch(r'h[1-6]', tag): self.secs.append([dict(attrs).get('id', ''), '', '']); self.in_heading = True
    def handle_endtag(self, tag):
        if tag in ('script', 'style'): self.skip -= 1
        elif re.fullmatch(r'h[1-6]', tag): self.in_heading = False
    def handle_data(self, data):
        if not self.skip: self.secs[-1][1 if self.in_heading else 2] += data

_max_text = 1000   # characters of a section's text the index keeps

def search_entries(page, title, desc, body) -> list:
    "The search index entries of a page: one per section, `u` (link), `p` (page title), `h` (heading), `x` (text)"
    res = []
    for i, (anchor, heading, text) in enumerate(_Sections(body).secs):
        heading, text = heading.replace('¶', '').strip(), ' '.join(text.split())
        if i == 0: heading, text = title, f'{desc} {text}'.strip()
        if heading or text: res.append({'u': f'{page}#{anchor}' if anchor else page, 'p': title, 'h': heading, 'x': text[:_max_text]})
    return res

def search_index_js(entries) -> str:
    "The search index as a script (a page opened from disk may not fetch a JSON file)"
    return 'window.searchIndex = ' + json.dumps(entries, ensure_ascii=False, separators=(',', ':')) + ';\n'

_search_js = Path(__file__).resolve().parent/'search.js'   # the search box's script, copied into the site

# ---------------------------------------------------------------- pages
_page = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{head_title}</title><link rel="stylesheet" href="site.css"></head>
<body><nav class="sidebar"><a class="site" href="index.html">{site}</a>
<div class="search"><input id="search" type="search" placeholder="Search" autocomplete="off" aria-label="Search the site">
<ol id="search-results"></ol></div><ul>
{nav}
</ul></nav>
<main><header><h1 class="title">{title}</h1>{description}</header>
{body}
<nav class="pager">{prev}{next}</nav></main>
<script src="search_index.js"></script><script src="search.js"></script></body></html>
"""

_css = """body{margin:0;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212529;display:flex}
.sidebar{position:sticky;top:0;height:100vh;overflow:auto;width:15rem;flex:none;padding:1.2rem;border-right:1px solid #dee2e6;background:#f8f9fa;box-sizing:border-box}
.sidebar .site{font-weight:600;font-size:1.1rem;color:#212529;text-decoration:none}.sidebar ul{list-style:none;padding:0;margin:1rem 0}
.sidebar li a{display:block;padding:.25rem .5rem;border-radius:4px;color:#495057;text-decoration:none}.sidebar li a.active{background:#e9ecef;font-weight:600}
.search{margin-top:.8rem}.search input{width:100%;box-sizing:border-box;padding:.35rem .5rem;border:1px solid #ced4da;border-radius:4px;font:inherit;font-size:.9rem}
#search-results{list-style:none;padding:0;margin:.3rem 0 0;font-size:.85rem}#search-results:empty{display:none}
#search-results li a{display:block;padding:.3rem .4rem;border-bottom:1px solid #e9ecef;color:#212529;text-decoration:none}#search-results li a:hover{background:#e9ecef}
#search-results strong{display:block;overflow-wrap:anywhere}#search-results .page{display:block;color:#2761a5;font-size:.8rem}
#search-results small{display:block;color:#6c757d}#search-results .none{color:#6c757d;padding:.3rem .4rem}
main{max-width:60rem;padding:1.5rem 2.5rem;min-width:0;flex:1}h1.title{margin-bottom:.2rem}.description{color:#6c757d;font-size:1.1rem}
a{color:#2761a5}code{font-size:.9em;background:#f6f8fa;padding:.1em .3em;border-radius:3px}
pre{white-space:pre-wrap;overflow-wrap:anywhere}pre code{padding:0;background:none}
.input_area pre,.highlight pre{background:#f6f8fa;padding:.7rem;border-radius:4px;font-size:.85em;line-height:1.4}
.output_area pre{padding:.3rem .7rem;font-size:.85em;max-height:30rem;overflow:auto}.output_area img{max-width:100%}
.output_html,.text_cell_render{overflow-x:auto}
.output_markdown hr{border:0;border-top:1px solid #dee2e6;margin:2rem 0 0}
.text_cell_render img{display:block;margin:1rem 0}
a.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.8rem;margin:1rem 0}a.plots img{margin:0;width:100%}
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
                        description=f'<p class="description">{inline_markdown(desc)}</p>' if desc else '',
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

def _fresh_out(out):
    "Empty `out` (made, or replaced when it is a site this script wrote)"
    if out.exists() and any(out.iterdir()) and not (out/'site.css').is_file():
        raise SystemExit(f'--out {out}: the folder exists and is not a site this script wrote; it is replaced, so give another')
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)

def _page_list(nb_paths, shown):
    "(file name, title, description) of each page"
    fm = lambda nb, k: str(nb.metadata.frontmatter.get(k) or '')
    return [(page_name(p), fm(nb, 'title') or p.stem, fm(nb, 'description')) for p, nb in zip(nb_paths, shown)]

def _write_assets(out, entries):
    "The style sheet and the search scripts"
    (out/'site.css').write_text(_css + HtmlFormatter().get_style_defs('.highlight'), encoding='utf-8')
    (out/'search_index.js').write_text(search_index_js(entries), encoding='utf-8')
    shutil.copy(_search_js, out/'search.js')

def build(nbs=root/'nbs', out=root/'_docs', site=None, log=print, lib=None) -> list:
    "Write the site of the notebooks in `nbs` into `out`; its problems (broken links, API reference), [] when none"
    nbs, out = Path(nbs), Path(out)
    site = site or _settings().get('title', root.name)
    _fresh_out(out)
    if (nbs/'images').is_dir(): shutil.copytree(nbs/'images', out/'images')
    nb_paths = notebooks(nbs)
    names = {p.name: page_name(p) for p in nb_paths}
    shown = [tidy_api_docs(shown_cells(nbdev_processed(p, log))) for p in nb_paths]
    pages, entries = _page_list(nb_paths, shown), []
    for i, nb in enumerate(shown):
        body = figures_as_plots(body_html(nb, names), out)
        entries += search_entries(*pages[i], body)
        (out/pages[i][0]).write_text(page_html(site, pages, i, body), encoding='utf-8')
        log(f'{nb_paths[i].name} -> {out/pages[i][0]}')
    _write_assets(out, entries)
    documented = {pages[i][0]: documented_names(nb) for i, nb in enumerate(shown)}
    return broken_links(out) + api_problems(documented, public_names(set(names), lib))

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', default=str(root/'nbs'), help='folder of the notebooks')
    ap.add_argument('--out', default=str(root/'_docs'), help='folder the site is written to (replaced)')
    a = ap.parse_args()
    bad = build(a.nbs, a.out)
    if bad: sys.exit(f'{len(bad)} problem(s) in the site:\n' + '\n'.join(f'  {b}' for b in bad))
    print(f'the site is in {a.out}; every internal link works, and the API reference has every public name once')
