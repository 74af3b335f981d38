"""Tool calling in lorag's tool format, for base models whose chat template has none.

OpenAI's request carries `tools` (function signatures), `tool_choice` and the turns of a
conversation with calls in it (an assistant message's `tool_calls`, then a `tool` message
with each call's result). A chat template without a tool format (SmolLM2's, Llama 2's)
cannot render those, so lorag writes them as text the model reads and an adapter can
learn (Hermes' and Qwen 2.5's convention):

- the signatures go at the end of the system message, one JSON object per line, after
  TOOLS_HEADER, which says how to call;
- a call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call, in
  the assistant's text;
- a result is a user turn `<tool_response>{"name": ..., "content": ...}</tool_response>`.

`required` and a named function constrain the output with a grammar built from the
tools' JSON schemas (server/engine/structured.py: xgrammar), so the calls and their
arguments are valid by construction on any base; `auto` leaves the choice to the model,
and its text is read back into calls where it wrote them (`split_calls`).
"""

import json
import re
import uuid
from dataclasses import dataclass

from lorag.errors import InvalidRequest
from lorag.server.engine.structured import Constraint, ebnf

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to answer. Their signatures, one JSON "
    "object per line:\n{signatures}\nTo call a function, answer with one JSON object per "
    "call, each inside <tool_call></tool_call> tags:\n<tool_call>{{\"name\": <function "
    "name>, \"arguments\": <arguments as a JSON object>}}</tool_call>")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_ROOT = re.compile(r"\broot\b")


@dataclass(frozen=True)
class ToolUse:
    """What a chat asks of tools: the functions (name -> signature: name, description,
    parameters), how the model may call them (`choice`: auto, required, or one function's
    name) and whether it may call several at once."""

    functions: dict[str, dict]
    choice: str = "auto"
    parallel: bool = True

    def check(self) -> None:
        """Refuse a function whose parameters schema no grammar can be built from (after
        the service's limits: server/limits.py `check_tools`)."""
        for i, function in enumerate(self.functions.values()):
            if "parameters" in function:
                check_parameters(function["parameters"], f"tools.{i}.function.parameters")

    def constraint(self) -> Constraint | None:
        """The grammar a `required` or named choice decodes under (None for auto): one
        call, or several with `parallel`, of the allowed functions, each's arguments
        valid against its parameters."""
        if self.choice == "auto":
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        call = _call_grammar([self.functions[name] for name in names])
        more = f' ("\\n{OPEN}" call "{CLOSE}")*' if self.parallel else ""
        return Constraint("grammar", f'root ::= "{OPEN}" call "{CLOSE}"{more}\n{call}')

    def system_text(self) -> str:
        """What the system message gains: the signatures and how to call."""
        signatures = "\n".join(json.dumps({"type": "function", "function": signature})
                               for signature in self.functions.values())
        return TOOLS_HEADER.format(signatures=signatures)


def tool_use(functions: list[dict], choice: str | None, parallel: bool,
             where: str = "tools.{i}.function") -> ToolUse | None:
    """What a chat offers: `functions` (each {"name", "description", "parameters"}),
    `choice` (None, none, auto, required or a function's name): None when no tool is
    offered (none of them, or `none`). `where` names a function's field in errors."""
    if not functions:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(f"tool_choice {choice!r} needs tools", field="tool_choice")
        return None
    if choice == "none":
        return None
    named = {}
    for i, function in enumerate(functions):
        name = function["name"]
        if name in named:
            raise InvalidRequest(f"tools[{i}]: a function named {name!r} is already in "
                                 "tools", field=where.format(i=i) + ".name")
        named[name] = function
    if choice not in (None, "auto", "required") and choice not in named:
        raise InvalidRequest(f"tool_choice names function {choice!r}, which is not in tools "
                             f"({', '.join(named)})", field="tool_choice.function.name")
    return ToolUse(named, choice or "auto", parallel)


def check_parameters(parameters: dict, where: str) -> None:
    """Refuse a function's parameters schema no grammar can be built from."""
    try:
        _call_grammar([{"name": "f", "parameters": parameters}])
    except InvalidRequest as e:
        raise InvalidRequest(e.message.replace("response_format: the json_schema",
                                               f"{where}: the schema"), field=where) from e


