"""The built wheel installs one import namespace: `tuneloop.serving` comes from serving/ and so on, nothing named
`serving`, `monitor`, `retrain`, `evaluators` or `challenger_sets` lands in site-packages, and another distribution
that does provide a top-level `monitor` (and `serving`) installs beside it without either shadowing the other."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBSYSTEMS = ("serving", "evaluators", "challenger_sets", "monitor", "retrain")

pytestmark = [pytest.mark.integration]


def _pip(python: Path, *args: str, cwd: Path) -> None:
    done = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _other_distribution(root: Path) -> Path:
    """A distribution with top-level `monitor` and `serving` packages, as any other project might have."""
    for name in ("monitor", "serving"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"WHO = 'other-{name}'\n")
    (root / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "other-monitoring"
        version = "1.0"

        [tool.setuptools]
        packages = ["monitor", "serving"]
        """))
    return root


def test_the_wheel_installs_under_one_namespace_beside_a_distribution_with_a_top_level_monitor(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _pip(Path(sys.executable), "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO),
         str(_other_distribution(tmp_path / "other")), cwd=tmp_path)
    [ours] = wheels.glob("tuneloop-*.whl")
    [theirs] = wheels.glob("other_monitoring-*.whl")
    top = {name.split("/", 1)[0] for name in zipfile.ZipFile(ours).namelist()}
    assert top == {"tuneloop", f"{ours.name.split('-')[0]}-{ours.name.split('-')[1]}.dist-info"}, top
    names = set(zipfile.ZipFile(ours).namelist())
    for expected in ("tuneloop/serving/gateway.py", "tuneloop/monitor/ops/rules.py", "tuneloop/retrain/worker.py",
                     "tuneloop/conductor/loop.py", "tuneloop/migrations/versions/0007_typed_job_records.py",
                     "tuneloop/migrations/env.py"):
        assert expected in names, expected

    # A fresh venv: the two wheels, and this venv's third-party packages as a plain path (its .pth files, the
    # editable install's finder among them, are not processed there), so only the wheel can provide `tuneloop`.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _pip(python, "install", "--no-deps", "--no-index", str(ours), str(theirs), cwd=tmp_path)
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = {p.name for p in fresh_site.iterdir()}
    assert {"monitor", "serving"} <= installed and not {"retrain", "evaluators", "challenger_sets"} & installed

    probe = textwrap.dedent("""\
        import importlib.metadata, json, monitor, serving
        import tuneloop.conductor.loop, tuneloop.monitor.policy, tuneloop.retrain.worker, tuneloop.serving.gateway
        plugin = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
                  if e.name == "tuneloop_lora_ops"][0]
        print(json.dumps({"theirs": [monitor.WHO, serving.WHO], "ours": tuneloop.monitor.policy.__file__,
                          "serving": tuneloop.serving.gateway.__file__, "plugin": plugin.value,
                          "plugin_loads": callable(plugin.load())}))
        """)
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["theirs"] == ["other-monitor", "other-serving"], "the other distribution's packages are intact"
    assert found["ours"].startswith(str(fresh_site / "tuneloop" / "monitor"))
    assert found["serving"].startswith(str(fresh_site / "tuneloop" / "serving"))
    assert found["plugin"] == "tuneloop.serving.vllm_plugin:register" and found["plugin_loads"]
    cli = subprocess.run([str(env_dir / "bin" / "tuneloop"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "retrain" in cli.stdout, cli.stderr[-2000:]
