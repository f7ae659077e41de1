"""The package as users get it: the wheel holds `dbrx_fast` only (the Triton sources in kernels/ ship as
`dbrx_fast.kernels`, never as a top-level `kernels` that would shadow Hugging Face's `kernels` package), and importing
it neither hides that package nor asks CUDA anything.

Each check runs in a fresh Python process: the import-time behaviour is the subject, and this pytest process has
long since imported everything.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> dict:
    """Run `code` in a fresh interpreter (the real compiler path, no TRITON_INTERPRET) and return the JSON it
    prints last."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _source_modules() -> set[str]:
    """Every module the wheel must carry, by its path in the wheel, from the source tree's layout."""
    ours = {f"dbrx_fast/{p.relative_to(REPO / 'dbrx_fast').as_posix()}" for p in (REPO / "dbrx_fast").rglob("*.py")}
    ours |= {
        f"dbrx_fast/kernels/{p.relative_to(REPO / 'kernels').as_posix()}" for p in (REPO / "kernels").rglob("*.py")
    }
    return {name for name in ours if "__pycache__" not in name}


def test_wheel_holds_only_dbrx_fast(tmp_path):
    # Built from a copy: an in-tree build leaves build/ and egg-info behind in the checkout.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv")
    shutil.copytree(REPO, src, ignore=skip)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("dbrx_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = wheel.name.split("-py")[0] + ".dist-info/"

    strays = [n for n in names if not n.startswith(("dbrx_fast/", dist_info))]
    assert strays == [], f"files outside dbrx_fast/ and {dist_info}: {strays}"
    assert "dbrx_fast/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels/ would shadow HF's kernels"
    missing = sorted(_source_modules() - set(names))
    assert missing == [], f"source modules left out of the wheel (a package missing from pyproject?): {missing}"
    top_level = zipfile.ZipFile(wheel).read(dist_info + "top_level.txt").decode().split()
    assert top_level == ["dbrx_fast"], top_level


def test_hugging_face_kernels_package_is_not_shadowed(tmp_path):
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text('__version__ = "0.11.0"\n')
    (fake / "kernels-0.11.0.dist-info").mkdir()
    (fake / "kernels-0.11.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kernels\nVersion: 0.11.0\n"
    )
    neutral = tmp_path / "cwd"  # not the repo root, where kernels/ would be importable as a top-level package
    neutral.mkdir()
    seen = _python(
        """
        import importlib.metadata, json
        import dbrx_fast, dbrx_fast.kernels, transformers, kernels
        print(json.dumps({"hf": kernels.__file__, "hf_version": importlib.metadata.version("kernels"),
                          "ours": dbrx_fast.kernels.__file__}))
        """,
        cwd=neutral,
        PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
    )
    assert Path(seen["hf"]) == fake / "kernels" / "__init__.py", seen
    assert seen["hf_version"] == "0.11.0", seen
    ours = Path(seen["ours"])
    assert fake not in ours.parents and (ours.parent / "compile_spec.py").is_file(), seen
    assert ours.read_text() == (REPO / "kernels" / "__init__.py").read_text(), f"{ours} is not this checkout's"


def test_import_makes_no_cuda_query(tmp_path):
    # Every torch.cuda entry point that asks the driver or initialises CUDA records its name and raises; each module
    # of the package is then imported. Finally one query is made on purpose, to show the trap springs.
    seen = _python(
        """
        import importlib, json, pkgutil
        import torch

        calls = []

        def trap(name):
            def query(*args, **kwargs):
                calls.append(name)
                raise RuntimeError(f"CUDA queried at import: torch.cuda.{name}")
            return query

        for name in ("is_available", "device_count", "get_device_properties", "get_device_capability",
                     "get_device_name", "current_device", "set_device", "init", "_lazy_init", "mem_get_info",
                     "synchronize"):
            setattr(torch.cuda, name, trap(name))
        for name in ("_cuda_getDeviceCount", "_cuda_init"):
            if hasattr(torch._C, name):  # absent from CPU builds, and torch.cuda._is_compiled() checks for it
                setattr(torch._C, name, trap("torch._C." + name))

        import dbrx_fast
        import dbrx_fast.kernels

        modules = []
        for package in (dbrx_fast, dbrx_fast.kernels):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
                modules.append(info.name)
        at_import = list(calls)
        try:
            torch.cuda.is_available()
        except RuntimeError:
            pass
        print(json.dumps({"at_import": at_import, "after": calls, "modules": modules}))
        """,
        cwd=tmp_path,
    )
    assert seen["at_import"] == [], f"CUDA queried while importing dbrx_fast: {seen['at_import']}"
    assert seen["after"] == ["is_available"], seen  # the trap works
    assert "dbrx_fast.kernels.registry" in seen["modules"] and "dbrx_fast.patch" in seen["modules"], seen["modules"]


def test_unsupported_triton_is_refused_at_kernel_import(tmp_path):
    # Triton's version is monkeypatched before the kernels are imported; the check reads it at import.
    seen = _python(
        """
        import json
        import sys

        import triton

        found = {}
        for version in ("3.6.0", "3.10.0", "3.5.1"):
            triton.__version__ = version
            for name in [m for m in sys.modules if m.startswith("dbrx_fast")]:
                del sys.modules[name]
            try:
                import dbrx_fast.kernels
                found[version] = None
            except ImportError as exc:
                found[version] = str(exc)
        # The package itself still imports (patch with backend="torch" needs no kernels); the last one refused.
        import dbrx_fast

        found["package"] = "dbrx_fast.kernels" not in sys.modules and hasattr(dbrx_fast, "patch")
        print(json.dumps(found))
        """,
        cwd=tmp_path,
    )
    assert seen["3.6.0"] is None and seen["3.10.0"] is None, seen
    assert "needs Triton >= 3.6, found 3.5.1" in seen["3.5.1"], seen
    assert "backend='torch'" in seen["3.5.1"] and seen["package"], seen


def test_backend_names_the_kernels_dtypes():
    # dbrx_fast.backend repeats kernels/dtypes.py's dtypes, since it must import without the kernels: they agree.
    from dbrx_fast import backend
    from dbrx_fast.kernels import dtypes

    assert set(backend.TRITON_DTYPES) == set(dtypes.TRITON_DTYPES)
