"""Generate the Python API package from protos/, or check that the committed stubs match.

    python scripts/protos.py            # regenerate costmesh/<svc>/v1/*_pb2*.py(i)
    python scripts/protos.py --check    # exit 1 when committed stubs differ from what the protos generate

Output lands straight in the importable package ``costmesh`` (``protoc -I protos`` maps
``costmesh/<svc>/v1/<svc>.proto`` to ``costmesh/<svc>/v1/<svc>_pb2.py``), so generated imports resolve without
edits. Both ``.pyi`` stubs come from mypy-protobuf (stricter than protoc's own ``--pyi_out``: typed enums, no
bare generics).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    # mypy-protobuf's plugin is a console script beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory on the way down is a regular package.
    for proto in files:
        pkg = out / Path(proto).parent
        while pkg != out:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent


def _generated(tree: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(tree)): p
        for p in tree.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES) and "/v1/" in str(p.relative_to(tree)) + "/"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="diff instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        fresh = _generated(out)
        committed = _generated(ROOT)
        committed = {k: v for k, v in committed.items() if k.startswith("costmesh/")}
        if args.check:
            drift = sorted(set(fresh) ^ set(committed))
            drift += sorted(k for k in set(fresh) & set(committed) if not filecmp.cmp(fresh[k], committed[k], False))
            if drift:
                print("generated stubs are out of date; run `make protos`:", *drift, sep="\n  ")
                return 1
            print(f"{len(fresh)} generated files match protos/")
            return 0
        for stale in set(committed) - set(fresh):
            committed[stale].unlink()
        for rel, src in fresh.items():
            dst = ROOT / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            init = dst.parent
            while init != ROOT:
                (init / "__init__.py").touch(exist_ok=True)
                init = init.parent
        print(f"wrote {len(fresh)} files under costmesh/")
        return 0


if __name__ == "__main__":
    sys.exit(main())
