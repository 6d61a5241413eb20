// The exact request the workbench sends, as code to copy: cURL, Python with `requests` (as the
// providers' docs show it) and Python with the `openai` client. Each, run as is, sends the same body.

const KEY_VARIABLE = "MISTRAL_SERVE_API_KEY";
// the keyword arguments the openai client takes; any other field goes in `extra_body`
const OPENAI_ARGUMENTS = new Set([
  "model", "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
  "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream",
  "stream_options", "temperature", "top_p", "user", "tools", "tool_choice", "parallel_tool_calls",
]);

export function snippet(lang, { baseUrl, body, key }) {
  return { curl, requests, openai }[lang]({ baseUrl, body, key });
}

function curl({ baseUrl, body, key }) {
  const auth = key ? `Bearer ${key}` : `Bearer $${KEY_VARIABLE}`;
  const quote = (text) => `'${text.replace(/'/g, "'\\''")}'`;
  const header = key ? quote(`Authorization: ${auth}`) : `"Authorization: ${auth}"`;
  return [
    `curl -sS -N ${baseUrl}/v1/chat/completions \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -H ${header} \\`,
    `  -d ${quote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

function requests({ baseUrl, body, key }) {
  const keyLine = key ? `API_KEY = ${python(key)}` : `API_KEY = os.environ[${python(KEY_VARIABLE)}]`;
  return [
    "import json",
    ...(key ? [] : ["import os"]),
    "",
    "import requests",
    "",
    keyLine,
    "",
    "response = requests.post(",
    `    ${python(`${baseUrl}/v1/chat/completions`)},`,
    `    headers={"Authorization": f"Bearer {API_KEY}"},`,
    `    json=${python(body, 4)},`,
    `    stream=${body.stream ? "True" : "False"},`,
    ")",
    "response.raise_for_status()",
    ...(body.stream ? [
      "for line in response.iter_lines():",
      '    if line.startswith(b"data: ") and line != b"data: [DONE]":',
      '        chunk = json.loads(line[len(b"data: "):])',
      '        for choice in chunk["choices"]:',
      '            print(choice["delta"].get("content") or "", end="", flush=True)',
      "print()",
    ] : [
      'print(response.json()["choices"][0]["message"]["content"])',
    ]),
  ].join("\n");
}

function openai({ baseUrl, body, key }) {
  const known = Object.entries(body).filter(([name]) => OPENAI_ARGUMENTS.has(name));
  const extra = Object.fromEntries(Object.entries(body).filter(([name]) => !OPENAI_ARGUMENTS.has(name)));
  const argumentLines = known.map(([name, value]) => `    ${name}=${python(value, 4)},`);
  if (Object.keys(extra).length) argumentLines.push(`    extra_body=${python(extra, 4)},`);
  return [
    ...(key ? [] : ["import os", ""]),
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url=${python(`${baseUrl}/v1`)},`,
    `    api_key=${key ? python(key) : `os.environ[${python(KEY_VARIABLE)}]`},`,
    ")",
    `${body.stream ? "stream" : "completion"} = client.chat.completions.create(`,
    ...argumentLines,
    ")",
    ...(body.stream ? [
      "for chunk in stream:",
      "    for choice in chunk.choices:",
      '        print(choice.delta.content or "", end="", flush=True)',
      "print()",
    ] : ["print(completion.choices[0].message.content)"]),
  ].join("\n");
}

// A Python literal for a JSON value, indented to sit at `indent` spaces.
export function python(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((item) => `${pad}    ${python(item, indent + 4)},`).join("\n")}\n${pad}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([name, item]) => `${pad}    ${JSON.stringify(name)}: ${python(item, indent + 4)},`).join("\n")}\n${pad}}`;
}
