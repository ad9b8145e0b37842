// Follows the daemon: each change it announces on /events fetches <main> again (at most one
// fetch in flight, and one more if something changed meanwhile). Without JavaScript, the page
// as served is whole.
(() => {
  let busy = false, again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await fetch('/?part=main', { cache: 'no-store' });
      if (r.ok) document.getElementById('live').outerHTML = await r.text();
    } catch (_) { /* the daemon restarts: EventSource reconnects, and refreshes then */ }
    busy = false;
    if (again) { again = false; refresh(); }
  }
  const events = new EventSource('/events');
  events.addEventListener('change', refresh);
  events.addEventListener('open', refresh);
})();
