"""bench/calibrate.py writes its figures into a topology YAML without touching anything else
(the comments stay; inter's bandwidth stays the fabric's tbf rate; step_overhead_us,
memory_bandwidth_GBps and the inter port efficiency get a line when the file has none, once),
and the result composes."""

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
    "compute": {"compute_tflops": 0.02, "step_overhead_us": 1234.5, "memory_bandwidth_GBps": 4.567},
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
    assert after["step_overhead_us"] == pytest.approx(1234.5, rel=1e-3)
    # measured: intra bandwidth and latency, inter latency (the inter rate is the fabric's tbf);
    # the link kind (`links`) is declared, not measured
    assert after["intra"] == {**before["intra"], "bandwidth_GBps": pytest.approx(0.987), "latency_us": 321}
    assert after["inter"] == {**before["inter"], "latency_us": 654}
    assert after["memory_bandwidth_GBps"] == pytest.approx(4.567)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"compute_tflops", "step_overhead_us", "memory_bandwidth_GBps", "intra", "inter"}
    lines = path.read_text().splitlines()
    # a line of its own after compute_tflops, and memory_bandwidth_GBps after it
    added = ("step_overhead_us" not in before) + ("memory_bandwidth_GBps" not in before)
    assert len(lines) == len((CONF_DIR / "topology" / f"{name}.yaml").read_text().splitlines()) + added
    keys = [line.split(":")[0] for line in lines]
    assert lines[keys.index("compute_tflops") + 1].startswith("step_overhead_us: 1234 ")
    assert lines[keys.index("step_overhead_us") + 1].startswith("memory_bandwidth_GBps: 4.567 ")
    assert all("#" in line for line in lines if "GBps" in line or "latency_us" in line or "tflops" in line)
    topo = Topology.from_config({k: v for k, v in after.items() if k != "defaults"})
    assert topo.compute_tflops == pytest.approx(0.0123) and topo.intra.latency_us == 321
    assert topo.step_overhead_us == pytest.approx(1234.5, rel=1e-3) and topo.memory_bandwidth_GBps == pytest.approx(4.567)
    calibrate.write_config(path, RESULT)  # again: the same file (no second line)
    assert path.read_text().splitlines() == lines
    # not measurable (noise): null replaces the figure, the plan prices blocks by FLOPs alone
    calibrate.write_config(path, {**RESULT, "compute": {**RESULT["compute"], "memory_bandwidth_GBps": None}})
    nulled = path.read_text().splitlines()
    assert len(nulled) == len(lines) and nulled[keys.index("memory_bandwidth_GBps")].startswith("memory_bandwidth_GBps: null ")
    reread = yaml.safe_load(path.read_text())
    assert Topology.from_config({k: v for k, v in reread.items() if k != "defaults"}).memory_bandwidth_GBps is None


def test_write_config_sets_the_inter_port_efficiency_when_measured(tmp_path: Path) -> None:
    path = tmp_path / "emulated3node.yaml"
    shutil.copy(CONF_DIR / "topology" / "emulated3node.yaml", path)
    before = yaml.safe_load(path.read_text())
    for efficiency in (0.7234, 0.5):  # added under inter once, then replaced
        calibrate.write_config(path, {**RESULT, "inter_shared_port": {"efficiency": efficiency}})
        after = yaml.safe_load(path.read_text())
        assert after["inter"] == {**before["inter"], "latency_us": 654, "shared_port_efficiency": pytest.approx(efficiency, abs=5e-4)}
        assert after["intra"]["bandwidth_GBps"] == pytest.approx(0.987)
        assert path.read_text().count("shared_port_efficiency") == 1 + ("shared_port_efficiency" in before["intra"])
    topo = Topology.from_config({k: v for k, v in after.items() if k != "defaults"})
    assert topo.inter.shared_port_efficiency == 0.5 and topo.intra.shared_port_efficiency == before["intra"].get(
        "shared_port_efficiency", 1.0
    )


def test_write_config_refuses_a_file_without_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\nnodes: 2\n")
    with pytest.raises(ValueError, match="compute_tflops"):
        calibrate.write_config(path, RESULT)
    assert path.read_text() == "name: plain\nnodes: 2\n"
