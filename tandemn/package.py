"""Builds what a deployment needs besides ``chalice package``'s own output.

- ``merge-template OUT``: ``infra/template.json`` with each state machine's definition from
  ``infra/statemachines/`` inlined, for ``chalice package --merge-template``. CloudFormation
  cannot read a local file, and inlining lets cfn-lint check the definitions too.
- ``sidecar OUT``: ``sidecar.zip``, the sidecar package that EC2 replicas download from the data
  bucket (``artifacts/sidecar.zip``) at boot and run with ``PYTHONPATH=sidecar.zip``.

``make package`` runs both, then ``chalice package`` and cfn-lint.
"""

from __future__ import annotations

import argparse
import copy
import json
import zipfile
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = PROJECT_DIR / "infra" / "template.json"
SIDECAR_DIR = PROJECT_DIR / "sidecar"
# The template marks each state machine resource with the file its definition comes from,
# relative to the template.
DEFINITION_FILE_KEY = "tandemn:definition-file"


def merge_template(template_path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """Returns the template with each state machine's definition inlined."""
    template = json.loads(template_path.read_text())
    merged = copy.deepcopy(template)
    for logical_id, resource in merged.get("Resources", {}).items():
        if resource.get("Type") != "AWS::StepFunctions::StateMachine":
            continue
        file_name = (resource.get("Metadata") or {}).get(DEFINITION_FILE_KEY)
        if not file_name:
            raise ValueError(f"state machine {logical_id} has no Metadata.{DEFINITION_FILE_KEY}")
        definition = json.loads((template_path.parent / file_name).read_text())
        resource["Properties"]["Definition"] = definition
    return merged


def build_sidecar_bundle(output: Path) -> list[str]:
    """Writes the sidecar package's Python files into a zip; returns the archive names."""
    names = []
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(SIDECAR_DIR.glob("*.py")):
            name = f"sidecar/{path.name}"
            archive.write(path, name)
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge-template", help="write the template to merge")
    merge.add_argument("output", type=Path)
    bundle = commands.add_parser("sidecar", help="write sidecar.zip")
    bundle.add_argument("output", type=Path)
    arguments = parser.parse_args()
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    if arguments.command == "merge-template":
        arguments.output.write_text(json.dumps(merge_template(), indent=2) + "\n")
    else:
        build_sidecar_bundle(arguments.output)
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
