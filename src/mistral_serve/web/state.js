// What survives a reload (local storage) and what a share link carries (the URL hash). The API key is
// stored only when the user ticks "remember", and never put in a link.

const STATE_KEY = "mistral-serve.state";
const KEY_KEY = "mistral-serve.api-key";

export function emptyPane() {
  return { model: "", params: {} };
}

export function defaultState() {
  return { model: "", system: "", messages: [], draft: "", params: {}, comparePrompt: "",
           panes: [emptyPane(), emptyPane()], lang: "curl", lastBody: null };
}

export function loadState() {
  const state = defaultState();
  try {
    Object.assign(state, JSON.parse(localStorage.getItem(STATE_KEY)) || {});
  } catch { /* a broken entry: start afresh */ }
  return state;
}

export function saveState(state) {
  localStorage.setItem(STATE_KEY, JSON.stringify(state));
}

export function loadKey() {
  return localStorage.getItem(KEY_KEY);
}

export function saveKey(key, remember) {
  if (remember && key) localStorage.setItem(KEY_KEY, key);
  else localStorage.removeItem(KEY_KEY);
}

// --- share links: #share=<base64url of the JSON of the shareable part> ---

const SHARED_FIELDS = ["model", "system", "messages", "params", "panes"];

export function shareUrl(state) {
  const shared = Object.fromEntries(SHARED_FIELDS.map((name) => [name, state[name]]));
  shared.messages = state.messages.map(({ role, content }) => ({ role, content }));
  const bytes = new TextEncoder().encode(JSON.stringify(shared));
  const base64 = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return `${location.origin}${location.pathname}#share=${base64}`;
}

// The state a share link in the current URL carries, merged over `state`; null without one.
export function sharedState(state) {
  const match = location.hash.match(/^#share=([A-Za-z0-9_-]+)$/);
  if (!match) return null;
  try {
    const binary = atob(match[1].replace(/-/g, "+").replace(/_/g, "/"));
    const shared = JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
    const merged = { ...state };
    for (const name of SHARED_FIELDS) if (name in shared) merged[name] = shared[name];
    return merged;
  } catch {
    return null;
  }
}
