// Limits in words: a key's (the owner's, the operator's ceiling) and a plan's. A null limit is none.

const PLAN_LIMITS = [
  ["requests_per_minute", "rpm"], ["tokens_per_minute", "tpm"], ["max_concurrent_requests", "concurrent"],
  ["tokens_per_day", "tokens/day"], ["tokens_per_month", "tokens/month"], ["max_keys", "keys"],
  ["max_n", "max n"], ["max_output_tokens", "max output tokens"],
];

export const PLAN_LIMIT_NAMES = PLAN_LIMITS.map(([name]) => name);

export function describePlanLimits(limits) {
  const parts = PLAN_LIMITS.filter(([name]) => limits[name] !== null && limits[name] !== undefined)
    .map(([name, label]) => `${limits[name]} ${label}`);
  if (limits.models) parts.push(`models: ${limits.models.join(", ")}`);
  return parts.join(", ") || "no limits";
}

export function describeKeyLimits(limits) {
  const parts = [];
  if (limits.requests_per_minute !== null) parts.push(`${limits.requests_per_minute} rpm`);
  if (limits.tokens_per_minute !== null) parts.push(`${limits.tokens_per_minute} tpm`);
  if (limits.token_budget !== null) parts.push(`${limits.token_budget} tokens/${limits.budget_period}`);
  return parts.join(", ");
}
