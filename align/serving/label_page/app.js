// The label page. Every text from the server (prompts, answers, messages) is put into the page with
// textContent, never as markup: an answer holding "<script>" shows those characters.
"use strict";

const params = new URLSearchParams(location.search);
const apiKey = params.get("key");
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
const KEYS = { a: "a", 1: "a", b: "b", 2: "b", t: "tie", 3: "tie", x: "both_bad", 4: "both_bad", s: "skip" };
let annotator = params.get("annotator") || localStorage.getItem("align-annotator") || "";
let current = null;
let busy = false;
let waitTimer = null;

const $ = (id) => document.getElementById(id);

function say(text, isError) {
  $("message").textContent = text || "";
  $("message").className = isError ? "error" : "";
}

async function api(path, body) {
  const headers = {};
  if (apiKey) headers["X-API-Key"] = apiKey;
  const options = { headers };
  if (body !== undefined) {
    options.method = "POST";
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: `the server answered ${response.status}` }; }
  return { ok: response.ok, status: response.status, data };
}

function showProgress(p) {
  const done = p.judged + p.skipped;
  $("progress-text").textContent = `${p.judged} judged, ${p.skipped} skipped, of ${p.total || "?"}`;
  $("progress-bar").max = Math.max(p.total, 1);
  $("progress-bar").value = done;
  const modes = { review: "reviewing preference data", collect: "collecting preferences",
                  compare: "blind comparison of two models" };
  $("mode").textContent = modes[p.mode] || "";
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (typeof prompt === "string") { box.textContent = prompt; return; }
  for (const m of prompt) {
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = `${m.role}: `;
    box.append(role, document.createTextNode(`${m.content}\n`));
  }
}

function render(item) {
  current = item;
  renderPrompt(item.prompt);
  $("answer-a").textContent = item.a;
  $("answer-b").textContent = item.b;
  $("comment").value = "";
  $("task").hidden = false;
  say(item.same ? "A and B are the same text: tie or both bad" : "");
  for (const b of document.querySelectorAll(".choices button")) { b.disabled = false; b.classList.remove("picked"); }
}

async function loadNext() {
  clearTimeout(waitTimer);
  const r = await api(`/api/next?annotator=${encodeURIComponent(annotator)}`);
  if (!r.ok) { say(r.data.error || `error ${r.status}`, true); return; }
  showProgress(r.data);
  if (r.data.status === "item") { render(r.data.item); return; }
  current = null;
  $("task").hidden = true;
  if (r.data.status === "waiting") {
    say(`Preparing answers (${r.data.message}; ${r.data.made} of ${r.data.total || "?"} ready)…`);
    waitTimer = setTimeout(loadNext, 500);
  } else if (r.data.status === "failed") {
    say(`The answers could not be made: ${r.data.message}`, true);
  } else {
    say(`All done: every item is judged or skipped. Thank you, ${annotator}.`);
  }
}

async function judge(label) {
  if (!current || busy) return;
  busy = true;
  const picked = document.querySelector(`.choices button[data-label="${label}"]`);
  for (const b of document.querySelectorAll(".choices button")) b.disabled = true;
  if (picked) picked.classList.add("picked");
  try {
    const r = await api("/api/judge", { item: current.id, annotator, label, comment: $("comment").value });
    if (!r.ok) say(r.data.error || `error ${r.status}`, true);
    await loadNext();
    if (!r.ok) say(r.data.error || `error ${r.status}`, true);
  } catch (e) {
    say(`could not reach the server (${e.message}); nothing was recorded for this item, try again`, true);
    for (const b of document.querySelectorAll(".choices button")) b.disabled = false;
  } finally {
    busy = false;
  }
}

function start(name) {
  annotator = name;
  localStorage.setItem("align-annotator", name);
  $("who").textContent = `annotator: ${name}`;
  $("name-form").hidden = true;
  if (document.activeElement) document.activeElement.blur();  // the name box is gone: keys are shortcuts again
  loadNext();
}

document.addEventListener("keydown", (event) => {
  const typing = ["TEXTAREA", "INPUT"].includes(document.activeElement && document.activeElement.tagName);
  if (typing) { if (event.key === "Escape") document.activeElement.blur(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const label = KEYS[event.key.toLowerCase()];
  if (label) { event.preventDefault(); judge(label); }
});

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".choices button")) b.addEventListener("click", () => judge(b.dataset.label));
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (NAME.test(name)) start(name); else say("a name of letters, digits, '_', '.', '@' or '-'", true);
  });
  if (NAME.test(annotator)) start(annotator); else { $("name-form").hidden = false; $("name-input").focus(); }
});
