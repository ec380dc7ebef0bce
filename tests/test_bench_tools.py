"""tools/bench_experts.py --isas (the expert kernels under several instruction sets, side by side): the
rounds' best per figure and the ratios to the first set, with a stand-in for the per-ISA subprocess
(the real one runs the whole benchmark, minutes); names the CPU cannot run are refused up front.
Run: pytest tests/test_bench_tools.py (a second).
"""
import argparse

import pytest

from cpu_kernels import isa
from tools import bench_experts


def _args(isas, rounds=2):
    return argparse.Namespace(isas=isas, isa_rounds=rounds, threads=2, act_format="int8", quick=True,
                              prefill_experts=None, json=False)


def test_compare_isas_best_of_rounds_and_ratios():
    calls = []
    figures = {("generic512", 0): 10.0, ("generic512", 1): 12.0, ("generic", 0): 6.0, ("generic", 1): 5.0}

    def fake(name, argv):
        r = sum(1 for n, _ in calls if n == name)
        calls.append((name, argv))
        return {"isa": name, "decode_gbs": figures[name, r], "prefill_512_gflops": 2 * figures[name, r]}

    res = bench_experts.compare_isas(_args("generic, generic512"), say=lambda *a: None, run_one=fake)
    assert [n for n, _ in calls] == ["generic", "generic512", "generic", "generic512"]     # alternating
    assert "--quick" in calls[0][1] and calls[0][1][calls[0][1].index("--threads") + 1] == "2"
    assert res["isa_compare"]["generic"]["decode_gbs"] == 6.0
    assert res["isa_compare"]["generic512"]["prefill_512_gflops"] == 24.0
    assert res["generic512_vs_generic_decode_gbs"] == pytest.approx(12.0 / 6.0)


def test_compare_isas_refuses_what_the_cpu_lacks():
    with pytest.raises(ValueError, match="unknown"):
        bench_experts.compare_isas(_args("sse9,generic"), run_one=lambda n, a: {})
    lacking = [n for n in isa.ISAS if isa.missing(n)]
    if not lacking:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(SystemExit, match="lacks"):
        bench_experts.compare_isas(_args(f"generic,{lacking[0]}"), run_one=lambda n, a: {})
