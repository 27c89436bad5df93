// The demo page: one sample user's history and recall list, reranked by POST /rerank.
// Every URL is relative to the page, so only this service is ever asked. A visitor's picks
// live in `state` (this page) and travel in the request's `history` field: nothing is
// written to the service's Redis.
"use strict";

const state = {
  sample: null, // demo.json: users, items (titles), k, history_len
  user: null, // the sample user shown
  history: [], // item ids, oldest first: the sample's history, then the visitor's picks
  picked: new Set(), // the ids the visitor added to the history
  added: [], // the films added with the form (POST /items), oldest first
  candidates: [], // item ids still in the recall list, best first
  recallPos: new Map(), // item id -> 1-based position in the sample's recall list
  answer: null, // the last /rerank answer
  seq: 0, // request number: an older answer arriving late is dropped
};

const $ = (id) => document.getElementById(id);

const NEW_TAG = " new: added here";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function title(id) {
  const item = state.sample.items[id];
  return item ? item.title : `item ${id}`;
}

function genres(id) {
  const item = state.sample.items[id];
  return item && item.genres.length ? item.genres.join(", ") : "";
}

function say(text, alert = false) {
  const status = $("status");
  status.textContent = text;
  status.setAttribute("role", alert ? "alert" : "status");
}

// A film the visitor can pick: a real button, so Tab, Enter and Space work.
function filmButton(id) {
  return el(
    "button",
    { type: "button", class: "film", dataset: { item: id }, title: genres(id) },
    title(id),
  );
}

function movement(rank, id) {
  const pos = state.recallPos.get(id);
  const delta = pos - rank;
  if (delta > 0) {
    return el("span", { class: "move up" },
      el("span", { "aria-hidden": "true" }, "▲ "), `${delta} up from recall #${pos}`);
  }
  if (delta < 0) {
    return el("span", { class: "move down" },
      el("span", { "aria-hidden": "true" }, "▼ "), `${-delta} down from recall #${pos}`);
  }
  return el("span", { class: "move same" },
    el("span", { "aria-hidden": "true" }, "= "), `same as recall #${pos}`);
}

function because(entries) {
  if (!entries || entries.length === 0) return null;
  const p = el("p", { class: "because" }, "Because you watched ");
  entries.forEach((entry, i) => {
    if (i > 0) p.append(i === entries.length - 1 ? " and " : ", ");
    p.append(el("cite", {}, title(entry.item_id)),
      ` (${Math.round(entry.weight * 100)}%)`);
  });
  return p;
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  const newest = [...state.history].reverse();
  for (const id of newest) {
    list.append(el("li", {},
      el("span", { class: "title" }, title(id)),
      state.picked.has(id) ? el("span", { class: "tag" }, " (your pick)") : null));
  }
  const readWindow = state.sample.history_len;
  $("history-note").textContent =
    `Newest first; ${state.history.length} films, of which the model reads the newest ${readWindow}.`;
}

function renderCandidates() {
  const list = $("candidates");
  list.replaceChildren();
  const rankOf = new Map();
  (state.answer ? state.answer.items : []).forEach((item, i) => rankOf.set(item.item_id, i + 1));
  for (const id of state.candidates) {
    const pos = state.recallPos.get(id);
    const rank = rankOf.get(id);
    list.append(el("li", { value: String(pos) },
      el("span", { class: "pos" }, `#${pos} `),
      el("span", { class: "what" },
        filmButton(id),
        rank ? el("span", { class: "tag" }, ` now top ${state.sample.k} #${rank}`) : null,
        state.added.includes(id) ? el("span", { class: "tag new" }, NEW_TAG) : null,
        id === state.user.watched_next
          ? el("span", { class: "tag next" }, " watched next") : null)));
  }
  const added = state.added.length ? `, then the ${state.added.length} added here` : "";
  $("candidates-note").textContent =
    `${state.candidates.length} films: item-kNN's proposals in recall order (#1 first)${added}.`;
}

