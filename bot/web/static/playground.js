// The playground: send a command to POST /v1/commands, show the reply or stream the story.
// Everything the server or the model writes is shown with textContent, never as HTML.
"use strict";

const log = document.getElementById("log");
const form = document.getElementById("command-form");
const input = document.getElementById("command");
const keyInput = document.getElementById("api-key");
const template = document.getElementById("story-template");

keyInput.value = localStorage.getItem("storybot-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("storybot-api-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

// Each command and what came back, newest on top.
function entry(label) {
  const box = document.createElement("section");
  box.className = "entry";
  const line = document.createElement("div");
  line.className = "echo";
  line.textContent = "> " + label;
  box.append(line);
  log.prepend(box);
  return box;
}

function show(where, kind, text) {
  const box = document.createElement("div");
  box.className = kind;
  box.textContent = text;
  where.append(box);
  return box;
}

async function send(body, label) {
  const where = entry(label);
  let response;
  try {
    response = await fetch("/v1/commands", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (err) {
    show(where, "error", "The server did not answer: " + err);
    return;
  }
  const type = response.headers.get("content-type") || "";
  if (type.startsWith("text/event-stream")) {
    await streamStory(response, where);
    return;
  }
  let data = {};
  try { data = await response.json(); } catch (err) { /* not JSON: fall through */ }
  if (!response.ok) {
    show(where, "error", (data.error && data.error.message) || ("HTTP " + response.status));
  } else {
    show(where, "reply", data.reply || "");
  }
}

// Server-Sent Events over fetch: "data: {...}" blocks separated by a blank line.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function streamStory(response, where) {
  const card = template.content.firstElementChild.cloneNode(true);
  const text = card.querySelector(".text");
  const status = card.querySelector(".status");
  const genre = card.querySelector(".genre");
  const notices = card.querySelector(".notices");
  const [cont, regen, cancel] = ["continue", "regenerate", "cancel"].map(c => card.querySelector("." + c));
  where.append(card);
  let id = null;
  status.textContent = "sending…";
  cancel.addEventListener("click", async () => {
    if (!id) return;
    cancel.disabled = true;
    await send({ action: "cancel", request_id: id }, "Cancel");
  });
  cont.addEventListener("click", () => send({ action: "continue", request_id: id }, "Continue"));
  regen.addEventListener("click", () => send({ action: "regenerate", request_id: id }, "Regenerate"));
  try {
    for await (const event of sseEvents(response)) {
      if (event.type === "start") {
        id = event.id;
        card.dataset.id = id;
        genre.textContent = "📖 " + event.genre;
        text.textContent = event.text;
        notices.textContent = (event.notices || []).join(" · ");
        status.textContent = "✍️ writing…";
      } else if (event.type === "queued") {
        status.textContent = "⏳ queued, #" + event.position + " in line (about " + Math.max(1, Math.round(event.eta_s)) + " s)";
      } else if (event.type === "running") {
        status.textContent = "✍️ writing…";
      } else if (event.type === "chunk") {
        status.textContent = "✍️ writing…";
        text.textContent += event.text;
      } else if (event.type === "story") {
        const s = event.story;
        text.textContent = s.text;
        status.textContent = s.genre + " · " + s.tokens + " tokens · seed " + s.seed +
          (s.finish_reason === "length" ? " · trimmed at the length limit" : "");
        card.classList.add("done");
        cont.disabled = false;
        regen.disabled = false;
        cancel.disabled = true;
      } else if (event.type === "error") {
        status.textContent = "⚠️ " + event.error.message;
        card.classList.add("failed");
        cancel.disabled = true;
      }
    }
  } catch (err) {
    status.textContent = "⚠️ the stream broke off: " + err;
    cancel.disabled = true;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (text) send({ text }, text);
});
