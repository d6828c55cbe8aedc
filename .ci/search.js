// The search box of the docs site (.ci/docs.py copies it in): window.searchIndex (search_index.js) holds one entry per
// section, {u: link, p: page title, h: heading, x: text}; every word of the query must appear in one of them, headings
// weigh most. `?q=words` in the address runs a search when the page opens.
(function () {
  var box = document.getElementById('search'), list = document.getElementById('search-results');
  if (!box || !list) return;
  var docs = (window.searchIndex || []).map(function (d) {
    return {d: d, h: d.h.toLowerCase(), p: d.p.toLowerCase(), x: d.x.toLowerCase()};
  });
  function count(s, t) { var n = 0, i = s.indexOf(t); while (i >= 0 && n < 5) { n++; i = s.indexOf(t, i + t.length); } return n; }
  function score(e, words) {
    var s = 0;
    for (var i = 0; i < words.length; i++) {
      var w = words[i], k = (e.h === w ? 50 : 0) + (e.h.indexOf(w) >= 0 ? 10 : 0) + (e.p.indexOf(w) >= 0 ? 2 : 0) + count(e.x, w);
      if (!k) return 0;
      s += k;
    }
    return s;
  }
  function snippet(x, w) {
    var i = Math.max(0, x.toLowerCase().indexOf(w) - 40);
    return (i ? '\u2026' : '') + x.slice(i, i + 120) + (i + 120 < x.length ? '\u2026' : '');
  }
  function add(parent, tag, text, cls) {
    var el = document.createElement(tag); el.textContent = text; if (cls) el.className = cls; parent.appendChild(el); return el;
  }
  function show(q) {
    var words = q.toLowerCase().split(/\s+/).filter(Boolean);
    list.textContent = '';
    if (!words.length) return;
    var hits = docs.map(function (e) { return [score(e, words), e]; }).filter(function (h) { return h[0] > 0; });
    hits.sort(function (a, b) { return b[0] - a[0]; });
    if (!hits.length) { add(list, 'li', 'No match', 'none'); return; }
    hits.slice(0, 12).forEach(function (h) {
      var a = add(add(list, 'li', ''), 'a', ''), d = h[1].d;
      a.href = d.u;
      add(a, 'strong', d.h || d.p); add(a, 'span', d.p, 'page'); add(a, 'small', snippet(d.x, words[0]));
    });
  }
  box.addEventListener('input', function () { show(box.value); });
  box.addEventListener('keydown', function (ev) {
    var first = list.querySelector('a');
    if (ev.key === 'Enter' && first) window.location.href = first.href;
    if (ev.key === 'Escape') { box.value = ''; show(''); }
  });
  var q = new URLSearchParams(window.location.search).get('q');
  if (q) { box.value = q; show(q); }
})();
