r"""OpenAI `tools` -> the TypeScript-style declaration block K2.5/K2.6 chat templates consume.

K2.5/K2.6 checkpoints ship `tool_declaration_ts.py` (remote code, never run here); their
tokenizer's `apply_chat_template` deep-sorts the tools, renders them with it and passes the text
to the template as `tools_ts_str`; the template writes that string into the tool_declare turn,
or the compact tools JSON when it is empty/undefined. This is our own implementation of that
format (docs/kimi_k2.md §5). The whole block:

    # Tools\n\n## functions\nnamespace functions {\n<function>\n<function>...\n}\n

one function = the `interface` lines for its `$defs` (if any), `// description` lines, then
`type NAME = (_: {...}) => any;`. Object fields: required ones first, then optional ones (`?`),
each group by name; two-space indent per level; fields joined by ",\n". Comments above a field:
its description, its constraints (`// maxLength: 8, minLength: 1`) and `// Default: ...`.

Where the official encoder fails (an untyped non-empty schema, a bare `oneOf`/`allOf`, a `$ref`
outside `#/$defs/`, enum values of the wrong type, ...) its tokenizer falls back to the JSON
declaration for the whole list; `tools_to_typescript` raises ValueError in exactly those cases
so hybrid/chat.py can do the same. Checked by tests/test_tool_declaration.py.
"""
from __future__ import annotations

import json
from typing import Any

_INDENT = "  "
# JSON-schema type -> TypeScript, for `"type": [...]` lists
_UNION_NAMES = {"string": "string", "number": "number", "integer": "number",
                "boolean": "boolean", "null": "null", "object": "{}", "array": "Array<any>"}
# constraints shown as a comment, per schema kind
_CONSTRAINTS = {"string": ("maxLength", "minLength", "pattern"),
                "number": ("maximum", "minimum"), "integer": ("maximum", "minimum"),
                "array": ("maxItems", "minItems")}


