// One streamed answer, shown as it arrives: the shared part of the workbench and the compare panes.

import { streamChat } from "./api.js";
import { h } from "./dom.js";

// The chat body the workbench sends: the conversation, the parameters the user changed, streaming on.
export function requestBody(model, system, messages, params) {
  const conversation = messages.map(({ role, content }) => ({ role, content }));
  if (system.trim()) conversation.unshift({ role: "system", content: system });
  return { model, messages: conversation, ...params, stream: true, stream_options: { include_usage: true } };
}

// Streams `body` into the text node of `view` (from answerView). Resolves to {text, stats}; throws
// ApiError when the request fails before any text arrived.
export async function runInto(view, body, key, signal) {
  view.root.classList.add("streaming");
  let result;
  try {
    result = await streamChat(body, key, { signal, onDelta: (text) => { view.text.textContent += text; } });
  } finally {
    view.root.classList.remove("streaming");
  }
  const stats = statsOf(result);
  view.stats.textContent = formatStats(stats);
  return { text: result.text, stats };
}

function statsOf(result) {
  const numTokens = result.usage?.completion_tokens ?? result.numChunks;
  const decodeSeconds = (result.elapsedMs - (result.ttftMs ?? result.elapsedMs)) / 1000;
  return {
    numTokens,
    isExactCount: Boolean(result.usage),
    ttftMs: result.ttftMs === null ? null : Math.round(result.ttftMs),
    tokensPerSecond: numTokens > 1 && decodeSeconds > 0 ? (numTokens - 1) / decodeSeconds : null,
    finishReason: result.finishReason ?? "unknown",
  };
}

export function formatStats(stats) {
  if (!stats) return "";
  const tokens = `${stats.isExactCount ? "" : "≈"}${stats.numTokens} tokens`;
  const ttft = stats.ttftMs === null ? "TTFT —" : `TTFT ${stats.ttftMs} ms`;
  const rate = stats.tokensPerSecond === null ? "— tok/s" : `${stats.tokensPerSecond.toFixed(1)} tok/s`;
  const finish = stats.finishReason === "stopped" ? "stopped by you" : `finish: ${stats.finishReason}`;
  return [tokens, ttft, rate, finish].join(" · ");
}

// The elements of one answer: the role, the text as it arrives, and its numbers underneath.
export function answerView(role = "assistant", content = "", stats = null) {
  const text = h("div", { class: "text" }, content);
  const statsLine = h("div", { class: "stats" }, formatStats(stats));
  const root = h("div", { class: `message ${role}` }, h("div", { class: "role" }, role), text, statsLine);
  return { root, text, stats: statsLine };
}
