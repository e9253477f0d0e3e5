"""bench/inference.py's pure helpers: the (T, P) points it measures, the tbf rate it gives
the planner, and how it judges the issue's goals from medians (the benchmark itself needs
root and a dev cluster: it is run by hand, see its docstring)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_inference", Path(__file__).resolve().parent.parent / "bench" / "inference.py")
assert SPEC is not None and SPEC.loader is not None  # a .py file always has both
bench = importlib.util.module_from_spec(SPEC)
sys.modules["bench_inference"] = bench
SPEC.loader.exec_module(bench)


def test_points_keep_the_context_and_the_fractions() -> None:
    assert bench.points(2400) == [(2400, 0), (600, 1800), (120, 2280), (24, 2376)]
    # a fraction too small for the context still gets one new token
    assert bench.points(50, (0.01,)) == [(1, 49)]


@pytest.mark.parametrize(("context", "fractions"), [(0, (1.0,)), (True, (1.0,)), (100, (0.0,)), (100, (1.5,))])
def test_points_refuse_bad_sizes(context: object, fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        bench.points(context, fractions)


def test_rate_is_the_tbf_rate_in_GBps() -> None:
    assert bench.rate_GBps("100mbit") == pytest.approx(0.0125)
    assert bench.rate_GBps("1gbit") == pytest.approx(0.125)
    for bad in ("100", "fastmbit", "0mbit", "-5mbit"):
        with pytest.raises(ValueError, match="--inter"):
            bench.rate_GBps(bad)


def _row(fraction: float, kv: float, q: float, auto: float, pred_kv: float, pred_q: float) -> dict[str, object]:
    return {"fraction": fraction, "measured": {"pass_kv": kv, "pass_q": q, "auto": auto},
            "predicted": {"pass_kv": pred_kv, "pass_q": pred_q}}  # fmt: skip


def test_goals_met_and_missed() -> None:
    met = bench.goals([_row(1.0, 0.4, 1.6, 0.42, 0.45, 1.5), _row(0.01, 0.4, 0.08, 0.085, 0.38, 0.09)])
    assert [held for _, held in met.values()] == [True] * 4
    assert met["pass_q/pass_kv at 0.01 <= 0.25"][0] == pytest.approx(0.2)
    assert met["pass_kv/pass_q at 1 <= 1"][0] == pytest.approx(0.25)
    missed = bench.goals([_row(1.0, 1.0, 0.9, 1.0, 1.0, 0.9), _row(0.01, 0.4, 0.2, 0.3, 0.4, 0.1)])
    assert [held for _, held in missed.values()] == [False] * 4
    # auto 0.3 s where pass_q took 0.2: 1.5x the faster; pass_q predicted 0.1 for 0.2 measured
    assert missed["auto/fastest <= 1.10 (worst point)"][0] == pytest.approx(1.5)
    assert missed["prediction error within +-25% (worst)"][0] == pytest.approx(-0.5)
