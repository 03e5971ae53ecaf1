// The build page's log: the last lines come with the page, earlier ranges
// load on demand, new lines arrive over the API's event stream (or, if the
// stream cannot open, by polling), ANSI colours become classes, every line
// has an anchor (#L123), and the view follows the end until the reader
// scrolls up.

import { AnsiUp } from "../vendor/ansi_up/ansi_up.js";
import { refresh } from "./live.js";

const RANGE = 2000;
const MAX_DOM_LINES = 20000;
const POLL_MS = 1000;
const ANSI_CLASS = /^ansi-[a-z-]+-(fg|bg)$/;
const RGB = /^rgb\(\d{1,3},\s*\d{1,3},\s*\d{1,3}\)$/;

const dataEl = document.getElementById("log-data");
const view = document.getElementById("log");
const countEl = document.getElementById("log-count");
const earlierBtn = document.getElementById("log-earlier");
const laterBtn = document.getElementById("log-later");
const followBtn = document.getElementById("log-follow");
const data = JSON.parse(dataEl.textContent);
const ansi = new AnsiUp();
ansi.use_classes = true;
const parser = new DOMParser();
const numberFormat = new Intl.NumberFormat("en");

const state = {
  build: data.build,
  first: data.first,
  last: data.last, // last line in the view
  total: data.last, // last line known to exist
  cursor: data.cursor,
  final: data.final,
  follow: true,
  loading: false,
};

// --- rendering -------------------------------------------------------------

function cleanNode(node) {
  if (node.nodeType === Node.TEXT_NODE) return document.createTextNode(node.data);
  if (node.nodeType !== Node.ELEMENT_NODE) return document.createTextNode("");
  let el;
  const href = node.tagName === "A" ? node.getAttribute("href") || "" : "";
  if (/^https?:\/\//i.test(href)) {
    el = document.createElement("a");
    el.href = href;
    el.rel = "noopener noreferrer nofollow";
    el.target = "_blank";
  } else {
    el = document.createElement("span");
  }
  for (const name of (node.getAttribute("class") || "").split(/\s+/)) {
    if (ANSI_CLASS.test(name)) el.classList.add(name);
  }
  // ansi_up writes bold, faint, italic, underline and 24-bit colours as
  // style attributes, which the page's CSP refuses: they become classes and
  // CSSOM properties (allowed) instead.
  for (const decl of (node.getAttribute("data-ansi-style") || "").split(";")) {
    const at = decl.indexOf(":");
    if (at < 0) continue;
    const key = decl.slice(0, at).trim();
    const value = decl.slice(at + 1).trim();
    if (key === "font-weight") el.classList.add("ansi-bold");
    else if (key === "opacity") el.classList.add("ansi-faint");
    else if (key === "font-style") el.classList.add("ansi-italic");
    else if (key === "text-decoration") el.classList.add("ansi-underline");
    else if ((key === "color" || key === "background-color") && RGB.test(value)) {
      el.style.setProperty(key, value);
    }
  }
  for (const child of node.childNodes) el.append(cleanNode(child));
  return el;
}

// Log text is untrusted: ansi_up escapes it, and only the spans and links it
// makes are rebuilt from its output, element by element.
function ansiHtml(text) {
  // ansi_up escapes every quote of the text, so each ` style="` in its
  // output is its own; renamed, the parser never applies (or reports) it.
  const html = ansi.ansi_to_html(text).replace(/ style="([^"]*)"/g, ' data-ansi-style="$1"');
  ansi.ansi_to_html("\x1b[0m"); // each line starts uncoloured
  return html;
}

function cleaned(container) {
  const out = document.createDocumentFragment();
  for (const node of container.childNodes) out.append(cleanNode(node));
  return out;
}

