"""The benchmark harness's own logic (no compile): interleaved rounds, errors reported."""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Variant, run_case


def test_variants_are_timed_in_interleaved_rounds_and_errors_are_reported():
    calls: list[str] = []

    def variant(name):
        def build(inp):
            def step():
                calls.append(name)
                return inp["x"] + 1

            return step

        return Variant(name, build)

    def broken(inp):
        raise ValueError("cannot build")

    case = Case("toy", "toy case", lambda device: {"x": torch.ones(3)},
                [variant("eager"), variant("inductor"), Variant("bad", broken), variant("ger")])
    res = {r.variant: r for r in run_case(case, torch.device("cpu"), warmup=1, repeat=4, allocator="default",
                                          log=lambda s: None, rounds=2)}
    assert res["bad"].error == "ValueError: cannot build" and res["bad"].repeat == 0
    assert [res[n].repeat for n in ("eager", "inductor", "ger")] == [4, 4, 4]
    assert res["inductor"].ratio_to_baseline == 1.0
    # warm-ups (one each), then round 0 in order and round 1 rotated by one, two calls
    # each, then one call each for the peak and one for the output check
    timed = calls[3:3 + 12]
    assert timed == ["eager"] * 2 + ["inductor"] * 2 + ["ger"] * 2 + ["inductor"] * 2 + ["ger"] * 2 + ["eager"] * 2
