"""How much one request may ask the engine to generate: the account's plan (choices per request,
tokens per choice) and this server's bounds on the whole reply (n × max_tokens, and its log
probabilities, which make each token ~80 bytes of JSON per alternative).

A request that asks for more than a cap with `n` or `max_tokens` gets a 400 naming the cap. A
request without max_tokens may generate up to the rest of the context, lowered to fit every cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral_serve.api.errors import invalid_request
from mistral_serve.api.protocol import ChatCompletionRequest
from mistral_serve.db.plans import PlanLimits
from mistral_serve.engine.params import SamplingParams


@dataclass(frozen=True)
class OutputCaps:
    plan: PlanLimits
    plan_label: str  # "your account's plan (free)"
    max_generated_tokens: int  # n × max_tokens, the server's bound
    max_logprobs: int  # n × max_tokens × (1 + top_logprobs), the server's bound

    def check_request(self, request: ChatCompletionRequest) -> None:
        """Before any work: the plan's bounds on n and max_tokens, as the client gave them."""
        n, max_tokens = request.n or 1, request.max_new_tokens
        if self.plan.max_n is not None and n > self.plan.max_n:
            raise invalid_request(f"n is {n}, more than the {self.plan.max_n} choices per request "
                                  f"{self.plan_label} allows.", param="n", code="plan_limit_exceeded")
        max_output_tokens = self.plan.max_output_tokens
        if max_output_tokens is not None and max_tokens is not None and max_tokens > max_output_tokens:
            raise invalid_request(f"max_tokens is {max_tokens}, more than the {max_output_tokens} tokens "
                                  f"per choice {self.plan_label} allows.", param="max_tokens",
                                  code="plan_limit_exceeded")

    def max_tokens_per_choice(self, params: SamplingParams, num_context_tokens_left: int) -> int:
        """The most tokens each choice may generate: the client's max_tokens if every cap allows it
        (a 400 otherwise), else the rest of the context lowered to fit the caps."""
        n = params.n
        entries_per_token = 1 + (params.top_logprobs if params.logprobs else 0)
        bounds = [(self.max_generated_tokens // n, f"n × max_tokens is at most {self.max_generated_tokens} here")]
        if params.logprobs:
            bounds.append((self.max_logprobs // (n * entries_per_token),
                           f"with logprobs, n × max_tokens × (1 + top_logprobs) is at most {self.max_logprobs} here"))
        if params.max_tokens is not None:
            for bound, rule in bounds:
                if params.max_tokens > bound:
                    raise invalid_request(f"This request may generate too much: {rule}, and n {n} × max_tokens "
                                          f"{params.max_tokens} is over it. Lower max_tokens or n"
                                          + (" or top_logprobs." if params.logprobs else "."), param="max_tokens",
                                          code="output_too_large")
            return params.max_tokens
        caps = [num_context_tokens_left] + [bound for bound, _ in bounds]
        if self.plan.max_output_tokens is not None:
            caps.append(self.plan.max_output_tokens)
        most = min(caps)
        if most < 1:
            raise invalid_request(f"This request may generate too much: {bounds[-1][1]}. Lower n"
                                  + (" or top_logprobs." if params.logprobs else "."), param="n",
                                  code="output_too_large")
        return most
