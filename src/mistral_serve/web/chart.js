// The usage chart, drawn as SVG: tokens per day as bars, requests per day as a line on its own scale.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const HEIGHT = 240;
const PAD = { top: 16, right: 44, bottom: 28, left: 56 };

function svg(tag, attributes = {}, text = null) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== null) element.textContent = text;
  return element;
}

// `days`: [{day: "YYYY-MM-DD", tokens, requests}], oldest first.
export function drawUsageChart(container, days) {
  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart",
                             "aria-label": "Tokens and requests per day" });
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const maxTokens = Math.max(1, ...days.map((d) => d.tokens));
  const maxRequests = Math.max(1, ...days.map((d) => d.requests));
  const slot = plotWidth / Math.max(1, days.length);
  const y = (value, max) => PAD.top + plotHeight * (1 - value / max);

  for (const fraction of [0, 0.5, 1]) {
    const lineY = PAD.top + plotHeight * (1 - fraction);
    chart.append(svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: lineY, y2: lineY, class: "grid" }),
      svg("text", { x: PAD.left - 6, y: lineY + 4, class: "axis tokens", "text-anchor": "end" },
          compact(maxTokens * fraction)),
      svg("text", { x: WIDTH - PAD.right + 6, y: lineY + 4, class: "axis requests" }, compact(maxRequests * fraction)));
  }
  days.forEach((d, i) => {
    const barHeight = plotHeight * (d.tokens / maxTokens);
    const bar = svg("rect", { x: PAD.left + i * slot + slot * 0.15, width: Math.max(1, slot * 0.7),
                              y: PAD.top + plotHeight - barHeight, height: barHeight, class: "bar" });
    bar.append(svg("title", {}, `${d.day}: ${d.tokens} tokens, ${d.requests} requests`));
    chart.append(bar);
  });
  const points = days.map((d, i) => `${PAD.left + (i + 0.5) * slot},${y(d.requests, maxRequests)}`).join(" ");
  chart.append(svg("polyline", { points, class: "requests-line" }));
  const labelEvery = Math.ceil(days.length / 6);
  days.forEach((d, i) => {
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: PAD.left + (i + 0.5) * slot, y: HEIGHT - 8, class: "axis", "text-anchor": "middle" },
                       d.day.slice(5)));
    }
  });
  container.replaceChildren(chart);
}

function compact(value) {
  return value >= 1e6 ? `${(value / 1e6).toFixed(1)}M` : value >= 1e3 ? `${(value / 1e3).toFixed(1)}k` : Number.isInteger(value) ? String(value) : value.toFixed(1);
}