function renderRanked() {
  const list = $("ranked");
  list.replaceChildren();
  const answer = state.answer;
  $("model-version").textContent = answer.model_version || "none (degraded answer)";
  const scores = answer.items.filter((i) => i.score !== null).map((i) => i.score);
  const hi = Math.max(...scores);
  const lo = Math.min(...scores);
  const span = hi - lo || 1;
  answer.items.forEach((item, i) => {
    const rank = i + 1;
    const li = el("li", { class: "ranked" });
    li.append(el("div", { class: "line" },
      el("span", { class: "rank" }, `${rank}. `),
      filmButton(item.item_id),
      " ",
      movement(rank, item.item_id),
      state.added.includes(item.item_id) ? el("span", { class: "tag new" }, NEW_TAG) : null,
      item.item_id === state.user.watched_next
        ? el("span", { class: "tag next" }, " watched next") : null));
    if (item.score !== null) {
      const bar = el("span", { class: "bar", "aria-hidden": "true" });
      // CSSOM, not a style attribute: the page's policy allows no inline styles.
      bar.style.width = `${10 + 90 * ((item.score - lo) / span)}%`;
      li.append(el("div", { class: "score" },
        el("span", { class: "track", "aria-hidden": "true" }, bar),
        el("span", { class: "value" }, `score ${item.score.toFixed(2)}`)));
    } else {
      li.append(el("div", { class: "score" },
        el("span", { class: "value" }, "not scored (no vector)")));
    }
    li.append(because(item.because));
    list.append(li);
  });
}

// What a refused call says, in a sentence.
async function refusal(response, path) {
  if (response.status === 401) {
    return "this service needs an API key (RERANK_API_KEYS), which the demo page cannot send";
  }
  let detail = "";
  try {
    const body = await response.json();
    const first = Array.isArray(body.detail) ? body.detail[0] : null;
    detail = first ? `${first.loc.join(".")}: ${first.msg}` : String(body.detail || "");
  } catch (_) { /* not JSON: the status alone */ }
  return `POST /${path} answered ${response.status}${detail ? ` (${detail})` : ""}`;
}

