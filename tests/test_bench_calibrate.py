"""bench/calibrate.py writes its figures into a topology YAML without touching anything else
(the comments stay; inter's bandwidth stays the fabric's tbf rate), and the result composes."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from ringctl.config import CONF_DIR
from ringctl.topology import Topology

SPEC = importlib.util.spec_from_file_location("calibrate", Path(__file__).resolve().parent.parent / "bench" / "calibrate.py")
assert SPEC is not None and SPEC.loader is not None  # a .py file always has both
calibrate = importlib.util.module_from_spec(SPEC)
sys.modules["calibrate"] = calibrate  # dataclasses look their module up there
SPEC.loader.exec_module(calibrate)

RESULT = {
    "ring": {"compute_tflops": 0.0123},
    "compute": {"compute_tflops": 0.02},
    "intra": {"bandwidth_GBps": 0.987, "latency_us": 321.0},
    "inter": {"bandwidth_GBps": 0.011, "latency_us": 654.0},
}


@pytest.mark.parametrize("name", ["emulated2node", "emulated2node_rails", "emulated3node"])
def test_write_config_sets_the_measured_fields_only(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    shutil.copy(CONF_DIR / "topology" / f"{name}.yaml", path)
    before = yaml.safe_load(path.read_text())
    calibrate.write_config(path, RESULT)
    after = yaml.safe_load(path.read_text())
    assert after["compute_tflops"] == pytest.approx(0.0123)
    # measured: intra bandwidth and latency, inter latency (the inter rate is the fabric's tbf);
    # the link kind (`links`) is declared, not measured
    assert after["intra"] == {**before["intra"], "bandwidth_GBps": pytest.approx(0.987), "latency_us": 321}
    assert after["inter"] == {**before["inter"], "latency_us": 654}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"compute_tflops", "intra", "inter"}
    lines = path.read_text().splitlines()
    assert len(lines) == len((CONF_DIR / "topology" / f"{name}.yaml").read_text().splitlines())
    assert all("#" in line for line in lines if "GBps" in line or "latency_us" in line or "tflops" in line)
    topo = Topology.from_config({k: v for k, v in after.items() if k != "defaults"})
    assert topo.compute_tflops == pytest.approx(0.0123) and topo.intra.latency_us == 321


def test_write_config_refuses_a_file_without_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\nnodes: 2\n")
    with pytest.raises(ValueError, match="compute_tflops"):
        calibrate.write_config(path, RESULT)
    assert path.read_text() == "name: plain\nnodes: 2\n"