// The bodies of ``lines``' rows: plain text stays a text node; the coloured
// lines of a batch go through one parse, each in its own <div>, since a
// parse costs far more than the few nodes it makes (one parse per line was
// most of the script time of a page's 1,000 coloured lines). ansi_up's
// output is balanced (every span and link closed, all text escaped), so the
// parse yields one <div> per line; if it ever did not, each line is parsed
// on its own rather than mixing lines.
function bodies(lines) {
  const out = new Array(lines.length);
  const coloured = [];
  const html = [];
  lines.forEach(([, , text], i) => {
    if (text.includes("\x1b")) {
      coloured.push(i);
      html.push(ansiHtml(text));
    } else {
      out[i] = document.createTextNode(text);
    }
  });
  if (!coloured.length) return out;
  const joined = html.map((h) => `<div>${h}</div>`).join("");
  const body = parser.parseFromString(`<body>${joined}</body>`, "text/html").body;
  if (body.childElementCount === coloured.length && body.childNodes.length === coloured.length) {
    coloured.forEach((i, k) => {
      out[i] = cleaned(body.children[k]);
    });
  } else {
    coloured.forEach((i, k) => {
      out[i] = cleaned(parser.parseFromString(`<body>${html[k]}</body>`, "text/html").body);
    });
  }
  return out;
}

function lineNode([number, stream], body) {
  const row = document.createElement("div");
  row.className = stream === "e" ? "line stderr" : stream === "s" ? "line system" : "line";
  row.id = `L${number}`;
  const anchor = document.createElement("a");
  anchor.className = "ln";
  anchor.href = `#L${number}`;
  anchor.textContent = number;
  const text = document.createElement("span");
  text.className = "lt";
  text.append(body);
  row.append(anchor, text);
  return row;
}

function fragmentOf(lines) {
  const frag = document.createDocumentFragment();
  const texts = bodies(lines);
  lines.forEach((line, i) => frag.append(lineNode(line, texts[i])));
  return frag;
}

function showCount() {
  if (state.total === 0) {
    countEl.textContent = state.final ? "empty" : "waiting for output…";
  } else if (state.first === 1 && state.last === state.total) {
    countEl.textContent = `${numberFormat.format(state.total)} lines`;
  } else {
    const f = numberFormat.format;
    countEl.textContent = `lines ${f(state.first)}–${f(state.last)} of ${f(state.total)}`;
  }
  earlierBtn.classList.toggle("hidden", state.first <= 1 || state.total === 0);
  laterBtn.classList.toggle("hidden", state.last >= state.total);
  followBtn.classList.toggle("hidden", state.follow && state.last === state.total);
  followBtn.textContent = state.last < state.total ? "Jump to the end" : "Follow";
}

// --- scrolling -------------------------------------------------------------

function atBottom() {
  return view.scrollTop + view.clientHeight >= view.scrollHeight - 8;
}

function toBottomNow() {
  view.scrollTop = view.scrollHeight;
}

// Following the end, the scroll waits for the next frame: reading
// scrollHeight right after appending lines lays them all out there and
// then, and the frame lays them out again if anything changes after; in
// the frame it is the one layout the frame does anyway, and messages that
// arrive within one frame share it.
let scrollQueued = false;
function toBottom() {
  if (scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (state.follow) toBottomNow();
  });
}

view.addEventListener("scroll", () => {
  // A scroll before a queued follow lands (lines trimmed off the top move
  // the view) is not the reader leaving the end.
  if (scrollQueued) return;
  const follow = atBottom() && state.last === state.total;
  if (follow !== state.follow) {
    state.follow = follow;
    showCount();
  }
});

followBtn.addEventListener("click", async () => {
  if (state.last < state.total) {
    location.assign(location.pathname); // back to the tail
    return;
  }
  state.follow = true;
  history.replaceState(null, "", location.pathname);
  toBottomNow();
  showCount();
});

// --- loading ---------------------------------------------------------------

async function fetchLines(after, limit) {
  const url = `/builds/${state.build}/lines?after=${after}&limit=${limit}`;
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`log range: HTTP ${response.status}`);
  return (await response.json()).lines;
}

async function loadEarlier(until = 0) {
  if (state.loading || state.first <= 1) return;
  state.loading = true;
  try {
    do {
      const from = Math.max(1, state.first - RANGE);
      const lines = await fetchLines(from - 1, state.first - from);
      if (!lines.length) break;
      const height = view.scrollHeight;
      const top = view.scrollTop;
      view.prepend(fragmentOf(lines));
      view.scrollTop = top + (view.scrollHeight - height);
      state.first = lines[0][0];
    } while (until && state.first > until);
  } finally {
    state.loading = false;
    showCount();
  }
}

earlierBtn.addEventListener("click", () => loadEarlier());

