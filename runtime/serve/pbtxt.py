"""Triton model configurations: written as protobuf text (config.pbtxt), checked against
Triton's own schema (model_config.proto, shipped as tritonclient.grpc.model_config_pb2)."""
from __future__ import annotations

import json
from typing import Any, Dict, List


class Enum(str):
    """An enum value (TYPE_UINT8, KIND_GPU): written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON string escapes (\" \\ \n) are protobuf text escapes too; UTF-8 stays as is.
    return json.dumps(str(value), ensure_ascii=False)


def to_pbtxt(config: Dict[str, Any], indent: int = 0) -> str:
    """Nested dict -> protobuf text. dict = message, list of dicts = repeated message,
    list of scalars = repeated scalar; `parameters` (str -> str) becomes Triton's map."""
    pad = "  " * indent
    lines: List[str] = []
    for key, value in config.items():
        if key == "parameters" and isinstance(value, dict):
            for name, text in value.items():
                lines.append(f"{pad}parameters {{ key: {_scalar(name)} value {{ string_value: {_scalar(text)} }} }}")
        elif isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1).rstrip("\n"), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 1).rstrip("\n"), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line) + "\n"


def parse_config(text: str):
    """config.pbtxt -> tritonclient's ModelConfig message; unknown fields, wrong types and
    unknown enum values raise (the schema check Triton itself does first when loading)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
