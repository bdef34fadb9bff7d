"""Size of the Lambda deployment package that ``chalice package`` builds for the dev stage.

Builds the package into a temporary folder the way ``make package`` does (merge template, then
``chalice package --stage dev``), or reads an existing zip given with ``--zip``, and prints its
compressed and uncompressed sizes with the largest top-level entries. Building needs PyPI, or
Chalice's cache in ``.chalice/deployments``, for the Lambda dependencies in requirements.txt.
boto3 is not in the zip, because the Lambda Python runtime provides it.

Lambda's limits: 50 MB for a zip uploaded directly, 250 MB unzipped (function and layers).

Run: ``python bench/package_size.py [--zip out/package/deployment.zip]``
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _harness import PROJECT_DIR, machine_line

MIB = 1024 * 1024
ZIPPED_LIMIT_BYTES = 50 * MIB
UNZIPPED_LIMIT_BYTES = 250 * MIB


def build(folder: Path) -> Path:
    """Runs the packaging steps of ``make package`` into ``folder``; returns the zip's path."""
    python = Path(sys.executable)
    merge = folder / "merge-template.json"
    subprocess.run(
        [python, "-m", "tandemn.package", "merge-template", str(merge)],
        cwd=PROJECT_DIR,
        check=True,
    )
    environment = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run(
        [
            python.parent / "chalice",
            "package",
            "--stage",
            "dev",
            "--pkg-format",
            "cloudformation",
            "--merge-template",
            str(merge),
            str(folder / "package"),
        ],
        cwd=PROJECT_DIR,
        env=environment,
        check=True,
    )
    return folder / "package" / "deployment.zip"


def top_level(name: str) -> str:
    """Groups a zip entry by its distribution: ``pydantic_core-2.x.dist-info`` -> pydantic_core."""
    head = name.split("/", 1)[0]
    if head.endswith((".dist-info", ".data")):
        head = head.split("-", 1)[0]
    return head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, help="measure this zip instead of building one")
    parser.add_argument("--top", type=int, default=10, help="entries to list")
    args = parser.parse_args()

    print(machine_line())
    with tempfile.TemporaryDirectory() as folder:
        path = args.zip or build(Path(folder))
        zipped = path.stat().st_size
        by_entry: collections.Counter[str] = collections.Counter()
        compressed: collections.Counter[str] = collections.Counter()
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                by_entry[top_level(info.filename)] += info.file_size
                compressed[top_level(info.filename)] += info.compress_size
    unzipped = sum(by_entry.values())
    print(
        f"deployment.zip: {zipped / MIB:.2f} MiB zipped ({zipped:,} bytes; limit "
        f"{ZIPPED_LIMIT_BYTES / MIB:.0f} MiB), {unzipped / MIB:.2f} MiB unzipped "
        f"(limit {UNZIPPED_LIMIT_BYTES / MIB:.0f} MiB), {len(infos)} files"
    )
    print(f"{'entry':<32} {'unzipped MiB':>12} {'zipped MiB':>10}")
    for name, size in by_entry.most_common(args.top):
        print(f"{name:<32} {size / MIB:>12.2f} {compressed[name] / MIB:>10.2f}")
    return 0 if zipped < ZIPPED_LIMIT_BYTES and unzipped < UNZIPPED_LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
