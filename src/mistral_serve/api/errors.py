"""One error envelope everywhere: `{"error": {"message", "type", "param", "code"}}`, inside streams too."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_serve.api.protocol import ErrorDetail, ErrorResponse

# OpenAI request fields this server does not honour yet: named in the 400, never silently ignored
# OpenAI's request fields that would change the answer and that this server cannot honour
UNSUPPORTED_FIELDS = frozenset({
    "audio", "function_call", "functions", "logit_bias_type", "prediction", "reasoning_effort", "verbosity",
    "web_search_options",
})

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type or _TYPES.get(status_code, "server_error"),
                                  param=param, code=code)
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(error=self.detail).model_dump(mode="json")


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(error: ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, as OpenAI words it: one message, the field as `param`."""
    problems = error.errors()
    first = problems[0]
    field = _field_path(first["loc"])[:1]
    alternatives = [p for p in problems if _field_path(p["loc"])[:1] == field]
    # a value fits no branch of a union (stop: a string or a list): the branch of its own type says why
    first = next((p for p in alternatives if not p["type"].endswith("_type")), first)
    loc = _field_path(first["loc"])
    if first["type"].endswith("_type") and len(alternatives) > 1:
        first = {**first, "msg": ", or ".join(dict.fromkeys(p["msg"] for p in alternatives))}
    param = ".".join(loc) or None
    kind, message = first["type"], first["msg"]
    if kind == "json_invalid":
        return invalid_request("We could not parse the JSON body of your request: it is not valid JSON "
                               f"({first.get('ctx', {}).get('error', 'invalid')}).", code="invalid_json")
    if kind == "extra_forbidden":
        name = loc[-1] if loc else "?"
        if len(loc) == 1 and name in UNSUPPORTED_FIELDS:
            return invalid_request(f"The parameter '{name}' is not supported by this server yet.",
                                   param=param, code="unsupported_parameter")
        return invalid_request(f"Unrecognized request argument supplied: {param}", param=param,
                               code="unknown_parameter")
    if loc == ["response_format"] and kind == "union_tag_invalid":
        return invalid_request("response_format must have type text, json_object or json_schema.",
                               param=param, code="invalid_value")
    if kind == "string_pattern_mismatch" and loc == ["model"]:
        message = "a model id has no control characters"
    if kind == "union_tag_invalid":
        message = f"unknown role {first['input'].get('role')!r}; expected system, user, assistant or tool"
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    return invalid_request(f"Invalid request: {where}{message}", param=param, code="invalid_value")


def _field_path(loc: tuple) -> list[str]:
    """The loc without what pydantic adds for unions: branch names ("str", "list[str]") and role tags."""
    path = [str(part) for part in loc if part != "body" and not _is_branch_name(part)]
    # a tagged union puts the tag in the path ("messages.0.user.content"): drop it
    if len(path) >= 3 and path[0] == "messages" and path[2] in ("system", "user", "assistant", "tool"):
        del path[2]
    return path


def _is_branch_name(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict")
                                      or part.startswith("constrained-") or ("[" in part and part != "[key]"))


def install(app: FastAPI) -> None:
    """Every error the app raises on purpose becomes the envelope, with its status (an unexpected one
    becomes a 500 in middleware.UnexpectedErrors)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, from_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request failed"
        code = "request_too_large" if error.status_code == 413 else None
        return await api_error(request, APIError(error.status_code, message, code=code, headers=error.headers))

