"""The package an embedder installs: the wheel's contents, its extras, and ``frctl conform``
from an installed wheel, outside the source tree (docs/packaging.md).

The wheel is built once per run (``pip wheel``, about 3 s) and installed into a fresh venv
with the lower bound of the Construct range, where the golden message vectors must still
round-trip: the range in pyproject.toml is proven at both ends (the dev environment runs
the newest release through tests/frproto/test_vectors.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from frconform.resources import VECTOR_KINDS, protocol_document, vectors

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: The top-level import names the wheel installs. ``node`` and ``broker`` are generic: the
#: move under ``frrep.`` is planned in docs/packaging.md ("Import names"); until it is done
#: this list keeps any other top-level name from creeping in.
TOP_LEVEL = {
    "broker",
    "frcluster",
    "frconform",
    "frconsole",
    "frctl",
    "frlink",
    "frproto",
    "frtesting",
    "node",
}

#: What a fresh venv gets besides the wheel: the lower bound of the Construct range.
CONSTRUCT_FLOOR = "construct==2.10.68"


# -- In the tree (fast) ---------------------------------------------------------------------


def test_the_package_data_links_to_the_documents_of_record() -> None:
    data = ROOT / "frconform" / "data"
    assert (data / "protocol.md").is_symlink()
    assert (data / "protocol.md").resolve() == ROOT / "docs" / "protocol.md"
    for kind in VECTOR_KINDS:
        link = data / "vectors" / kind
        assert link.is_symlink(), link
        assert link.resolve() == ROOT / "tests" / "vectors" / kind


def test_the_harness_reads_the_repository_files() -> None:
    assert protocol_document().read_bytes() == (ROOT / "docs" / "protocol.md").read_bytes()
    for kind in VECTOR_KINDS:
        shipped = {f.name: f.read_bytes() for f in vectors(kind).iterdir()}
        tree = {p.name: p.read_bytes() for p in (ROOT / "tests" / "vectors" / kind).iterdir()}
        assert shipped == tree, kind


def test_the_construct_requirement_is_a_range_and_nothing_runtime_is_pinned() -> None:
    deps: list[str] = PYPROJECT["project"]["dependencies"]
    construct = next(d for d in deps if d.startswith("construct"))
    assert construct == f"construct>={CONSTRUCT_FLOOR.split('==')[1]},<2.11"
    assert not [d for d in deps if "==" in d]


def test_httpx_comes_only_with_the_etcd_extra() -> None:
    extras: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
    assert not [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("httpx")]
    assert [d for d in extras["etcd"] if d.startswith("httpx")]
    # The dev extra keeps everything: the etcd store's tests run in it.
    assert set(extras["etcd"]) <= set(extras["dev"])


def test_the_changelog_keeps_a_changelog() -> None:
    headings = re.findall(r"(?m)^## (.*)$", (ROOT / "CHANGELOG.md").read_text())
    assert headings[0] == "[Unreleased]"
    for heading in headings[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", heading), heading
    assert f"[{PYPROJECT['project']['version']}]" in headings[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


#: The public library modules an embedder imports (docs/packaging.md).
PUBLIC_LIBRARIES = ("frproto", "frproto.trio_io", "broker.admin", "node.primary.operations")


def test_the_libraries_import_nothing_of_the_cli_and_etcd_extras() -> None:
    extras: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
    optional = {
        re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in extras["cli"] + extras["etcd"]
    }
    result = _python(
        "import importlib.metadata as m, json, sys\n"
        f"import {', '.join(PUBLIC_LIBRARIES)}\n"
        "dists = m.packages_distributions()\n"
        "print(json.dumps(sorted({d.lower() for name in list(sys.modules)\n"
        "    for d in dists.get(name.split('.')[0], [])})))\n"
    )
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout))
    assert "httpx" in optional
    assert imported & optional == set()


def test_the_cluster_store_imports_without_httpx() -> None:
    result = _python(
        "import sys\n"
        "sys.modules['httpx'] = None  # as if the etcd extra were not installed\n"
        "import broker.store, frcluster.agent\n"
        "assert 'broker.store.etcd' not in sys.modules\n"
        "broker.store.open_store('sqlite:///tmp/never-opened.db')\n"
        "try:\n"
        "    broker.store.open_store('etcd://127.0.0.1:2379')\n"
        "except broker.store.MissingBackend as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'frrep[etcd]'" in result.stdout


def test_without_httpx_a_node_config_naming_etcd_is_refused_with_the_extra(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "n1.example.com"\nlisten = "127.0.0.11"\nstorage = "s"\n'
        '[cluster]\nstore = "etcd://127.0.0.1:2379"\ncap_name = "cap.example.com"\n'
        '[tls]\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n'
    )
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "sys.modules['httpx'] = None\n"
        "from frcluster.config import load_cluster_node_config\n"
        "from frlink.config import ConfigError\n"
        "try:\n"
        f"    load_cluster_node_config(Path({str(config)!r}))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    refused = _python(code)
    assert refused.returncode == 0, refused.stderr
    assert "[cluster]: 'store'" in refused.stdout
    assert "pip install 'frrep[etcd]'" in refused.stdout
    # With httpx the same file loads.
    accepted = _python(code.replace("sys.modules['httpx'] = None\n", ""))
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == ""


def test_etcd_store_is_still_a_name_of_the_store_package() -> None:
    from broker.store import EtcdStore
    from broker.store.etcd import EtcdStore as Direct

    assert EtcdStore is Direct


# -- The wheel, installed (about 15 s) ------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and an egg-info where it builds, and a
    # stale build/lib would slip modules deleted since into later wheels. The links of
    # frconform/data are copied as links (they are relative), as a checkout has them.
    source = tmp_path_factory.mktemp("source") / "frrep"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info"),
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (found,) = out.glob("frrep-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel (no extras) and Construct's lower bound; its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel), CONSTRUCT_FLOOR],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH and a directory outside the tree: only what the wheel installed counts.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_wheel_carries_the_spec_and_vectors_byte_for_byte(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("frconform/data/protocol.md") == (ROOT / "docs/protocol.md").read_bytes()
        for kind in VECTOR_KINDS:
            for path in (ROOT / "tests" / "vectors" / kind).glob("*.json"):
                assert z.read(f"frconform/data/vectors/{kind}/{path.name}") == path.read_bytes()
        metadata = z.read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n} == TOP_LEVEL
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: etcd" in metadata
    assert not {"tests", "bench", "fuzz", "scripts", "examples"} & {n.split("/")[0] for n in names}


def test_frctl_conform_works_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    helped = _run(installed, "frctl", "conform", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--junit" in helped.stdout
    listed = _run(installed, "frctl", "conform", "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) >= 80
    assert any(line.startswith("NEG-3 ") for line in lines)
    cases = _run(
        installed,
        "python",
        "-c",
        "import frconform.scenarios.malformed as m, frconform, sys; "
        "print(len(list(m.load_cases())), frconform.__file__)",
        cwd=tmp_path,
    )
    assert cases.returncode == 0, cases.stderr
    count, where = cases.stdout.split()
    assert int(count) > 40
    assert not Path(where).is_relative_to(ROOT)  # the installed copy, not the tree's
    # The specification as published: the document and its vectors, from the wheel.
    exported = _run(installed, "frctl", "conform", "--export-spec", "spec", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "spec/protocol.md").read_bytes() == (ROOT / "docs/protocol.md").read_bytes()
    for kind in VECTOR_KINDS:
        shipped = sorted(p.name for p in (tmp_path / "spec/vectors" / kind).glob("*.json"))
        assert shipped == sorted(p.name for p in (ROOT / "tests/vectors" / kind).glob("*.json"))


def test_the_installed_wheel_has_no_httpx_and_says_which_extra(
    installed: Path, tmp_path: Path
) -> None:
    result = _run(
        installed,
        "python",
        "-c",
        "import importlib.util, broker.store\n"
        "assert importlib.util.find_spec('httpx') is None\n"
        "import frproto, frproto.trio_io, broker.admin, node.primary.operations, frtesting\n"
        "try:\n"
        "    broker.store.open_store('etcd://127.0.0.1:2379')\n"
        "except broker.store.MissingBackend as exc:\n"
        "    print(exc)\n",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'frrep[etcd]'" in result.stdout


#: Run in the fresh venv: every golden message vector, shipped in the wheel, round-trips
#: through the installed frproto on Construct's lower bound.
_ROUND_TRIP = """
import json, sys
from importlib.metadata import version
from frconform.resources import vectors
from frproto.codec import decode_frame, encode_frame
from frproto.jsonable import message_from_dict, message_to_dict

count = 0
for path in sorted(vectors("messages").iterdir(), key=lambda p: p.name):
    for case in json.loads(path.read_text())["cases"]:
        frame = bytes.fromhex(case["hex"])
        assert message_to_dict(decode_frame(frame)) == case["fields"], (path.name, case["name"])
        assert bytes(encode_frame(message_from_dict(case["fields"]))) == frame, case["name"]
        count += 1
print(version("construct"), count)
"""


def test_the_golden_vectors_hold_on_constructs_lower_bound(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "python", "-c", _ROUND_TRIP, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    construct, count = result.stdout.split()
    assert construct == CONSTRUCT_FLOOR.split("==")[1]
    tree = sum(
        len(json.loads(p.read_text())["cases"])
        for p in (ROOT / "tests" / "vectors" / "messages").glob("*.json")
    )
    assert int(count) == tree
