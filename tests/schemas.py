"""Five JSON schemas for constrained decoding tests: nested objects, enums, arrays, numbers
and integers with bounds, required fields. Every string and array is bounded, so that even
a random-weight model's output ends within a few dozen tokens."""

import jsonschema

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 16}},
        "required": ["name", "age"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string", "maxLength": 8},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "quantity"], "additionalProperties": False}}},
        "required": ["id", "status", "items"], "additionalProperties": False},
    "reading": {"type": "object", "properties": {
        "sensor": {"enum": ["t1", "t2", "h1"]},
        "value": {"type": "number", "minimum": -40, "maximum": 85},
        "ok": {"type": "boolean"}},
        "required": ["sensor", "value", "ok"], "additionalProperties": False},
    "verdict": {"type": "object", "properties": {
        "verdict": {"enum": ["yes", "no", "unsure"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "source": {"type": "object", "properties": {
            "document": {"type": "string", "maxLength": 10},
            "chunk": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["document", "chunk"], "additionalProperties": False}},
        "required": ["verdict", "confidence", "source"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 4},
        "count": {"type": "integer", "minimum": 1, "maximum": 4}},
        "required": ["tags", "count"], "additionalProperties": False},
}


def validate(instance, schema: dict) -> None:
    """Raise if `instance` does not validate against `schema` (jsonschema, Draft 2020-12)."""
    jsonschema.Draft202012Validator(schema).validate(instance)
