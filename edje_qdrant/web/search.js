// The search page of `edje-qdrant serve`: text search (re-ranked or not), "more like this", search by photo.
// Plain JS, no build step. Results replace the grid in place; every search records its timings in
// window.edjeTimings (fetch + render, measured with performance.now()).
"use strict";

(() => {
  const THUMB_SIZE = 320; // one size, so the server's cache and the browser's are shared by every search
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("search-form"), q: $("q"), rerank: $("rerank"), photo: $("photo"), photoButton: $("photo-button"),
    folder: $("f-folder"), camera: $("f-camera"), after: $("f-after"), before: $("f-before"),
    k: $("k"), rerankK: $("rerank-k"), keyForm: $("key-form"), key: $("api-key"),
    status: $("status"), error: $("error"), empty: $("empty"), results: $("results"),
    queryPhoto: $("query-photo"), queryPhotoImg: $("query-photo-img"), queryPhotoText: $("query-photo-text"),
    fusion: $("fusion-weight"), overlay: $("drop-overlay"),
  };
  const timings = (window.edjeTimings = []);
  let current = null; // the last search asked for: {kind, ...}, re-run when the switch or the key changes
  let inflight = null; // AbortController of the search on its way
  let seq = 0;
  let photoUrl = null;

  // ------------------------------------------------------------------ requests

  function headers() {
    const key = sessionStorage.getItem("edje-api-key");
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function number(input, fallback) {
    const n = Math.round(Number(input.value));
    return Number.isFinite(n) && n >= 1 ? n : fallback;
  }

  function smallFilter() {
    const f = {};
    if (el.folder.value.trim()) f.folder = el.folder.value.trim();
    if (el.camera.value.trim()) f.camera = el.camera.value.trim();
    if (el.after.value) f.taken_after = el.after.value;
    if (el.before.value) f.taken_before = el.before.value;
    return f;
  }

  function request(search) {
    const k = number(el.k, 20);
    const filter = smallFilter();
    if (search.kind === "text") {
      const rerankK = el.rerank.checked ? Math.max(number(el.rerankK, 100), k) : 0;
      const body = { query: search.query, k, rerank_k: rerankK };
      if (Object.keys(filter).length) body.filter = filter;
      return ["search", { method: "POST", headers: { ...headers(), "Content-Type": "application/json" },
                          body: JSON.stringify(body) }];
    }
    if (search.kind === "similar") {
      const params = new URLSearchParams({ k: String(k), ...filter });
      return [`points/${encodeURIComponent(search.pointId)}/similar?${params}`, { headers: headers() }];
    }
    const form = new FormData();
    form.append("image", search.file, search.file.name || "photo");
    form.append("k", String(k));
    for (const [key, value] of Object.entries(filter)) form.append(key, value);
    return ["search/image", { method: "POST", headers: headers(), body: form }];
  }

  async function run(search) {
    current = search;
    if (inflight) inflight.abort();
    const controller = (inflight = new AbortController());
    const mine = ++seq;
    const start = performance.now();
    setBusy(true, search);
    let response;
    let body = null;
    try {
      const [url, init] = request(search);
      response = await fetch(url, { ...init, signal: controller.signal });
      body = await response.json().catch(() => null);
    } catch (err) {
      if (mine !== seq) return; // replaced by a newer search
      setBusy(false);
      return showError(0, `The service did not answer (${err.message || err}). Is \`edje-qdrant serve\` running?`);
    }
    if (mine !== seq) return;
    const fetched = performance.now();
    if (!response.ok) {
      setBusy(false);
      if (response.status === 401) askForKey();
      return showError(response.status, detail(body) || response.statusText);
    }
    render(body.results, search);
    const rendered = performance.now();
    setBusy(false);
    const timing = { kind: search.kind, results: body.results.length, fetch_ms: fetched - start,
                     render_ms: rendered - fetched, total_ms: rendered - start, server_ms: body.took_ms,
                     thumbnails_ms: null, thumbnails_ok: null };
    timings.push(timing);
    report(body, search, timing);
    timeThumbnails(timing, fetched);
  }

  // Records when every thumbnail of the grid has loaded (or failed), counted from when the grid was built.
  function timeThumbnails(timing, since) {
    const images = Array.from(el.results.querySelectorAll("img"));
    const settled = images.map((img) => (img.complete ? Promise.resolve()
      : new Promise((done) => {
        img.addEventListener("load", done, { once: true });
        img.addEventListener("error", done, { once: true });
      })));
    Promise.all(settled).then(() => {
      timing.thumbnails_ms = performance.now() - since;
      timing.thumbnails_ok = images.filter((img) => img.naturalWidth > 0).length;
    });
  }

  function detail(body) {
    if (!body || body.detail === undefined) return "";
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message || JSON.stringify(p))).join("; ");
    return JSON.stringify(body.detail);
  }

  // ------------------------------------------------------------------ rendering

  function fileName(hit) {
    const path = hit.path || (hit.metadata && hit.metadata.source) || "";
    return path.split("/").pop() || hit.id;
  }

  function fmt(value) {
    return value === null || value === undefined ? "—" : Number(value).toFixed(3);
  }

  function thumbUrl(hit) {
    const url = new URL(hit.thumbnail_url, document.baseURI);
    url.searchParams.set("size", String(THUMB_SIZE));
    return url.pathname + url.search;
  }

  function movedBadge(hit, place) {
    const from = hit.first_stage_rank;
    if (!from) return null;
    const delta = from - place;
    const badge = document.createElement("span");
    badge.className = "moved " + (delta > 0 ? "up" : delta < 0 ? "down" : "same");
    badge.textContent = delta > 0 ? `↑${delta}` : delta < 0 ? `↓${-delta}` : "=";
    const said = delta > 0 ? `moved up ${delta}` : delta < 0 ? `moved down ${-delta}` : "not moved";
    badge.title = `Re-ranking ${said} (first stage #${from}, now #${place})`;
    badge.setAttribute("aria-label", badge.title);
    return badge;
  }

  function scoreList(hit) {
    const dl = document.createElement("dl");
    dl.className = "scores";
    for (const name of ["score", "first_stage_score", "rerank_score"]) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = fmt(hit[name]);
      dd.dataset.score = name;
      dl.append(dt, dd);
    }
    return dl;
  }

  function card(hit, place, reranked) {
    const name = fileName(hit);
    const figure = document.createElement("figure");
    figure.className = "hit";
    figure.dataset.pointId = hit.id;
    figure.dataset.place = String(place);
    const link = document.createElement("a");
    link.href = hit.image_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.title = `Open ${name} in a new tab`;
    const img = document.createElement("img");
    img.decoding = "async";
    img.alt = hit.page_content && hit.page_content !== name ? `${hit.page_content} (${name})` : `Photo ${name}`;
    img.addEventListener("error", () => figure.classList.add("broken"), { once: true });
    img.src = thumbUrl(hit);
    link.append(img);
    const caption = document.createElement("figcaption");
    const title = document.createElement("div");
    title.className = "name";
    const rank = document.createElement("span");
    rank.className = "place";
    rank.textContent = `#${place}`;
    const label = document.createElement("span");
    label.className = "file";
    label.textContent = name;
    label.title = hit.path || name;
    title.append(rank, label);
    if (reranked) {
      const badge = movedBadge(hit, place);
      if (badge) title.append(badge);
    }
    const similar = document.createElement("button");
    similar.type = "button";
    similar.dataset.action = "similar";
    similar.textContent = "More like this";
    similar.setAttribute("aria-label", `More photos like ${name}`);
    caption.append(title, scoreList(hit));
    if (hit.flags && hit.flags.length) {
      const flags = document.createElement("div");
      flags.className = "flags";
      flags.textContent = hit.flags.join("; ");
      caption.append(flags);
    }
    caption.append(similar);
    figure.append(link, caption);
    return figure;
  }

  function render(results, search) {
    const reranked = search.kind === "text" && el.rerank.checked;
    const cards = document.createDocumentFragment();
    results.forEach((hit, i) => cards.append(card(hit, i + 1, reranked)));
    el.results.replaceChildren(cards);
    el.empty.hidden = results.length > 0;
    document.body.dataset.state = results.length ? "results" : "empty";
    showFusionWeight(results);
  }

  function showFusionWeight(results) {
    const hit = results.find((h) => h.rerank_score !== null && Math.abs(h.first_stage_score) > 1e-6);
    el.fusion.textContent = hit ? ` (this model: ${((hit.score - hit.rerank_score) / hit.first_stage_score).toFixed(1)})` : "";
  }

  function report(body, search, timing) {
    const n = body.results.length;
    const what = search.kind === "text"
      ? `for “${search.query}”` + (el.rerank.checked ? ", re-ranked" : ", first stage only")
      : search.kind === "similar" ? `like ${search.name}` : `like your photo ${search.file.name || ""}`.trim();
    el.status.textContent = n
      ? `${n} result${n === 1 ? "" : "s"} ${what} in ${Math.round(timing.total_ms)} ms (server ${Math.round(body.took_ms)} ms)`
      : `No results ${what} (${Math.round(timing.total_ms)} ms).`;
  }

  function setBusy(busy, search) {
    document.body.toggleAttribute("data-busy", busy);
    el.results.setAttribute("aria-busy", String(busy));
    if (busy) {
      el.error.hidden = true;
      el.status.textContent = search.kind === "text" ? `Searching for “${search.query}”…`
        : search.kind === "similar" ? `Looking for photos like ${search.name}…` : "Searching by your photo…";
      el.queryPhoto.hidden = search.kind !== "photo";
    }
  }

  function showError(status, message) {
    document.body.dataset.state = "error";
    el.results.replaceChildren();
    el.error.textContent = status ? `Error ${status}: ${message}` : message;
    el.error.hidden = false;
    el.status.textContent = "The search failed.";
    el.empty.hidden = true;
  }

  function askForKey() {
    el.keyForm.hidden = false;
    el.key.focus();
  }

  // ------------------------------------------------------------------ wiring

  function textSearch() {
    const query = el.q.value.trim();
    if (!query) {
      el.q.focus();
      return;
    }
    const url = new URL(location.href);
    url.searchParams.set("q", query);
    history.replaceState(null, "", url);
    run({ kind: "text", query });
  }

  function photoSearch(file) {
    if (!file) return;
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    el.queryPhotoImg.src = photoUrl;
    el.queryPhotoText.textContent = `Photos like ${file.name || "your photo"} (image search: first stage only)`;
    run({ kind: "photo", file });
  }

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    textSearch();
  });
  el.rerank.addEventListener("change", () => {
    if (current && current.kind === "text") run(current);
  });
  el.photo.addEventListener("change", () => {
    photoSearch(el.photo.files[0]);
    el.photo.value = "";
  });
  el.photoButton.addEventListener("click", () => el.photo.click());
  el.results.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action='similar']");
    if (!button) return;
    const figure = button.closest("figure[data-point-id]");
    run({ kind: "similar", pointId: figure.dataset.pointId, name: figure.querySelector(".file").textContent });
  });
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("edje-api-key", el.key.value);
    el.key.value = "";
    el.keyForm.hidden = true;
    if (current) run(current);
  });
  document.addEventListener("keydown", (event) => {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement && document.activeElement.tagName);
    if (event.key === "/" && !typing) {
      event.preventDefault();
      el.q.focus();
    }
  });

  // Drop a photo anywhere on the page.
  let depth = 0;
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    el.overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) el.overlay.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    el.overlay.hidden = true;
    photoSearch(event.dataTransfer.files[0]);
  });

  const initial = new URLSearchParams(location.search).get("q");
  if (initial) {
    el.q.value = initial;
    textSearch();
  }
})();
