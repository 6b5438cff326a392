"""Check the built book in headless Chromium, offline, as a reader sees it at 1280 px wide.

    python .ci/render_check.py _build/html _build/screenshots [--report _build/render_report.json]

Serves the site on 127.0.0.1, drives Chromium through the DevTools protocol over a pipe
(--remote-debugging-pipe: no extra packages) and measures every page of book/*.html. Each defect has
a class:

  overflow          an output, table or display formula wider than the content column: content hidden
                    or behind a horizontal scrollbar (scrollWidth > clientWidth), or drawn past the
                    column's right edge; long code *inputs* may scroll
  figure-text       plotly text (titles, annotations such as subplot titles, axis titles, tick labels,
                    legend, colour bar, sliders) overlapping other text, cut by the figure's edge, or
                    covered by the mode-bar (the toolbar shown when the pointer is over the figure)
  machine-path      an absolute path of the build machine (/tmp, /work, /root, /home, C:\\...) in the text
  raw-repr          a Python dict or pandas DataFrame/Series repr in an output, or pandas' default HTML
                    table with its bare integer index
  long-number       a number with more than 8 significant digits in an output
  traceback         an error output or a "Traceback (most recent call last)"
  warning           an stderr output block or a "...Warning: ..." line in an output
  broken-link       a link to a local page or file that is not served, or to an anchor that is not there
  broken-image      an image that does not load
  figure-not-drawn, maths-not-typeset, raw-tex, slider, console, external-asset
                    plotly figures drawn, MathJax typeset, a precomputed slider switches its traces,
                    no console error or exception, no request leaving the machine, no CDN asset

Every defect is printed with its page, class and detail, and all are written to a JSON report (by
default render_report.json beside the screenshots folder). Screenshots: each page's top, each figure,
a slider moved to its last step, and the first few defects of each page. Exits 1 on any defect.

The checks run on any folder of HTML pages (check_site), so tests can plant defects in small pages.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

VIEWPORT = {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
SHOTS_PER_PAGE = 8  # defect screenshots kept per page
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "--hide-scrollbars", "--mute-audio"]
EXTERNAL_ASSET = re.compile(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//(?!127\.0\.0\.1)[^"]+"[^>]*>')

STATE_JS = """(() => {
  const figs = [...document.querySelectorAll('.plotly-graph-div')];
  const main = document.querySelector('main') || document.body || document.documentElement;
  return {
    ready: document.readyState === 'complete' && location.protocol === 'http:',
    figures: figs.length,
    drawn: figs.filter(f => f.querySelector('svg.main-svg')).length,
    sliders: figs.filter(f => f.layout && f.layout.sliders && f.layout.sliders.length).length,
    math_nodes: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    raw_tex: ((main && main.innerText || '').match(/\\$\\$|\\\\\\[|\\\\\\(/g) || []).length,
    mathjax: !!(window.MathJax && window.MathJax.startup),
  };
})()"""

SLIDER_JS = """(async () => {
  const gd = [...document.querySelectorAll('.plotly-graph-div')].find(f => f.layout && f.layout.sliders);
  gd.scrollIntoView({block: 'center'});
  const steps = gd.layout.sliders[0].steps, last = steps[steps.length - 1];
  await Plotly.update(gd, last.args[0], {...last.args[1], 'sliders[0].active': steps.length - 1});
  const shown = gd.data.map((t, i) => t.visible === true ? i : -1).filter(i => i >= 0);
  const want = last.args[0].visible.map((v, i) => v ? i : -1).filter(i => i >= 0);
  return {ok: JSON.stringify(shown) === JSON.stringify(want), title: gd.layout.title.text,
          figure: [...document.querySelectorAll('.plotly-graph-div')].indexOf(gd)};
})()"""

# Shared helpers of the page-side measurements. Boxes are in document coordinates (for screenshots).
HELPERS_JS = r"""
const TOL = 2;  // px: sub-pixel rounding and anti-aliasing are not defects
const TEXT_TOL = 4;  // px: a text's box holds its line height, a few px above and below the glyphs
const column = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
const colRect = column.getBoundingClientRect();
const found = [];
const boxOf = r => ({x: Math.round(r.left + scrollX), y: Math.round(r.top + scrollY), w: Math.round(r.width), h: Math.round(r.height)});
const add = (cls, detail, rect) => found.push({cls, detail, box: rect ? boxOf(rect) : null});
const clip = (s, n = 60) => { s = (s || '').replace(/\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n - 1) + '…' : s; };
const SKIP_TEXT = new Set(['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE', 'svg', 'MJX-CONTAINER']);
// Text of a subtree as a reader reads it: blocks and table cells separated, scripts, SVG figures and
// typeset maths left out.
const textOf = (root, leaveOut = null) => {
  const parts = [];
  const walk = node => {
    if (node.nodeType === Node.TEXT_NODE) { parts.push(node.nodeValue); return; }
    if (node.nodeType !== Node.ELEMENT_NODE || SKIP_TEXT.has(node.tagName) ||
        node.classList.contains('plotly-graph-div') || (leaveOut && node.matches(leaveOut))) return;
    const tag = node.tagName;
    const block = !['SPAN', 'A', 'B', 'I', 'EM', 'STRONG', 'CODE', 'SUB', 'SUP', 'SMALL', 'ABBR', 'TD', 'TH'].includes(tag);
    if (tag === 'BR' || block) parts.push('\n');
    for (const child of node.childNodes) walk(child);
    if (tag === 'TD' || tag === 'TH') parts.push(' \t ');
    else if (block) parts.push('\n');
  };
  walk(root);
  return parts.join('');
};
const firstLine = el => clip((textOf(el).trim().split('\n')[0]));
const figureName = gd => {  // "figure 3" and its title, numbered in page order
  const title = gd.layout && gd.layout.title, text = typeof title === 'string' ? title : title && title.text;
  return `figure ${[...document.querySelectorAll('.plotly-graph-div')].indexOf(gd) + 1}` +
         (text ? ` "${clip(text.replace(/<[^>]+>/g, ' '), 50)}"` : '');
};
"""

OVERFLOW_JS = r"""
// Blocks: each output of a cell, each table, each display formula. An element in a block overflows
// when its content is hidden or scrolls (overflow-x not visible and scrollWidth > clientWidth), or
// when it is drawn past the column's right edge. Code inputs (and code listings in the text) may scroll.
const isCode = el => !!el.closest('.cell_input') ||
  (!el.closest('.cell_output') && !!el.closest('pre, div[class*="highlight-"]'));
const blocks = new Map();
const addBlock = (el, kind) => { if (!blocks.has(el)) blocks.set(el, kind); };
column.querySelectorAll('.cell_output > *').forEach(el => addBlock(el, 'output'));
column.querySelectorAll('table').forEach(t => {
  if (!t.closest('.cell_output') && !isCode(t))
    addBlock(t.closest('.pst-scrollable-table-container, .table-wrapper') || t, 'table');
});
column.querySelectorAll('div.math, mjx-container[display="true"]').forEach(m => {
  if (!m.closest('.cell_output')) addBlock(m.closest('div.math') || m, 'display maths');
});
const NOT_DRAWN = new Set(['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE']);
const measured = el => {
  const out = [el];
  const walk = node => {
    for (const child of node.children) {
      if (NOT_DRAWN.has(child.tagName)) continue;
      out.push(child);
      // of a figure, an SVG or a typeset formula only the outer box counts (the figure check reads the text)
      if (!child.classList.contains('plotly-graph-div') && child.tagName !== 'MJX-CONTAINER' && child.tagName !== 'svg')
        walk(child);
    }
  };
  walk(el);
  return out;
};
const texOf = el => {  // the formula's TeX source, as MathJax keeps it
  try { return MathJax.startup.document.getMathItemsWithin(el)[0].math; } catch (e) { return el.textContent; }
};
for (const [block, kind] of blocks) {
  let hidden = 0, beyond = 0;
  for (const el of measured(block)) {
    if (isCode(el)) continue;
    const cs = getComputedStyle(el);
    if (cs.display === 'none' || cs.display === 'inline' || cs.display === 'contents') continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    const clips = cs.overflowX !== 'visible';
    if (clips && el.scrollWidth - el.clientWidth > hidden) hidden = el.scrollWidth - el.clientWidth;
    const right = clips ? r.right : Math.max(r.right, r.left + el.clientLeft + el.scrollWidth);
    beyond = Math.max(beyond, right - colRect.right);
  }
  const fig = block.querySelector('.plotly-graph-div');
  const what = fig ? figureName(fig)
             : kind === 'display maths' ? `display maths "${clip(texOf(block), 50)}"`
             : `${kind === 'output' && block.querySelector('table') ? 'output table' : kind} "${firstLine(block)}"`;
  if (hidden > TOL)
    add('overflow', `${what} is ${Math.round(hidden)} px wider than its box (cut or behind a horizontal scrollbar)`,
        block.getBoundingClientRect());
  else if (beyond > TOL)
    add('overflow', `${what} extends ${Math.round(beyond)} px past the content column`, block.getBoundingClientRect());
}
const page = document.scrollingElement;
if (page.scrollWidth - page.clientWidth > TOL)
  add('overflow', `the page scrolls sideways by ${page.scrollWidth - page.clientWidth} px`, null);
"""

FIGURE_JS = r"""
// Plotly text: each text element of the info layer (titles, annotations, axis titles) and each tick
// label is one item; a legend, colour bar, slider or menu is one item as a whole. Two items overlap when
// their boxes share more than TEXT_TOL px both ways (tick labels against each other are plotly's business);
// an item is cut when it reaches outside the figure's SVG; the mode-bar must not cover any item but
// tick labels.
const visible = (el, stop) => {
  const r = el.getBoundingClientRect();
  if (r.width < 1 || r.height < 1) return false;
  for (let e = el; e && e !== stop; e = e.parentElement) {
    const cs = getComputedStyle(e);
    if (cs.display === 'none' || cs.visibility === 'hidden' || cs.opacity === '0') return false;
  }
  return true;
};
const overlap = (a, b) => [Math.min(a.right, b.right) - Math.max(a.left, b.left),
                           Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top)];
const GROUPS = {'g.legend': 'legend', 'g.colorbar': 'colour bar', 'g.slider-container': 'slider',
                'g.updatemenu-container': 'menu'};
const kindOf = el => {
  const c = el.getAttribute('class') || '';
  if (/\bgtitle\b/.test(c)) return 'title';
  if (/annotation/.test(c)) return 'annotation';
  if (/^[xyz]\d*title\b/.test(c)) return 'axis title';
  return 'text';
};
const figures = [...document.querySelectorAll('.plotly-graph-div')];
const onlyFigure = typeof ONLY_FIGURE === 'number' ? ONLY_FIGURE : -1;
figures.forEach((gd, index) => {
  if (onlyFigure >= 0 && index !== onlyFigure) return;
  const svg = gd.querySelector('svg.main-svg');
  if (!svg) return;
  const fig = svg.getBoundingClientRect();
  const name = figureName(gd);
  const items = [];
  const inGroup = el => Object.keys(GROUPS).some(sel => el.closest(sel));
  for (const [sel, kind] of Object.entries(GROUPS))
    gd.querySelectorAll(sel).forEach(g => {
      const named = ['.cbtitle text', '.legendtitletext', '.slider-currentvalue', 'text'].map(q => g.querySelector(q)).find(t => t);
      if (visible(g, gd)) items.push({kind, label: clip(named ? named.textContent : '', 40), r: g.getBoundingClientRect()});
    });
  gd.querySelectorAll('.infolayer text').forEach(t => {
    if (!inGroup(t) && t.textContent.trim() && visible(t, gd))
      items.push({kind: kindOf(t), label: clip(t.textContent, 40), r: t.getBoundingClientRect()});
  });
  gd.querySelectorAll('.xtick > text, .ytick > text').forEach(t => {
    if (t.textContent.trim() && visible(t, gd)) items.push({kind: 'tick label', label: clip(t.textContent, 20), r: t.getBoundingClientRect()});
  });
  const say = it => `${it.kind} "${it.label}"`;
  for (const it of items) {
    const cut = {left: fig.left - it.r.left, right: it.r.right - fig.right, top: fig.top - it.r.top, bottom: it.r.bottom - fig.bottom};
    const [side, by] = Object.entries(cut).sort((a, b) => b[1] - a[1])[0];
    if (by > TEXT_TOL) add('figure-text', `${name}: ${say(it)} is cut at the ${side} by ${Math.round(by)} px`, it.r);
  }
  for (let i = 0; i < items.length; i++)
    for (let j = i + 1; j < items.length; j++) {
      const a = items[i], b = items[j];
      if (a.kind === 'tick label' && b.kind === 'tick label') continue;
      const [w, h] = overlap(a.r, b.r);
      if (w > TEXT_TOL && h > TEXT_TOL)
        add('figure-text', `${name}: ${say(a)} overlaps ${say(b)} (${Math.round(w)} x ${Math.round(h)} px)`, a.r);
    }
  const bar = gd.querySelector('.modebar');
  if (bar && getComputedStyle(bar).display !== 'none') {
    const r = bar.getBoundingClientRect();
    const when = bar.classList.contains('modebar--hover') ? ' when the pointer is over the figure' : '';
    for (const it of items) {
      if (it.kind === 'tick label') continue;
      const [w, h] = overlap(r, it.r);
      if (w > TEXT_TOL && h > TEXT_TOL)
        add('figure-text', `${name}: the mode-bar (toolbar) covers ${say(it)}${when} (${Math.round(w)} x ${Math.round(h)} px)`, it.r);
    }
  }
});
"""

CONTENT_JS = r"""
// Machine paths anywhere in the page's text (hidden code included: it is published too).
const PATH = /(?:^|[\s"'`(=\[{,;])((?:\/(?:tmp|work|root|home|Users|private\/tmp|var\/folders)\/[^\s"'`<>)\]},;]+)|[A-Za-z]:\\[^\s"'`<>]+)/g;
const findPaths = (el, where, leaveOut = null) => {
  const paths = [...new Set([...textOf(el, leaveOut).matchAll(PATH)].map(m => m[1]))];
  if (paths.length)
    add('machine-path', `${paths.length} in ${where}: ${paths.slice(0, 3).map(p => clip(p, 70)).join(', ')}` +
        (paths.length > 3 ? ', …' : ''), el === document.body ? null : el.getBoundingClientRect());
};
document.querySelectorAll('.cell_input').forEach(el => findPaths(el, 'a code input'));
document.querySelectorAll('.cell_output').forEach(el => findPaths(el, 'an output'));
findPaths(document.body, 'the text', '.cell_input, .cell_output');
// Outputs: raw reprs, long numbers, tracebacks, warnings.
const DICT = /\{\s*(['"])[^'"\n]{1,60}\1\s*:\s*[^\n]{0,40}/;
const SERIES = /^(?:Name: .*, )?dtype: \w+$/m;
const NUMBER = /(?<![\w.,])(\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?![\w]|\.\d)/g;
const significant = mantissa => {
  let digits = mantissa.replace('.', '').replace(/^0+/, '');
  if (!mantissa.includes('.')) digits = digits.replace(/0+$/, '');
  return digits.length;
};
// pandas prints column labels indented past the index, then rows led by the index, left-aligned: 0, 1, ...
// (an index name, when set, takes a line of its own between the two).
const dataFrameText = text => {
  const lines = text.split('\n');
  for (let i = 1; i + 1 < lines.length; i++)
    if (/^0 {2,}\S/.test(lines[i]) && /^1 {2,}\S/.test(lines[i + 1]) &&
        lines.slice(Math.max(0, i - 2), i).some(line => /^ {2,}\S/.test(line))) return lines[i];
  return null;
};
// pandas' HTML: an index of bare row numbers 0, 1, ...; or the DataFrame shown as it is (its
// _repr_html_ brings a scoped style for .dataframe), raw column names, index and numbers.
const bareIndex = t => {
  const heads = [...t.querySelectorAll('tbody > tr')].slice(0, 2).map(tr => tr.firstElementChild);
  return heads.length > 0 && heads.every((th, i) => th && th.tagName === 'TH' && th.textContent.trim() === String(i));
};
const defaultDisplay = block => [...block.querySelectorAll('style')].some(st => st.textContent.includes('.dataframe'));
column.querySelectorAll('.cell_output > *').forEach(block => {
  const r = block.getBoundingClientRect();
  const text = textOf(block);
  const cls = block.getAttribute('class') || '';
  const dict = text.match(DICT);
  if (dict) add('raw-repr', `dict repr in an output: "${clip(dict[0], 70)}"`, r);
  const frame = block.querySelector('pre') ? dataFrameText(text) : null;
  if (frame) add('raw-repr', `DataFrame repr in an output: "${clip(frame, 60)}"`, r);
  else if (SERIES.test(text)) add('raw-repr', `pandas Series repr in an output: "${clip(text.match(SERIES)[0])}"`, r);
  const table = block.querySelector('table.dataframe');
  const columns = table && clip(table.querySelector('thead') ? table.querySelector('thead').textContent : '', 60);
  if (table && bareIndex(table)) add('raw-repr', `pandas' default table with its integer index: "${columns}"`, r);
  else if (table && defaultDisplay(block)) add('raw-repr', `a DataFrame shown as pandas displays it (raw names, index, numbers): "${columns}"`, r);
  const longs = new Set();
  for (const m of text.matchAll(NUMBER))
    if (significant(m[1]) > 8) longs.add(m[0]);
  if (longs.size) add('long-number', `${longs.size} number(s) with more than 8 significant digits in "${firstLine(block)}": ${[...longs].slice(0, 3).join(', ')}`, r);
  if (/\b(traceback|error)\b/.test(cls) || text.includes('Traceback (most recent call last)'))
    add('traceback', `error output: "${clip(text.trim().split('\n').slice(-1)[0] || firstLine(block))}"`, r);
  if (/\bstderr\b/.test(cls)) add('warning', `stderr output: "${firstLine(block)}"`, r);
  else {
    const warning = text.match(/^.*\b\w*Warning: .*$/m);
    if (warning) add('warning', `warning in an output: "${clip(warning[0], 80)}"`, r);
  }
});
"""

LINKS_JS = r"""(async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = 'eager'; });
  const loads = await Promise.all(images.map(img => Promise.race([
    img.decode().then(() => true, () => false),
    new Promise(done => setTimeout(() => done(img.complete && img.naturalWidth > 0), 5000))])));
  const here = location.href.split('#')[0];
  const links = [], missing = [];
  for (const a of document.querySelectorAll('a[href]')) {
    const url = new URL(a.getAttribute('href'), location.href);
    if (url.origin !== location.origin) continue;
    const text = (a.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 50);
    const page = url.href.split('#')[0];
    const anchor = decodeURIComponent(url.hash.slice(1));
    if (page === here) {
      if (anchor && !document.getElementById(anchor) && !document.getElementsByName(anchor).length)
        missing.push({href: a.getAttribute('href'), text});
    } else links.push({url: url.href, href: a.getAttribute('href'), text});
  }
  const broken = images.filter((img, i) => !loads[i] || img.naturalWidth === 0)
                       .map(img => ({src: img.getAttribute('src'), alt: img.alt}));
  return {links, missing, broken};
})()"""


class Chromium:
    """Minimal DevTools-protocol client over Chromium's pipe transport (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # move the child's ends above fd 10 so that placing them on fds 3 and 4 cannot clobber them
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def place_pipes():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=place_pipes, pass_fds=(3, 4))
        os.close(child_r)
        os.close(child_w)
        self.writer = os.fdopen(to_chrome_w, "wb", buffering=0)
        self.reader = os.fdopen(from_chrome_r, "rb", buffering=0)
        self.buffer, self.events, self.next_id = b"", [], 0

    def _read_message(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = self.reader.read(1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.writer.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60.0) -> None:
        """Read messages until `method` arrives for `session` (kept in self.events)."""
        deadline, seen = time.time() + timeout, len(self.events)
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events[seen:]):
            if time.time() > deadline:
                raise RuntimeError(f"no {method} within {timeout}s")
            self.events.append(self._read_message())

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=30)


