"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed here).

`python .ci/readme.py` writes README.md; `python .ci/readme.py --check` fails when README.md is stale.
Markdown cells are copied; code cells are shown as Python blocks with their text outputs, except
cells marked `#| hide`; `#|` directive lines are dropped. Images the notebook links as `images/x.png`
(next to the notebook) are linked as `nbs/images/x.png` (next to the README).

Figures are never typed by hand: a placeholder `{{name.key.key[0]:fmt}}` in a markdown cell is replaced by
the value at that path in `benchmarks/results/name.json`, formatted with the optional format spec
(`{{metrics.market.library_s:.2f}}`). A missing file or key stops the generator with its name."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
results_dir = root/'benchmarks'/'results'

def _src(cell): return ''.join(cell['source'])

def _is_hidden(src): return any(l.replace(' ', '') in ('#|hide', '#|include:false') for l in src.splitlines())

def _output_text(out):
    if out['output_type'] == 'stream': return ''.join(out['text'])
    data = out.get('data', {})
    if 'text/markdown' in data: return None, ''.join(data['text/markdown'])
    return ''.join(data.get('text/plain', ''))

def _code_md(src, outputs):
    code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('#|')).strip()
    parts = [f'```python\n{code}\n```'] if code else []
    for out in outputs:
        text = _output_text(out)
        if isinstance(text, tuple): parts.append(text[1].strip())
        elif text.strip(): parts.append('```\n' + text.rstrip() + '\n```')
    return '\n\n'.join(parts)

_placeholder = re.compile(r'\{\{\s*([\w-]+)((?:\.[\w-]+|\[-?\d+\])*)\s*(?::([^}]*))?\}\}')

def result_value(name:str, path:str=''):
    "The value at `path` (`.key` and `[i]` steps) in `benchmarks/results/{name}.json`"
    fn = results_dir/f'{name}.json'
    if not fn.is_file(): raise SystemExit(f'{fn} does not exist: run the benchmark that writes it')
    v = json.loads(fn.read_text())
    for key,idx in re.findall(r'\.([\w-]+)|\[(-?\d+)\]', path):
        try: v = v[key] if key else v[int(idx)]
        except (KeyError, IndexError, TypeError): raise SystemExit(f'{fn} has no {name}{path}') from None
    return v

def fill_results(text:str) -> str:
    "`text` with every `{{name.path:fmt}}` placeholder replaced by the benchmark result it names"
    return _placeholder.sub(lambda m: format(result_value(m[1], m[2]), m[3] or ''), text)

def readme_text(nb_path=root/'nbs'/'index.ipynb'):
    "The README's markdown, made from the index notebook."
    nb = json.loads(Path(nb_path).read_text())
    blocks = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown': blocks.append(fill_results(src.strip()).replace('](images/', '](nbs/images/'))
        elif cell['cell_type'] == 'code' and not _is_hidden(src): blocks.append(_code_md(src, cell.get('outputs', [])))
    note = '<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->'
    return note + '\n\n' + '\n\n'.join(b for b in blocks if b) + '\n'

if __name__ == '__main__':
    text, readme = readme_text(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md differs from nbs/index.ipynb: run `python .ci/readme.py` and commit README.md.')
        print('README.md agrees with nbs/index.ipynb.')
    else: readme.write_text(text)