def _call_grammar(functions: list[dict]) -> str:
    """EBNF of one call's JSON, `{"name": ..., "arguments": ...}` for one of `functions`,
    as the rule `call` (and the rules it uses)."""
    cases = [{"type": "object", "additionalProperties": False,
              "required": ["name", "arguments"],
              "properties": {"name": {"const": function["name"]},
                             "arguments": function.get("parameters") or {"type": "object"}}}
             for function in functions]
    return _ROOT.sub("call", ebnf(Constraint.of_schema({"anyOf": cases})))


def template_messages(messages: list[dict], tools: ToolUse | None) -> list[dict]:
    """OpenAI's messages (with tool calls and results) as plain role/content turns in
    lorag's tool format, the tools' signatures in the system message."""
    names, out = {}, []
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                calls.append(OPEN + json.dumps({"name": call["function"]["name"],
                                                "arguments": _arguments(call, i)}) + CLOSE)
            content = "\n".join(([content] if content else []) + calls)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in names:
                raise InvalidRequest(
                    f"messages[{i}] is a tool result for tool_call_id {call_id!r}, which no "
                    "earlier assistant message's tool_calls has", field=f"messages.{i}")
            role = "user"
            content = "<tool_response>" + json.dumps({"name": names[call_id],
                                                      "content": content}) + "</tool_response>"
        out.append({**{k: v for k, v in message.items()
                       if k not in ("tool_calls", "tool_call_id")},
                    "role": role, "content": content})
    if tools is None:
        return out
    if out and out[0]["role"] in ("system", "developer"):
        return [{**out[0], "content": out[0]["content"] + "\n\n" + tools.system_text()},
                *out[1:]]
    return [{"role": "system", "content": tools.system_text()}, *out]


def _arguments(call: dict, index: int) -> dict:
    """A past call's arguments (OpenAI sends them as a JSON string) as an object."""
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"messages[{index}].tool_calls: the arguments of call "
                             f"{call['id']!r} are not JSON: {e}",
                             field=f"messages.{index}.tool_calls") from e
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"messages[{index}].tool_calls: the arguments of call "
                             f"{call['id']!r} must be a JSON object",
                             field=f"messages.{index}.tool_calls")
    return arguments


def split_calls(text: str, tools: ToolUse) -> tuple[str | None, list[dict]]:
    """The reply's text outside its calls (None if nothing is left), and its calls in
    OpenAI's shape. A tagged span that is no call of a known function stays text."""
    calls, kept, end = [], [], 0
    for match in _CALL.finditer(text):
        call = read_call(match[1], tools)
        if call is not None:
            kept.append(text[end:match.start()])
            calls.append(call)
            end = match.end()
    kept.append(text[end:])
    content = "".join(kept).strip()
    return (content or None), calls


def read_call(body: str, tools: ToolUse) -> dict | None:
    """One call's JSON as OpenAI's tool call (a fresh id; the arguments as a JSON string),
    or None when it is not a call of one of `tools`' functions."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tools.functions \
            or not isinstance(call.get("arguments", {}), dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(call.get("arguments", {}))}}


class CallStream:
    """A streamed reply's text split into content and calls as it arrives: text that might
    be the start of a call is held back until it is one or is not."""

    def __init__(self, tools: ToolUse):
        self.tools, self.pending = tools, ""

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """The content now safe to send and the calls now complete."""
        self.pending += text
        content, calls = [], []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_tag(self.pending)
                content.append(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            end = self.pending.find(CLOSE, start)
            if end < 0:
                content.append(self.pending[:start])
                self.pending = self.pending[start:]
                if final:  # a call cut short (max_tokens): it stays text
                    content.append(self.pending)
                    self.pending = ""
                break
            call = read_call(self.pending[start + len(OPEN):end], self.tools)
            whole = self.pending[start:end + len(CLOSE)]
            content.append(self.pending[:start] + ("" if call else whole))
            calls += [call] if call else []
            self.pending = self.pending[end + len(CLOSE):]
        return "".join(content), calls


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin OPEN."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
