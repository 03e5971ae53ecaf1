// Keeps the parts of a page marked data-live current without a reload: it
// fetches the page again (rendered and escaped by the server like the first
// time) and swaps each marked element for its new version. A <details> the
// reader opened or closed keeps the reader's choice.

const ACTIVE_MS = 2000;
const IDLE_MS = 30000;
const chosen = new Map();
let timer = null;
let running = false;

document.addEventListener("click", (event) => {
  const summary = event.target.closest("summary");
  const details = summary && summary.parentElement;
  if (details && details.id) {
    // The element toggles after the click event.
    setTimeout(() => chosen.set(details.id, details.open), 0);
  }
});

export async function refresh() {
  if (running || !document.querySelector("[data-live][id]")) return;
  running = true;
  try {
    const response = await fetch(location.href, {
      headers: { "X-Conveyor-Refresh": "1" },
      credentials: "same-origin",
      cache: "no-store",
    });
    // Signed out or gone: leave what the reader sees as it is.
    if (!response.ok || response.redirected) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const old of document.querySelectorAll("[data-live][id]")) {
      const next = fresh.getElementById(old.id);
      if (!next) continue;
      const adopted = document.adoptNode(next);
      for (const details of adopted.querySelectorAll("details[id]")) {
        if (chosen.has(details.id)) details.open = chosen.get(details.id);
      }
      old.replaceWith(adopted);
    }
    document.dispatchEvent(new CustomEvent("conveyor:refreshed"));
  } catch (error) {
    // A network blip: the next tick tries again.
  } finally {
    running = false;
  }
}

function schedule() {
  clearTimeout(timer);
  // A finished build changes no more; other pages keep watching.
  const settled = document.querySelector('[data-final="true"]');
  timer = setTimeout(tick, settled ? IDLE_MS : ACTIVE_MS);
}

async function tick() {
  if (document.visibilityState === "visible") await refresh();
  schedule();
}

schedule();
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") tick();
});
