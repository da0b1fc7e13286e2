"""JSON Schema files generated from the message and configuration models.

The committed files in ``daemon/schemas/`` are the published contract; a test fails when they
drift from the models. Regenerate with::

    python -m scopestream.daemon._schemas --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._messages import ENGINE_BODIES, SCHEMA_VERSION, Header
from scopestream.daemon._stage import installed_stage_plugins

SCHEMA_DIR = Path(__file__).parent / "schemas"


def schema_documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for the header, every topic body and the configuration."""
    docs: dict[str, dict[str, Any]] = {"header.json": Header.model_json_schema()}
    # Entry points only: stages registered at run time (notebooks, tests) are not the contract.
    plugins = installed_stage_plugins()
    bodies = dict(ENGINE_BODIES)
    for plugin in plugins.values():
        for topic, model in plugin.topics.items():
            if topic in bodies and bodies[topic] is not model:
                raise ValueError(f"topic {topic!r} is declared with two different body models")
            bodies[topic] = model
    for topic, model in sorted(bodies.items()):
        doc = model.model_json_schema()
        doc["x-scopestream-topic"] = topic
        docs[f"topic-{topic}.json"] = doc
    config_doc = ScopestreamConfig.model_json_schema()
    sections = {name: p.settings_model.model_json_schema() for name, p in sorted(plugins.items())}
    config_doc["x-scopestream-stage-sections"] = sections
    docs["config.json"] = config_doc
    for doc in docs.values():
        doc["x-scopestream-schema-version"] = SCHEMA_VERSION
    return docs


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Schema files that are missing, different or no longer generated."""
    docs = schema_documents()
    stale = [name for name, doc in docs.items()
             if not (directory / name).is_file() or (directory / name).read_text() != render(doc)]
    stale += [p.name for p in directory.glob("*.json") if p.name not in docs]
    return sorted(stale)


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    docs = schema_documents()
    for p in directory.glob("*.json"):
        if p.name not in docs:
            p.unlink()
    for name, doc in docs.items():
        (directory / name).write_text(render(doc))
    return sorted(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="regenerate the files")
    args = parser.parse_args(argv)
    if args.write:
        for name in write():
            print(f"wrote {SCHEMA_DIR / name}")
        return 0
    stale = stale_files()
    if stale:
        print(f"stale schema files: {stale}; run python -m scopestream.daemon._schemas --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