async function loadLater() {
  if (state.loading || state.last >= state.total) return;
  state.loading = true;
  try {
    const lines = await fetchLines(state.last, RANGE);
    if (lines.length) {
      view.append(fragmentOf(lines));
      state.last = lines[lines.length - 1][0];
      state.total = Math.max(state.total, state.last);
    }
  } finally {
    state.loading = false;
    showCount();
  }
}

laterBtn.addEventListener("click", () => loadLater());

// A link to a line far before the tail: show a range around it instead of
// loading everything in between.
async function jumpTo(number) {
  const from = Math.max(1, number - RANGE / 2);
  const lines = await fetchLines(from - 1, RANGE);
  if (!lines.length) return;
  view.replaceChildren(fragmentOf(lines));
  state.first = lines[0][0];
  state.last = lines[lines.length - 1][0];
}

// Lines after the tail (from the stream or a poll): appended when the view
// shows the tail, counted otherwise; duplicates after a reconnect are skipped.
function received(lines) {
  const fresh = lines.filter((line) => line[0] > state.total);
  if (!fresh.length) return;
  const contiguous = state.last === state.total;
  state.total = fresh[fresh.length - 1][0];
  if (contiguous) {
    view.append(fragmentOf(fresh));
    state.last = state.total;
    while (view.childElementCount > MAX_DOM_LINES) {
      view.firstElementChild.remove();
      state.first += 1;
    }
    if (state.follow) toBottom();
  }
  showCount();
}

function streamLetter(stream) {
  const name = String(stream).toLowerCase();
  return name.includes("err") ? "e" : name.includes("system") ? "s" : "o";
}

function finished() {
  state.final = true;
  showCount();
  refresh();
}

// The API's event stream: each event's data is a StreamLogsResponse in
// proto3 JSON; the last one carries the build's final status, then the
// stream ends (and must not be reopened).
function follow() {
  if (state.final) return;
  const url =
    `/api/v1/builds/${state.build}/logs?follow=true` +
    `&cursor=${encodeURIComponent(state.cursor)}`;
  const events = new EventSource(url);
  events.onmessage = (event) => {
    const message = JSON.parse(event.data);
    received(
      (message.lines || []).map((l) => [Number(l.number), streamLetter(l.stream), l.text || ""]),
    );
    if (message.cursor) state.cursor = message.cursor;
    if (message.status) {
      events.close();
      finished();
    }
  };
  events.onerror = (event) => {
    // An "error" event from the server (its data says why), or a stream
    // that cannot open: poll instead. CONNECTING means the browser is
    // reconnecting by itself, resuming with Last-Event-ID.
    if (event.data !== undefined || events.readyState === EventSource.CLOSED) {
      events.close();
      poll();
    }
  };
}

async function poll() {
  try {
    const lines = await fetchLines(state.total, 5000);
    received(lines);
    if (lines.length) {
      setTimeout(poll, 0);
      return;
    }
  } catch (error) {
    // try again on the next tick
  }
  const summary = document.getElementById("summary");
  if (summary && summary.dataset.final === "true") {
    finished();
    return;
  }
  setTimeout(poll, POLL_MS);
}

// --- start -----------------------------------------------------------------

function wantedLine() {
  const target = /^#L(\d+)$/.exec(location.hash);
  return target ? Number(target[1]) : 0;
}

// Bring line ``number`` into the view (loading it when it is not), and stop
// following the end: the reader is looking at that line.
async function reveal(number) {
  if (number < state.first) {
    if (state.first - number <= 10 * RANGE) await loadEarlier(number);
    else await jumpTo(number);
  } else if (number > state.last && number <= state.total) {
    await jumpTo(number);
  }
  const line = document.getElementById(`L${number}`);
  if (!line) return false;
  state.follow = false;
  line.scrollIntoView({ block: "center" });
  showCount();
  return true;
}

async function start() {
  view.append(fragmentOf(data.lines));
  showCount();
  const wanted = wantedLine();
  // At once, not in the next frame: the page's first frame then shows the
  // end (with off-screen lines skipping layout, this layout is of the few
  // lines in view).
  if (!wanted || !(await reveal(wanted))) toBottomNow();
  showCount();
  follow();
}

window.addEventListener("hashchange", () => {
  const wanted = wantedLine();
  if (wanted) reveal(wanted);
});

start();