async function rerank() {
  const seq = ++state.seq;
  const body = {
    user_id: state.user.user_id,
    candidates: state.candidates,
    k: state.sample.k,
    history: state.history.slice(-state.sample.history_len),
    explain: true,
  };
  let response;
  try {
    response = await fetch("rerank", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (err) {
    say(`The service did not answer: ${err.message}`, true);
    return false;
  }
  if (seq !== state.seq) return false;
  if (!response.ok) {
    say(`No ranking: ${await refusal(response, "rerank")}.`, true);
    return false;
  }
  state.answer = await response.json();
  if (seq !== state.seq) return false;
  renderRanked();
  renderCandidates();
  renderHistory();
  if (state.answer.degraded) {
    say("Degraded answer: the model did not run, so the recall order is shown.", true);
  }
  document.body.dataset.ready = String(state.seq);
  return true;
}

function chooseUser(userId) {
  const user = state.sample.users.find((u) => u.user_id === userId);
  state.user = user;
  state.history = [...user.history];
  state.picked = new Set();
  // The films added here close every user's list: recall has never seen them.
  const ids = [...user.candidates, ...state.added.filter((id) => !user.history.includes(id))];
  state.candidates = ids;
  state.recallPos = new Map(ids.map((id, i) => [id, i + 1]));
  state.answer = null;
  const readWindow = state.sample.history_len;
  say(`User ${user.user_id}: ${user.history_total} films watched; the newest ${
    Math.min(readWindow, user.history.length)} go to the model.`);
  return rerank();
}

// A picked film leaves the recall list (recall never proposes a film already watched) and
// joins the history; focus stays where it was in the list the visitor picked from.
async function pick(id, listId, index) {
  state.history.push(id);
  state.picked.add(id);
  state.candidates = state.candidates.filter((c) => c !== id);
  say(`Added ${title(id)} to the history; reranking…`);
  if (await rerank()) {
    const first = state.answer.items[0];
    say(`Added ${title(id)} to the history. Number 1 is now ${title(first.item_id)}.`);
    const buttons = $(listId).querySelectorAll("button.film");
    if (buttons.length) buttons[Math.min(index, buttons.length - 1)].focus();
  }
}

// The form for a new film: the model's item tower names the attributes it reads
// (demo.json's new_items); a model without one gets a note instead of the form.
function buildNewItemForm() {
  const spec = state.sample.new_items;
  $("new-item").hidden = false;
  if (!spec) {
    $("new-form").hidden = true;
    $("new-note").textContent = "This model has no item tower, so a new film waits for the "
      + "next training (a model trained with id dropout has one: docs/model.md).";
    return;
  }
  const box = $("new-attributes");
  for (const attr of spec.categorical) {
    const set = el("fieldset", { class: "choices" }, el("legend", {}, attr.name));
    for (const value of attr.values) {
      set.append(el("label", {},
        el("input", { type: "checkbox", name: `cat:${attr.name}`, value }), ` ${value}`));
    }
    box.append(set);
  }
  for (const attr of spec.numeric) {
    const id = `new-num-${attr.name}`;
    box.append(el("p", {},
      el("label", { for: id }, attr.name),
      el("input", { id, name: `num:${attr.name}`, type: "number", step: "any",
        placeholder: String(attr.median) })));
  }
  $("new-form").addEventListener("submit", addNewItem);
}

function newItemBody(form) {
  const spec = state.sample.new_items;
  const attributes = {};
  for (const attr of spec.categorical) {
    attributes[attr.name] = [...form.elements]
      .filter((input) => input.name === `cat:${attr.name}` && input.checked)
      .map((input) => input.value);
  }
  for (const attr of spec.numeric) {
    const raw = form.elements[`num:${attr.name}`].value;
    if (raw !== "") attributes[attr.name] = Number(raw);
  }
  // A fresh id per film: POST /items never replaces a vector, so an id used twice would
  // keep the first film's vector.
  const stamp = Date.now().toString(36);
  const salt = Math.floor(Math.random() * 36 ** 4).toString(36);
  return { item_id: `new-${stamp}-${salt}`, text: $("new-title").value.trim(), attributes };
}

async function addNewItem(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const item = newItemBody(form);
  $("new-add").disabled = true;
  try {
    let response;
    try {
      response = await fetch("items", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ items: [item] }),
      });
    } catch (err) {
      say(`The service did not answer: ${err.message}`, true);
      return;
    }
    if (!response.ok) {
      say(`Not added: ${await refusal(response, "items")}.`, true);
      return;
    }
    const values = state.sample.new_items.categorical.flatMap((a) => item.attributes[a.name]);
    state.sample.items[item.item_id] = { title: item.text, genres: values };
    state.added.push(item.item_id);
    state.candidates.push(item.item_id);
    state.recallPos.set(item.item_id, state.candidates.length);
    say(`Added ${item.text}; reranking…`);
    if (await rerank()) {
      const answer = state.answer;
      const rank = answer.items.findIndex((i) => i.item_id === item.item_id) + 1;
      let where;
      if (answer.missing.includes(item.item_id)) where = "it has no vector (not scored)";
      else if (rank) where = `scored and ranked #${rank} of the top ${state.sample.k}`;
      else where = `scored, below the top ${state.sample.k}`;
      say(`Added ${item.text} from recall #${state.candidates.length}: ${where}.`);
      form.reset();
    }
  } finally {
    $("new-add").disabled = false;
  }
}

function onListClick(event) {
  const button = event.target.closest("button.film");
  if (!button) return;
  const list = event.currentTarget;
  const index = [...list.querySelectorAll("button.film")].indexOf(button);
  pick(button.dataset.item, list.id, index);
}

async function start() {
  let response;
  try {
    response = await fetch("demo/sample.json");
  } catch (err) {
    say(`Could not load the sample users: ${err.message}`, true);
    return;
  }
  if (!response.ok) {
    let detail = `GET demo/sample.json answered ${response.status}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) { /* not JSON: keep the status */ }
    say(detail, true);
    return;
  }
  state.sample = await response.json();
  for (const id of ["k-text", "k-heading"]) $(id).textContent = String(state.sample.k);
  const select = $("user");
  for (const user of state.sample.users) {
    select.append(el("option", { value: user.user_id },
      `User ${user.user_id} (${user.history_total} films)`));
  }
  select.disabled = false;
  $("reset").disabled = false;
  select.addEventListener("change", () => chooseUser(select.value));
  $("reset").addEventListener("click", () => chooseUser(select.value));
  $("ranked").addEventListener("click", onListClick);
  $("candidates").addEventListener("click", onListClick);
  buildNewItemForm();
  await chooseUser(state.sample.users[0].user_id);
}

document.addEventListener("DOMContentLoaded", start);
