// The server's HTTP APIs: the OpenAI-style chat (streamed as Server-Sent Events) and the account API.

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const UNREACHABLE = "Cannot reach the server: is mistral-serve running? Check the connection and try again.";

async function errorOf(response) {
  let detail = {};
  try { detail = (await response.json()).error || {}; } catch { /* not JSON */ }
  const message = detail.message || `${response.status} ${response.statusText}`;
  if (response.status === 401 && !/\/api\/(account|admin)\b/.test(response.url)) {
    return new ApiError(401, `The server refused the API key: ${message} Check the key above, or whether it ` +
                             "was disabled on the Keys page.", detail.code);
  }
  return new ApiError(response.status, message, detail.code);
}

async function send(url, options) {
  try {
    return await fetch(url, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, UNREACHABLE);
  }
}

export async function listModels() {
  const response = await send("/v1/models", {});
  if (!response.ok) throw await errorOf(response);
  return (await response.json()).data;
}

// Streams one chat completion. `onDelta(text)` gets each piece of the first choice's content. Resolves
// to {text, finishReason, usage, ttftMs, elapsedMs}; an abort through `signal` keeps the partial text.
export async function streamChat(body, key, { signal, onDelta }) {
  const started = performance.now();
  const result = { text: "", finishReason: null, usage: null, ttftMs: null, elapsedMs: null, numChunks: 0 };
  const response = await send("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` },
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) handleEvent(event, result, started, onDelta);
    }
  } catch (error) {
    if (error.name !== "AbortError") throw new ApiError(0, "The connection to the server was lost mid-answer.");
    result.finishReason = "stopped";
  }
  result.elapsedMs = performance.now() - started;
  return result;
}

function handleEvent(event, result, started, onDelta) {
  const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).trimStart()).join("\n");
  if (!data || data === "[DONE]") return;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
  if (chunk.usage) result.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    if (choice.index !== 0) continue;
    const text = choice.delta?.content;
    if (text) {
      if (result.ttftMs === null) result.ttftMs = performance.now() - started;
      result.numChunks += 1;
      result.text += text;
      onDelta(text);
    }
    if (choice.finish_reason) result.finishReason = choice.finish_reason;
  }
}

// --- the account and operator APIs: a session cookie, and the CSRF token echoed in a header on every change ---

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)msv_csrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : "";
}

export function hasSession() {
  return csrfToken() !== "";
}

export const account = (method, path, body) => sessionRequest("/api/account", method, path, body);
export const admin = (method, path, body) => sessionRequest("/api/admin", method, path, body);

async function sessionRequest(base, method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  const response = await send(`${base}${path}`, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}
