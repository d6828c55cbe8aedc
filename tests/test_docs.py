"The docs site builder (.ci/docs.py): pages, API reference, images, navigation, placeholders, and broken links caught"
import importlib.util, json, shutil, subprocess, sys
from pathlib import Path
import pytest
pytest.importorskip('nbconvert'); pytest.importorskip('nbdev')       # the development extras (the newest-fastai CI environment lacks them)
import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell

root = Path(__file__).resolve().parent.parent

def load_docs():
    spec = importlib.util.spec_from_file_location('docs', root/'.ci'/'docs.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

docs = load_docs()

def write_nb(path, *cells):
    nbformat.write(new_notebook(cells=list(cells), metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}), path)

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site of two real notebooks (the index and the metrics) and the images"
    nbs, out = tmp_path_factory.mktemp('nbs'), tmp_path_factory.mktemp('site')
    for n in ('index.ipynb', '00_metrics.ipynb'): shutil.copy(root/'nbs'/n, nbs/n)
    shutil.copytree(root/'nbs'/'images', nbs/'images')
    return out, docs.build(nbs, out, log=lambda *a: None)

def test_pages_navigation_and_images(site):
    out, bad = site
    assert bad == []
    assert sorted(p.name for p in out.glob('*.html')) == ['index.html', 'metrics.html']
    index, metrics = (out/'index.html').read_text(), (out/'metrics.html').read_text()
    assert '<h1 class="title">fastreid_rollback</h1>' in index and 'src="images/cmc.png"' in index and (out/'images'/'cmc.png').is_file()
    for page in (index, metrics): assert 'href="index.html"' in page and 'href="metrics.html"' in page and 'site.css' in page
    assert 'class="next" href="metrics.html"' in index and 'class="prev" href="index.html"' in metrics
    assert (out/'site.css').stat().st_size > 1000
    assert '#| ' not in metrics and 'show_doc(' not in metrics           # directives and show_doc calls are not shown

def test_api_reference_from_show_doc(site):
    metrics = (site[0]/'metrics.html').read_text()
    for name in ('reid_metrics', 'reid_metrics_from_dist', 'protocol_mask', 'reidresult.rank'): assert f'<h3 id="{name}"' in metrics
    assert 'identity of each query' in metrics                          # a docments comment of protocol_mask's signature
    assert 'data:image/png;base64' in metrics                           # the CMC plot of an example

def test_placeholders_filled(tmp_path, monkeypatch):
    import readme
    res = tmp_path/'results'; res.mkdir()
    (res/'bench.json').write_text(json.dumps({'market': {'library_ms': 12.345}}))
    monkeypatch.setattr(readme, 'results_dir', res)
    nbs, out = tmp_path/'nbs', tmp_path/'out'; nbs.mkdir()
    write_nb(nbs/'index.ipynb', new_markdown_cell('# Home\n\n> the site'), new_markdown_cell('Market in {{bench.market.library_ms:.1f}} ms'))
    assert docs.build(nbs, out, site='t', log=lambda *a: None) == []
    assert 'Market in 12.3 ms' in (out/'index.html').read_text()
    write_nb(nbs/'index.ipynb', new_markdown_cell('{{bench.market.gpu_ms}}'))
    with pytest.raises(SystemExit, match='bench.market.gpu_ms'): docs.build(nbs, out, site='t', log=lambda *a: None)

def test_broken_links_are_caught(tmp_path):
    nbs, out = tmp_path/'nbs', tmp_path/'out'
    (nbs/'images').mkdir(parents=True)
    (nbs/'images'/'a.png').write_bytes(b'\x89PNG')
    write_nb(nbs/'index.ipynb', new_markdown_cell('# Home\n\n> the site'),
             new_markdown_cell('[ok](01_guide.ipynb#step-two) [ok too](01_guide.ipynb) ![ok](images/a.png) [web](https://example.com/x.html#y)'))
    write_nb(nbs/'01_guide.ipynb', new_markdown_cell('# Guide'), new_markdown_cell('## Step two\n\n[back](index.ipynb#nowhere)'),
             new_markdown_cell('[gone](02_gone.ipynb) ![gone](images/b.png) [here](#step-two) [not here](#step-three)'),
             new_code_cell('#| echo: false\n1+1'))
    bad = docs.build(nbs, out, site='t', log=lambda *a: None)
    assert sorted(bad) == ['guide.html: #step-three (no anchor #step-three in guide.html)',
                           'guide.html: 02_gone.ipynb (no such page or file)',
                           'guide.html: images/b.png (no such page or file)',
                           'guide.html: index.html#nowhere (no anchor #nowhere in index.html)']
    res = subprocess.run([sys.executable, str(root/'.ci'/'docs.py'), '--nbs', str(nbs), '--out', str(out)], capture_output=True, text=True)
    assert res.returncode == 1 and '4 broken link(s)' in res.stderr and 'guide.html: 02_gone.ipynb' in res.stderr