def serve(root: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser hung up early: harmless
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def defect(cls: str, detail: str, box: dict | None = None) -> dict:
    return {"class": cls, "detail": detail, "box": box}


def problems_from(events: list[dict], session: str, host: str) -> list[dict]:
    """Console errors, uncaught exceptions, failed or off-machine requests and error responses."""
    found = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(defect("console", f"exception: {params['exceptionDetails'].get('exception', {}).get('description')}"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(defect("console", "console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                                        for a in params.get("args", []))))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error" \
                and params["entry"].get("source") != "network":  # failed requests: reported below
            found.append(defect("console", f"log: {params['entry']['text']} {params['entry'].get('url', '')}"))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith((host, "data:", "blob:", "about:")):
                found.append(defect("console", f"request left the machine: {url}"))
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            found.append(defect("console", f"request failed: {params.get('errorText')}"))
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400 \
                and not params["response"]["url"].endswith("/favicon.ico"):
            cls = "broken-image" if params.get("type") == "Image" else "console"
            found.append(defect(cls, f"HTTP {params['response']['status']} for {params['response']['url'].removeprefix(host)}"))
    return found


class LinkChecker:
    """Whether local URLs are served, and whether their anchors exist; each URL is asked for once."""

    def __init__(self):
        self.pages: dict[str, str | None] = {}

    def text(self, url: str) -> str | None:
        """The served document (None: an error status); anchors are looked up in HTML only."""
        if url not in self.pages:
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    body = reply.read() if reply.headers.get_content_type() == "text/html" else b""
                self.pages[url] = body.decode("utf-8", "replace")
            except urllib.error.HTTPError:
                self.pages[url] = None
        return self.pages[url]

    def broken(self, links: list[dict], host: str) -> list[dict]:
        found = []
        for link in links:
            page, _, anchor = link["url"].partition("#")
            body = self.text(page)
            what = f"link \"{link['text']}\" to {link['href']}"
            if body is None:
                found.append(defect("broken-link", f"{what}: {page.removeprefix(host)} is not served"))
            elif anchor and body and not re.search(
                    r'\b(?:id|name)="%s"' % re.escape(html.escape(urllib.parse.unquote(anchor))), body):
                found.append(defect("broken-link", f"{what}: no anchor #{anchor} there"))
        return found


def screenshot(browser: Chromium, session: str, path: Path, box: dict | None = None) -> None:
    params = {"format": "png"}
    if box:  # the defect with some context, the page's full width; clip is in page coordinates
        browser.evaluate(session, f"window.scrollTo(0, {max(0.0, box['y'] - 150)})")
        params["clip"] = {"x": 0, "y": max(0.0, box["y"] - 60), "width": VIEWPORT["width"],
                          "height": min(max(box["h"] + 120, 240), 860), "scale": 1}
    data = browser.send("Page.captureScreenshot", params, session)["data"]
    path.write_bytes(base64.b64decode(data))


def wait_for(browser: Chromium, session: str, timeout: float = 60.0) -> dict:
    """Poll the page until its figures are drawn and MathJax has finished (or time runs out)."""
    deadline = time.time() + timeout
    while True:
        state = browser.evaluate(session, STATE_JS)
        done = state["ready"] and state["drawn"] == state["figures"] and (state["math_nodes"] == 0 or state["typeset"] > 0)
        if done or time.time() > deadline:
            return state
        time.sleep(0.5)


def measure(browser: Chromium, session: str, *parts: str, prelude: str = "") -> list[dict]:
    """Run measurement scripts in the page; they add their defects to `found`."""
    script = "(() => {" + prelude + HELPERS_JS + "".join(parts) + "return found; })()"
    return [defect(d["cls"], d["detail"], d["box"]) for d in browser.evaluate(session, script)]


def check_page(browser: Chromium, url: str, host: str, shots: Path, name: str, links: LinkChecker) -> list[dict]:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", VIEWPORT, session)
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_event("Page.loadEventFired", session)
    state = wait_for(browser, session)
    time.sleep(1.0)  # let MathJax finish the last typesetting pass and fonts arrive
    state = browser.evaluate(session, STATE_JS)
    screenshot(browser, session, shots / f"{name}.png")
    found = []
    if state["drawn"] != state["figures"]:
        found.append(defect("figure-not-drawn", f"{state['figures'] - state['drawn']} of {state['figures']} plotly figures not drawn"))
    if state["math_nodes"] and not state["typeset"]:
        found.append(defect("maths-not-typeset", f"{state['math_nodes']} math nodes, MathJax loaded: {state['mathjax']}"))
    if state["raw_tex"]:
        found.append(defect("raw-tex", f"{state['raw_tex']} raw TeX delimiters left on the page"))
    found += measure(browser, session, OVERFLOW_JS, FIGURE_JS, CONTENT_JS)
    linked = browser.evaluate(session, LINKS_JS)
    found += [defect("broken-link", f"link \"{m['text']}\" to {m['href']}: no such anchor on the page") for m in linked["missing"]]
    found += [defect("broken-image", f"image {m['src']} (alt \"{m['alt']}\") does not load") for m in linked["broken"]]
    found += links.broken(linked["links"], host)
    for i in range(state["figures"]):
        browser.evaluate(session, f"document.querySelectorAll('.plotly-graph-div')[{i}]"
                                  ".scrollIntoView({block: 'center'})")
        screenshot(browser, session, shots / f"{name}-figure{i + 1}.png")
    if state["sliders"]:
        moved = browser.evaluate(session, SLIDER_JS)
        time.sleep(0.5)
        screenshot(browser, session, shots / f"{name}-slider.png")
        if not moved["ok"]:
            found.append(defect("slider", "the slider's last step did not show its precomputed traces"))
        seen = {d["detail"] for d in found}  # the last step's titles must fit too
        found += [d for d in measure(browser, session, FIGURE_JS, prelude=f"const ONLY_FIGURE = {moved['figure']};")
                  if d["detail"] not in seen]
    found += problems_from(browser.events, session, host)
    for k, d in enumerate([d for d in found if d["box"]][:SHOTS_PER_PAGE]):
        d["screenshot"] = f"{name}-defect{k + 1}-{d['class']}.png"
        screenshot(browser, session, shots / d["screenshot"], d["box"])
    browser.send("Target.closeTarget", {"targetId": target})
    print(f"  {name}: {state['drawn']}/{state['figures']} figures drawn, {state['sliders']} with sliders, "
          f"{state['typeset']} formulas typeset, {len(found)} defects", flush=True)
    return found


def check_site(site_root: Path, shots: Path, pattern: str = "book/*.html") -> list[dict]:
    """Every defect of the pages matching `pattern` under `site_root`, as {page, class, detail, ...}."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        raise FileNotFoundError("chromium not found (as root: apt-get install -y chromium)")
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*-defect*.png"):  # from an earlier run
        old.unlink()
    pages = sorted(site_root.glob(pattern))
    found = []
    for page in pages:  # nothing may load from outside: the site must work offline
        found += [{"page": page.name, **defect("external-asset", tag)} for tag in EXTERNAL_ASSET.findall(page.read_text())]
    server = serve(site_root)
    host = f"http://127.0.0.1:{server.server_address[1]}"
    links = LinkChecker()
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(binary, profile)
        try:
            for page in pages:
                rel = page.relative_to(site_root).as_posix()
                found += [{"page": page.name, **d} for d in check_page(browser, f"{host}/{rel}", host, shots, page.stem, links)]
        finally:
            browser.close()
            server.shutdown()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site (_build/html)")
    parser.add_argument("shots", type=Path, help="folder for the screenshots")
    parser.add_argument("--report", type=Path, help="JSON report (default: render_report.json beside SHOTS)")
    parser.add_argument("--pages", default="book/*.html", help="pages to check, a glob under SITE")
    args = parser.parse_args(argv)
    report = args.report or args.shots.parent / "render_report.json"
    site = args.site.resolve()
    pages = sorted(p.name for p in site.glob(args.pages))
    if not pages:
        print(f"render check: no pages match {args.pages} under {args.site}")
        return 1
    try:
        found = check_site(site, args.shots, args.pages)
    except FileNotFoundError as error:
        print(f"render check: {error}")
        return 1
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"site": str(args.site), "viewport_px": VIEWPORT["width"], "pages": pages,
                                  "counts": dict(Counter(d["class"] for d in found)), "defects": found}, indent=1))
    for page in pages:
        mine = [d for d in found if d["page"] == page]
        if mine:
            print(f"FAIL {page}: {len(mine)} defects")
            for d in mine:
                print(f"   [{d['class']}] {d['detail']}")
    counts = Counter(d["class"] for d in found)
    print(f"render check: {len(pages) - len({d['page'] for d in found})} of {len(pages)} pages without defects; "
          f"{len(found)} defects" + (f" ({', '.join(f'{c} {n}' for c, n in counts.most_common())})" if found else "")
          + f"; report {report}, screenshots in {args.shots}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