def deep_sort_dict(obj: Any) -> Any:
    """Recursively sort dict keys (what tokenization_kimi.py does to tools)."""
    if isinstance(obj, dict):
        return {k: deep_sort_dict(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [deep_sort_dict(v) for v in obj]
    return obj


def _comment(text: Any, indent: str) -> str:
    """Description -> `// line` per line (blank lines stay blank, without indent)."""
    if not isinstance(text, str):
        raise ValueError(f"description must be a string, got {type(text).__name__}")
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _kind(schema: Any) -> str:
    """Which rendering rule a schema falls under (the order matters: $ref > anyOf > enum)."""
    if isinstance(schema, bool):
        return "bool"
    if not isinstance(schema, dict):
        raise ValueError(f"schema must be an object, got {schema!r}")
    if "$ref" in schema:
        return "ref"
    if "anyOf" in schema:
        return "anyOf"
    if "enum" in schema:
        return "enum"
    if "type" in schema:
        t = schema["type"]
        if isinstance(t, list):
            return "union"
        if not isinstance(t, str):
            raise ValueError(f"type must be a string or a list, got {t!r}")
        return t if t in ("object", "array") else "scalar"
    if not schema:
        return "any"
    raise ValueError(f"schema without type, enum, anyOf or $ref: {schema!r}")


def _check_enum(schema: dict) -> None:
    t = schema.get("type")
    if t is None:
        return
    if isinstance(t, list):
        if len(t) == 1:
            t = t[0]
        elif len(t) == 2 and "null" in t:
            t = t[0] if t[0] != "null" else t[1]
        else:
            raise ValueError(f"enum with type {t} is not supported")
    ok = {"string": lambda v: isinstance(v, str), "number": lambda v: isinstance(v, (int, float)),
          "integer": lambda v: isinstance(v, int), "boolean": lambda v: isinstance(v, bool)}
    for v in schema["enum"]:
        if v is not None and t in ok and not ok[t](v):
            raise ValueError(f"enum value {v!r} is not of type {t}")


def _literal(v: Any) -> str:
    # strings get double quotes as they are (no escaping); anything else is Python's str()
    return f'"{v}"' if isinstance(v, str) else str(v)


def _default_repr(v: Any) -> str:
    return repr(v) if isinstance(v, (int, float, bool)) else json.dumps(v, ensure_ascii=False)


class _Function:
    """Renders one function; holds its `$defs` and whether the root refers to itself (`#`)."""

    def __init__(self):
        self.defs: dict[str, Any] = {}
        self.self_ref = False

    # -- comments above a field / array item
    def notes(self, schema: Any, indent: str) -> str:
        if not isinstance(schema, dict):
            return ""
        lines = []
        if schema.get("description"):
            lines.append(_comment(schema["description"], indent))
        kind = _kind(schema)
        keys = _CONSTRAINTS.get(schema["type"], ()) if kind in ("scalar", "array") else ()
        shown = sorted(k for k in schema if k in keys)
        if shown:
            lines.append(indent + "// " + ", ".join(f"{k}: {schema[k]}" for k in shown))
        return "".join(line + "\n" for line in lines)

    # -- the type expression
    def type_of(self, schema: Any, indent: str) -> str:
        kind = _kind(schema)
        if kind == "bool":
            return "any" if schema else "null"
        if kind == "any":
            return "any"
        if kind == "ref":
            return self.ref(schema["$ref"])
        if kind == "anyOf":
            return " | ".join(self.type_of(s, indent) for s in schema["anyOf"])
        if kind == "enum":
            _check_enum(schema)
            return " | ".join(_literal(v) for v in schema["enum"])
        if kind == "union":
            bad = [t for t in schema["type"] if t not in _UNION_NAMES]
            if bad:
                raise ValueError(f"unsupported types {bad} in type list")
            return " | ".join(_UNION_NAMES[t] for t in schema["type"])
        if kind == "object":
            return self.object(schema, indent)
        if kind == "array":
            item = schema.get("items") or {}
            notes = self.notes(item, indent + _INDENT)
            if not notes:
                return f"Array<{self.type_of(item, indent)}>"
            inner = indent + _INDENT
            return f"Array<\n{notes}{inner}{self.type_of(item, inner)}\n{indent}>"
        t = schema["type"]
        return "number" if t == "integer" else str(t)

    def ref(self, ref: Any) -> str:
        if ref == "#":
            self.self_ref = True
            return "parameters"
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.split("/")[-1]
            if name not in self.defs:
                raise ValueError(f"reference not found: {ref}")
            return name
        raise ValueError(f"unsupported reference {ref!r} (only '#' and '#/$defs/NAME')")

    def field(self, name: str, schema: Any, optional: bool, indent: str) -> str:
        out = self.notes(schema, indent)
        default = schema.get("default") if isinstance(schema, dict) else None
        if default is not None:
            out += f"{indent}// Default: {_default_repr(default)}\n"
        return out + f"{indent}{name}{'?' if optional else ''}: {self.type_of(schema, indent)}"

    def object(self, schema: dict, indent: str) -> str:
        if not schema:
            return "{}"
        self.defs.update(schema.get("$defs") or {})
        inner = indent + _INDENT
        extra = schema.get("additionalProperties")
        extra_ts = None
        if extra is not None:
            if isinstance(extra, bool):
                extra_ts = "any" if extra else "never"
            elif isinstance(extra, dict):
                extra_ts = self.type_of(extra, inner)
            else:
                raise ValueError(f"unknown additionalProperties: {extra!r}")
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise ValueError(f"properties must be an object, got {props!r}")
        required = set(schema.get("required") or ()) & set(props)
        order = sorted(required) + sorted(set(props) - required)
        fields = [self.field(n, props[n], n not in required, inner) for n in order]
        if extra_ts is not None:
            fields.append(f"{inner}[k: string]: {extra_ts}")
        if not fields:
            return "{}"
        return "{\n" + ",\n".join(fields) + "\n" + indent + "}"

    def render(self, fn: dict) -> str:
        params = fn.get("parameters") or {}
        body = self.object(params, "") if isinstance(params, dict) else "{}"
        interfaces = []
        if self.self_ref:
            # the root is named so it can refer to itself; fields in schema order here
            props = params.get("properties") or {}
            req = set(params.get("required") or ())
            fields = ",\n".join(self.field(n, s, n not in req, _INDENT) for n, s in props.items())
            interfaces.append("interface parameters {" + (f"\n{fields}\n" if fields else "") + "}")
            body = "parameters"
        for name, d in list(self.defs.items()):
            if not isinstance(d, dict):
                raise ValueError(f"$defs/{name} must be a schema object, got {d!r}")
            doc = _comment(d["description"], "") + "\n" if d.get("description") else ""
            interfaces.append(f"{doc}interface {name} {self.type_of(d, '')}")
        parts = ["\n".join(interfaces),
                 _comment(fn["description"], "") if fn.get("description") else "",
                 f"type {fn.get('name', 'function')} = (_: {body}) => any;"]
        return "\n".join(p for p in parts if p)


def tools_to_typescript(tools: list[dict]) -> str:
    """The `tools_ts_str` for an OpenAI tools list (deep-sorted by key first, as the checkpoint's
    tokenizer does). "" when no function tools. Raises ValueError for schemas the official
    encoder rejects (the caller then uses the JSON declaration, as the official tokenizer does)."""
    funcs = []
    for i, tool in enumerate(deep_sort_dict(tools or [])):
        # a missing "type" counts as "function", as in hybrid.chat.validate_tools
        if isinstance(tool, dict) and tool.get("type", "function") == "function" \
                and tool.get("function"):
            try:
                funcs.append(_Function().render(tool["function"]))
            except (TypeError, KeyError, AttributeError) as e:  # malformed schema parts
                raise ValueError(f"tools[{i}]: cannot render the declaration: {e!r}") from e
    if not funcs:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(funcs) + "\n}\n"
