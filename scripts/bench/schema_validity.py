#!/usr/bin/env python3
"""Structured output at volume: every answer must match its schema.

Sends N chat requests with `response_format` (a JSON schema, as the official
openai client's `chat.completions.parse` sends it for a Pydantic model), cycling
through a set of schemas and questions, C at a time, sampled (temperature 0.7,
so answers differ), and checks each answer with the Pydantic model: it must
parse. An answer cut by max_tokens (finish_reason "length") is counted apart:
the grammar makes output valid, not finished.

    .venv/bin/python scripts/bench/schema_validity.py --url http://127.0.0.1:8080 [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import enum
import json
import sys
from collections import Counter
from typing import Optional

from openai import OpenAI
from pydantic import BaseModel, Field, ValidationError


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float = Field(ge=0, le=100)


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: str = Field(max_length=20)
    age: int = Field(ge=0, le=50)
    favorite_color: Color


class Address(BaseModel):
    street: str = Field(max_length=40)
    zip_code: Optional[str] = Field(default=None, max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    address: Address
    hobbies: list[str] = Field(max_length=3)


class Answer(BaseModel):
    answer: bool
    confidence: float = Field(ge=0, le=1)


SCHEMAS = [
    (City, "Describe a large city."),
    (Pet, "Invent a pet."),
    (Person, "Invent a person with an address and hobbies."),
    (Answer, "Is water wet?"),
]


def one(client: OpenAI, model: str, i: int, max_tokens: int):
    cls, q = SCHEMAS[i % len(SCHEMAS)]
    try:
        r = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0.7,
            messages=[{"role": "user", "content": f"{q} (#{i})"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": cls.__name__, "strict": True,
                "schema": _strict(cls.model_json_schema())}})
    except Exception as e:  # noqa: BLE001 - an HTTP failure is a result here
        return cls.__name__, "error", repr(e)[:200]
    ch = r.choices[0]
    if ch.finish_reason == "length":
        return cls.__name__, "length", ch.message.content
    try:
        cls.model_validate_json(ch.message.content)
        return cls.__name__, "valid", None
    except ValidationError as e:
        return cls.__name__, "invalid", f"{ch.message.content!r}: {e}"[:300]


def _strict(schema: dict) -> dict:
    """The openai client's strict form: every property required, no extras."""
    def walk(s):
        if isinstance(s, dict):
            if s.get("type") == "object" and "properties" in s:
                s["required"] = list(s["properties"])
                s["additionalProperties"] = False
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)
    walk(schema)
    return schema


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    client = OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    with cf.ThreadPoolExecutor(a.concurrency) as ex:
        res = list(ex.map(lambda i: one(client, a.model, i, a.max_tokens), range(a.requests)))
    by = Counter((name, kind) for name, kind, _ in res)
    kinds = Counter(kind for _, kind, _ in res)
    report = {"requests": a.requests, "outcomes": dict(kinds),
              "by_schema": {f"{n}/{k}": c for (n, k), c in sorted(by.items())},
              "invalid_examples": [x for _, k, x in res if k == "invalid"][:5],
              "error_examples": [x for _, k, x in res if k == "error"][:5]}
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if kinds["invalid"] == 0 and kinds["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
