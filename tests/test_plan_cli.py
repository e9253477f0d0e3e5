"""`ringctl plan` as users run it: a subprocess with Hydra overrides, its JSON, table, PNG,
exit codes and one-line errors; no torch import, nothing written but the PNG asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ringctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ringctl", "plan", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
    )


def test_json_2node_cyclic(tmp_path: Path) -> None:
    out = ringctl("+topology=2node", "topology.distribution=cyclic", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("world_size", "nodes", "ring", "ring_order", "cross_node_hops", "baseline_cross_node_hops",
                "bytes_per_step", "predicted_step_time_s", "predicted_total_time_s", "overlap_ok"):
        assert key in data, key
    assert data["world_size"] == 16 and data["nodes"] == 2 and data["ring"] == "hierarchical"
    assert data["ring_order"] == list(range(0, 16, 2)) + list(range(1, 16, 2))
    assert data["cross_node_hops"] == 2 and data["baseline_cross_node_hops"] == 16
    assert set(data["bytes_per_step"]) == {"intra", "inter"}
    assert isinstance(data["overlap_ok"], bool)
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra/, no logs


def test_overrides_reach_the_plan(tmp_path: Path) -> None:
    out = ringctl("+topology=4node", "topology.ring=flat", "topology.ranks_per_node=2", "workload.seq_len=4096",
                  "workload.layout=contiguous", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ring"] == "flat" and data["world_size"] == 8 and data["layout"] == "contiguous"
    assert data["block_tokens"] == 4096 // 8


def test_uneven_flat(tmp_path: Path) -> None:
    out = ringctl("+topology=2node", "topology.ranks_per_node=[3,2]", "topology.ring=flat",
                  "workload.seq_len=40", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ranks_per_node"] == [3, 2] and data["cross_node_hops"] == 2


def test_table_and_png(tmp_path: Path) -> None:
    png = tmp_path / "ring.png"
    out = ringctl("+topology=2node", "topology.distribution=cyclic", "--png", str(png), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("cross-node hops", "rank-order ring", "bytes / step", "overlap", "hierarchical"):
        assert text in out.stdout, text
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    from matplotlib.image import imread

    image = imread(str(png))
    assert image.shape[0] > 400 and image.shape[1] > 400
    # both link colours are drawn (red cross-node hops, blue intra-node hops)
    red = ((image[..., 0] > 0.75) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)).sum()
    blue = ((image[..., 2] > 0.6) & (image[..., 0] < 0.3)).sum()
    assert red > 50 and blue > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.png"]


def test_no_torch_import(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from ringctl.cli import main\n"
        f"rc = main(['plan', '+topology=4node', '--json', '--png', {str(tmp_path / 'p.png')!r}])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH []"


@pytest.mark.parametrize(
    "args, key",
    [
        (["topology.nodes=0"], "topology.nodes"),
        (["topology.inter.bandwidth_GBps=0"], "topology.inter.bandwidth_GBps"),
        (["topology.ring=double"], "topology.ring"),
        (["topology.distribution=plane"], "topology.distribution"),
        (["topology.ranks_per_node=[3,2]"], "topology.ring"),  # uneven nodes: hierarchical -> flat
        (["workload.seq_len=1000"], "workload.seq_len"),
        (["topology.nodes=1024", "workload.seq_len=2048"], "workload.seq_len"),  # world too big for it
        (["workload.layout=spiral"], "workload.layout"),
        (["topology.nodes=two"], "topology.nodes"),
        (["--frob"], "option"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], key: str) -> None:
    out = ringctl("+topology=2node", *args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"ringctl plan: {key}=") and "allowed:" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_unknown_topology(tmp_path: Path) -> None:
    out = ringctl("+topology=nope", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "ringctl plan: topology='nope' is invalid; allowed: 16node, 1node, 2node, 4node, "
        "emulated2node, emulated2node_rails, emulated3node, emulated3node_mesh"
    )


def test_table_writes_default_png(tmp_path: Path) -> None:
    out = ringctl("+topology=2node", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ringplan-2node.png"]
    assert (tmp_path / "ringplan-2node.png").read_bytes().startswith(PNG_MAGIC)
    assert "ringplan-2node.png" in out.stdout


def test_table_shows_packed_documents(tmp_path: Path) -> None:
    """With workload.documents the report says how many documents, the per-rank work
    imbalance under this layout and the others, and the docs layout's padding: the same
    figures as the JSON's `documents`."""
    args = ["+topology=2node", "workload.layout=docs", "workload.documents=[300,1,2000,700]", "workload.seq_len=4000"]
    out = ringctl(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    work = json.loads(ringctl(*args, "--json", cwd=tmp_path).stdout)["documents"]
    text = " ".join(out.stdout.split())
    assert "4 documents, 3,001 tokens" in text, text
    assert f"per-rank work max/mean {work['imbalance']:.3f} under docs" in text, text
    assert f"zigzag {work['imbalance_by_layout']['zigzag']:.3f}" in text, text
    assert f"docs padding {work['layout_padding_tokens']} tokens" in text, text
