"""Device profiles and strategies (with faked devices: no GPU needed), and the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import torch

from ger_inductor import fleet
from ger_inductor.fleet import PINNED_PROFILES, STRATEGIES, profile_for_device, strategy


def test_pinned_profiles_get_different_documented_strategies():
    h100, mi300x, cpu = PINNED_PROFILES["h100"], PINNED_PROFILES["mi300x"], PINNED_PROFILES["cpu-avx512"]
    assert (h100.warp_size, mi300x.warp_size, cpu.warp_size) == (32, 64, 1)
    assert mi300x.layout_opt is False and h100.layout_opt is True
    s_gpu, s_amd, s_cpu = (strategy("loss_entropy", p) for p in (h100, mi300x, cpu))
    assert s_gpu["forward"] == "chunks" and s_cpu["forward"] == "rows"
    assert all(s["why"] for s in (s_gpu, s_amd, s_cpu))
    for fam, table in STRATEGIES.items():
        assert {"cpu", "nvidia", "amd", "other"} <= set(table), fam


def test_loss_chunk_follows_profile_and_size():
    h100 = PINNED_PROFILES["h100"]
    assert fleet.loss_chunk(torch.device("cuda"), 128256, profile=h100) == 1024
    assert fleet.loss_chunk(torch.device("cuda"), 512, profile=h100) == 0  # one chunk: whole rows
    assert fleet.loss_chunk(torch.device("cpu"), 128256, profile=PINNED_PROFILES["cpu-avx512"]) == 0


def test_cpu_profile_detected():
    p = profile_for_device(torch.device("cpu"))
    assert p.device_type == "cpu" and p.inductor_codegen == "cpp" and not p.pinned


def test_meta_device_has_no_inductor_profile():
    p = profile_for_device(torch.device("meta"))
    assert p.inductor_codegen == "none" and "no code generator" in p.note


def _fake_cuda(monkeypatch, **props):
    defaults = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                    shared_memory_per_block_optin=232448, L2_cache_size=50 * 2**20, warp_size=32)
    defaults.update(props)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(**defaults))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def test_detected_h100_and_unknown_gpu_falls_back_with_warning(monkeypatch, caplog):
    _fake_cuda(monkeypatch)
    p = fleet._cuda_profile(0)
    assert p.name == "h100(detected)" and p.arch == "sm90" and p.multiprocessors == 132
    _fake_cuda(monkeypatch, name="NVIDIA B200", major=10, minor=0, multi_processor_count=148)
    with caplog.at_level(logging.WARNING, logger="ger_inductor.fleet"):
        p = fleet._cuda_profile(0)
    assert p.name == "h100(detected)" and p.arch == "sm100" and p.multiprocessors == 148
    assert any("nearest known family 'h100'" in r.message for r in caplog.records)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    _fake_cuda(monkeypatch, name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-", warp_size=64,
               multi_processor_count=304)
    p = fleet._cuda_profile(0)
    assert p.vendor == "amd" and p.arch == "gfx942" and p.warp_size == 64 and not p.layout_opt


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ger_inductor", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_env_and_fleet(capsys):
    r = _cli("env")  # one run as a module, in its own interpreter
    assert r.returncode == 0, r.stderr
    assert "torch " in r.stdout and "profile for cpu" in r.stdout
    from ger_inductor.__main__ import main  # the rest in this process: the same entry, no new interpreter

    assert main(["fleet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {(x["profile"], x["family"]): x for x in rows}
    assert by[("h100", "loss_entropy")]["chunk"] == 1024 and by[("cpu-avx512", "loss_entropy")]["chunk"] == 0
    assert any(x["profile"].endswith("(detected)") for x in rows)
    assert main(["fleet"]) == 0
    out = capsys.readouterr().out
    assert "why:" in out and "mi300x" in out


def test_cli_dump_a_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "f = torch.compile(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1), backend='ger')\n"
        "print('loss', float(f(torch.randn(4, 7), torch.tensor([1, 2, 3, 4]))))\n"
    )
    out = tmp_path / "dumps"
    r = _cli("dump", "--out", str(out), str(script))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loss" in r.stdout and "1 graph(s)" in r.stdout and "1 match(es)" in r.stdout
    (folder,) = os.listdir(out)
    assert {"00_input.py", "report.json"} <= set(os.listdir(out / folder))


def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys):
    """In-process: a missing script, an --out that is a file, --threads 0 exit with one
    line, no traceback (stop-38 review); a script's own folder is importable under
    ``dump``, as under ``python SCRIPT``."""
    import pytest

    from ger_inductor.__main__ import main

    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="no script"):
        main(["dump", "--out", str(tmp_path / "d"), str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit, match="is a file"):
        main(["dump", "--out", str(a_file), str(a_file)])
    with pytest.raises(SystemExit):
        main(["demo", "--threads", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    (tmp_path / "sibling_mod.py").write_text("VALUE = 41\n")
    script = tmp_path / "uses_sibling.py"
    script.write_text("import sibling_mod\nprint('value', sibling_mod.VALUE + 1)\n")
    env, argv, path = os.environ.get("GER_DUMP_DIR"), sys.argv[:], sys.path[:]
    assert main(["dump", "--out", str(tmp_path / "d"), str(script)]) == 0
    assert (os.environ.get("GER_DUMP_DIR"), sys.argv, sys.path) == (env, argv, path)  # put back
    out = capsys.readouterr().out
    assert "value 42" in out and "0 graph(s)" in out


def test_cli_demo_one_workload():
    """The demo CLI end to end on its loss workload (``--only``; the LM step's fused head
    is tested on the same TinyLM in tests/test_dynamic.py, without the CLI's timing):
    one table, eager / inductor / ger rows, eager's numbers, the rewrite named, progress
    on stderr. At 1/16 of its rows (``--scale``): the numbers, not the speed."""
    r = _cli("demo", "--only", "h(p) LOSS", "--repeat", "1", "--scale", "0.0625", timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "all results match eager" in r.stdout
    assert r.stdout.count("workload ") == 1  # one table
    workload = "CE - 0.1 H(p) loss"
    rows = [line for line in r.stdout.splitlines() if line.startswith(workload + " ")]
    assert [line[len(workload):].split()[0] for line in rows] == ["eager", "inductor", "ger"], r.stdout
    assert not any(line.startswith(("LM train step ", "CNN ")) for line in r.stdout.splitlines()), r.stdout
    assert "loss_entropy/entropy x1" in rows[2]
    assert "[" in r.stderr and f"{workload}: ger" in r.stderr  # progress, on stderr
    assert "128x32000 fp32 logits" in r.stdout  # the scaled workload is the one described


def test_cli_demo_only_names_a_workload():
    r = _cli("demo", "--only", "no such workload")
    assert r.returncode == 2
    assert "names no workload" in r.stderr and "LM train step" in r.stderr
    r = _cli("demo", "--scale", "0")
    assert r.returncode == 2 and "must be in (0, 1]" in r.stderr


def test_profile_layout_choice_reaches_inductor_config():
    assert fleet.inductor_patches(PINNED_PROFILES["mi300x"]) == {"layout_optimization": False}
    assert fleet.inductor_patches(PINNED_PROFILES["h100"]) == {}
    f = torch.compile(lambda x: (x * 2).relu().sum(), backend="ger", options={"device_profile": "mi300x", "strict": True})
    assert f(torch.ones(4)).item() == 8.0
