"""Packaging: the torch pin of a build, the build record, the error without torch, the pure-Python
switch, OpenMP detection, and the ABI-mismatch message of the extension loader. (The wheel itself is
built and installed in a fresh venv by .ci/no_triton; too slow for the suite.)"""

import importlib.util
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from slsdeep_kernels import backend

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "setup.py"
pytestmark = pytest.mark.skipif(not SETUP.exists(), reason="needs the source tree (setup.py)")


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its helpers, without running setup() (that only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("slsdeep_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "version, pin",
    [
        ("2.13.0", "torch==2.13.*"),
        ("2.13.0+cpu", "torch==2.13.*"),
        ("2.13.1+cu128", "torch==2.13.*"),
        ("2.14.0.dev20260301+cu130", "torch==2.14.*"),
        ("2.6.0a0+git1234abc", "torch==2.6.*"),
        (None, "torch>=2.6"),  # SLSDEEP_KERNELS_NO_EXTENSION=1: no ABI to pin
    ],
)
def test_torch_pin_is_the_build_torch_minor(setup_py, version, pin):
    assert setup_py.torch_requirement(version) == pin


def test_the_pin_admits_the_torch_built_against(setup_py):
    specifiers = pytest.importorskip("packaging.specifiers")
    pin = setup_py.torch_requirement(torch.__version__)
    assert specifiers.SpecifierSet(pin.removeprefix("torch")).contains(torch.__version__, prereleases=True)


def test_build_record_round_trips(setup_py):
    namespace = {}
    exec(setup_py.build_info_source("2.13.0+cpu", ["_C", "_C_cuda"], True), namespace)
    assert namespace["TORCH_VERSION"] == "2.13.0+cpu"
    assert namespace["EXTENSIONS"] == ("_C", "_C_cuda")
    assert namespace["OPENMP"] is True


def _run_setup(*args, env=None, hide_torch=False):
    prelude = "import sys; sys.modules['torch'] = None; " if hide_torch else ""
    code = (
        f"{prelude}import sys; sys.argv = ['setup.py', *sys.argv[1:]]; "
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_without_torch_the_build_stops_with_one_line():
    done = _run_setup("--name", hide_torch=True, env={"SLSDEEP_KERNELS_NO_EXTENSION": "0"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "install torch first" in lines[0] and "--no-build-isolation" in lines[0]
    assert "SLSDEEP_KERNELS_NO_EXTENSION=1" in lines[0]


def _requirements(tmp_path, env):
    done = _run_setup("-q", "egg_info", "--egg-base", str(tmp_path), env=env)
    assert done.returncode == 0, done.stderr
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    return requires.read_text().split("\n\n")[0].split()  # the unconditional requirements


def test_metadata_pins_torch_and_leaves_triton_optional(tmp_path):
    requirements = _requirements(tmp_path, {"SLSDEEP_KERNELS_NO_EXTENSION": "0", "SLSDEEP_KERNELS_NO_CUDA": "1"})
    major, minor = torch.__version__.split(".")[:2]
    assert f"torch=={major}.{minor}.*" in requirements
    assert not any(r.startswith("triton") for r in requirements)
    assert {"numpy", "pillow", "tqdm", "matplotlib"} <= set(requirements)


def test_no_extension_switch_builds_a_pure_python_package_without_torch(tmp_path):
    done = _run_setup("-q", "egg_info", "--egg-base", str(tmp_path), env={"SLSDEEP_KERNELS_NO_EXTENSION": "1"}, hide_torch=True)
    assert done.returncode == 0, done.stderr
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    assert "torch>=2.6" in requires.read_text().split()


def test_a_failed_compile_fails_the_build_naming_the_pure_python_switch(tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho broken-c++: cannot compile >&2\nexit 1\n")
    broken.chmod(0o755)
    done = _run_setup(
        "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp"),
        env={"CXX": str(broken), "SLSDEEP_KERNELS_NO_EXTENSION": "0", "SLSDEEP_KERNELS_NO_CUDA": "1"},
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "compiling the extension failed" in last and "SLSDEEP_KERNELS_NO_EXTENSION=1" in last, done.stderr
    assert not list(tmp_path.glob("lib/**/*.so"))


def test_openmp_is_used_only_where_the_compiler_links_it(setup_py, tmp_path):
    compile_flags, link_flags, notice = setup_py.openmp_flags(["false"])  # a compiler that fails everything
    assert (compile_flags, link_flags) == ([], []) and "OpenMP: no" in notice
    # A compiler without OpenMP support: g++ that rejects -fopenmp (but not -fopenmp-simd).
    cxx = os.environ.get("CXX", "c++")
    fake = tmp_path / "no-openmp-c++"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cxx} "$@"\n')
    fake.chmod(0o755)
    compile_flags, link_flags, notice = setup_py.openmp_flags([str(fake)])
    assert "-fopenmp" not in compile_flags and link_flags == [] and "one thread" in notice
    if setup_py._compiles([cxx], ["-fopenmp"], setup_py._OPENMP_PROBE, link=True):
        assert setup_py.openmp_flags([cxx])[:2] == (["-fopenmp"], ["-fopenmp"])


def test_cpu_loop_flags_are_the_ones_the_compiler_accepts(setup_py, tmp_path):
    assert setup_py.cpu_loop_flags(["false"]) == []
    cxx = os.environ.get("CXX", "c++")
    rejecting = tmp_path / "no-jam-flag-c++"  # a compiler that warns about the flag, as clang does
    rejecting.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fno-loop-unroll-and-jam ] && exit 1; done\nexec {cxx} "$@"\n')
    rejecting.chmod(0o755)
    assert setup_py.cpu_loop_flags([str(rejecting)]) == []
    if "Free Software Foundation" in subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout:  # GCC
        assert setup_py.cpu_loop_flags([cxx]) == setup_py.CPU_LOOP_FLAGS


def _other_minor():
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"{major}.{int(minor) + 1}.0+cpu"


def test_abi_mismatch_is_one_line_naming_both_torch_versions(monkeypatch):
    built = _other_minor()
    record = types.SimpleNamespace(TORCH_VERSION=built, EXTENSIONS=("_C",), OPENMP=True)
    monkeypatch.setattr(backend, "_build_info", lambda: record)
    with pytest.warns(RuntimeWarning, match="falls? back to the reference") as caught:
        reason = backend._load_extension("slsdeep_kernels._no_such_extension")
    # Not even tried (the import would have said ModuleNotFoundError): another minor's ABI.
    assert reason == f"ABI mismatch: built against torch {built}, running torch {torch.__version__}"
    (message,) = [str(w.message) for w in caught]
    assert "\n" not in message and built in message and torch.__version__ in message


def test_a_failed_load_names_both_versions_when_they_differ(monkeypatch):
    major, minor = torch.__version__.split(".")[:2]
    built = f"{major}.{minor}.99"
    monkeypatch.setattr(backend, "_build_info", lambda: types.SimpleNamespace(TORCH_VERSION=built, EXTENSIONS=("_C",)))
    with pytest.warns(RuntimeWarning, match="falls? back to the reference"):
        reason = backend._load_extension("slsdeep_kernels._no_such_extension")
    assert reason.startswith(f"built against torch {built}, running torch {torch.__version__}; ModuleNotFoundError")


def test_pure_python_build_has_no_extension_and_does_not_warn(monkeypatch):
    record = types.SimpleNamespace(TORCH_VERSION=None, EXTENSIONS=(), OPENMP=None)
    monkeypatch.setattr(backend, "_build_info", lambda: record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = backend._load_extension("slsdeep_kernels._no_such_extension")
    assert "SLSDEEP_KERNELS_NO_EXTENSION=1" in reason
    monkeypatch.setattr(backend, "cpu_extension_error", lambda: reason)
    assert backend.resolve("op", torch.device("cpu"), torch.float32) == "reference"
    with pytest.raises(RuntimeError, match="SLSDEEP_KERNELS_NO_EXTENSION"):
        backend.resolve("op", torch.device("cpu"), torch.float32, "cpu")
