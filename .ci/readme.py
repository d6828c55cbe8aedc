"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed here).

`python .ci/readme.py` writes README.md; `python .ci/readme.py --check` fails when README.md is stale.
Markdown cells are copied; code cells are shown as Python blocks with their text outputs, except
cells marked `#| hide`; `#|` directive lines are dropped. Images the notebook links as `images/x.png`
(next to the notebook) are linked as `nbs/images/x.png` (next to the README)."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

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

def readme_text(nb_path=root/'nbs'/'index.ipynb'):
    "The README's markdown, made from the index notebook."
    nb = json.loads(Path(nb_path).read_text())
    blocks = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown': blocks.append(src.strip().replace('](images/', '](nbs/images/'))
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
