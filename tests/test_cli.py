"""The command line (`python -m fastconv info`, `python -m fastconv bench`) and the benchmark's
building blocks: peers, timing, the auto report, the policy table it writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import _cli, _info, _policy, _registry, bench
from fastconv.bench import peers as _peers
from fastconv.bench import runner
from helpers import CONV_CASES, ref_max_pool2d, scipy_conv2d, tol

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fc.__file__)))


def run_cli(args, cwd, timeout=300, **env):
    """`python -m fastconv ARGS` on the fastconv this test imported, from another directory."""
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, e.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "fastconv", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# info


def test_info_lists_versions_threads_blas_gpu_and_methods(tmp_path):
    out = run_cli(["info"], tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("__Versions__", "numpy", "numba", "fastconv.kernels._im2col",
                   "threading layer", "BLAS", "implementation", "gpu", "__Methods__",
                   "conv2d_backward", "max_pool2d_backward", "method='auto'"):
        assert needle in text, needle
    for op in _registry.OPS:
        for m in _registry.known(op):
            assert m in text
    assert "naive" in text and "usable" in text


def test_info_json_and_reasons_for_unusable_methods():
    info = _info.collect()
    json.dumps(info)  # plain data
    for op, rows in info["methods"].items():
        assert [m for m, _, _ in rows] == list(_registry.known(op))
        for m, device, state in rows:
            reason = _registry.describe(m, op)[op]["reason"]
            assert state == ("usable" if reason is None else f"unavailable: {reason}")
    assert info["compiled"]["_im2col"].startswith(("built", "not built", "not usable"))
    assert info["cuda"]["gpu"]


def test_info_reports_the_cuda_memory_pool(monkeypatch):
    if "memory pool" not in _info._cuda_info():
        pytest.skip("numba.cuda cannot be imported here")
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "256")
    assert "up to 256 MiB idle" in _info._cuda_info()["memory pool"]
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "0")
    assert _info._cuda_info()["memory pool"].startswith("off")
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "lots")
    assert "misconfigured" in _info._cuda_info()["memory pool"]


def test_no_command_prints_help(capsys):
    assert _cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# bench end to end (a subprocess, tiny shapes)


def test_bench_runs_and_writes_json_plot_markdown(tmp_path):
    args = ["bench", "--quick", "--shapes", "tiny,tiny-pool,tiny-gap,tiny-decoder", "--dtype", "float64",
            "--repeat", "1", "--pause", "0", "--no-progress", "--json", "out.json",
            "--markdown", "out.md"]
    has_mpl = _importable("matplotlib")
    if has_mpl:
        args += ["--plot", "out.png"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    rows = data["results"]
    assert {r["op"] for r in rows} == set(bench.DEFAULT_OPS)
    for op in bench.DEFAULT_OPS:
        fc_op = bench.OPS[op][0]
        methods = {r["method"] for r in rows if r["op"] == op}
        assert {"auto", "numpy"} <= methods
        shape = next(bench.SHAPES[n] for n in ("tiny", "tiny-pool", "tiny-gap", "tiny-decoder")
                     if bench.SHAPES[n].kind == bench.OPS[op][1])
        spec = bench.Problem(op, shape, "float64").spec()
        assert {m for m in fc.methods(fc_op) if not m.startswith("cuda")
                and _registry.implementation(fc_op, m).supports(spec)} <= methods
        if runner.has_torch():
            assert "torch" in methods
    assert "scipy" in {r["method"] for r in rows if r["op"] == "conv-fwd"}
    for r in rows:
        assert r["ok"] is not False, r
        if r["ok"]:
            assert r["time"] > 0 and r["max_err"] < 1e-10 and r["speedup_numpy"] > 0
    assert all(r["gflops"] for r in rows if r["op"].startswith("conv") and r["time"])
    assert all(r["gbps"] for r in rows if r["op"].startswith("pool") and r["time"])
    assert {a["op"] for a in data["auto"]} == set(bench.DEFAULT_OPS)
    assert data["meta"]["threads"] == fc.get_num_threads()
    # the table on stdout, the Markdown file
    assert "vs numpy" in out.stdout and "max err" in out.stdout and "auto→" in out.stdout
    md = (tmp_path / "out.md").read_text()
    assert "### conv-fwd" in md and "| shape | dtype | method |" in md
    if has_mpl:
        png = (tmp_path / "out.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_device_option_keeps_one_side(tmp_path):
    out = run_cli(["bench", "--shapes", "tiny", "--ops", "conv-fwd", "--dtype", "float64",
                   "--repeat", "1", "--pause", "0", "--no-progress", "--device", "gpu",
                   "--json", "gpu.json"], tmp_path)
    if runner.real_gpu():
        assert out.returncode == 0, out.stdout + out.stderr
        rows = json.loads((tmp_path / "gpu.json").read_text())["results"]
        assert rows and all(r["device"].startswith("gpu") for r in rows)
    else:
        assert out.returncode == 1 and "nothing to time" in out.stderr
    out = run_cli(["bench", "--shapes", "tiny", "--ops", "conv-fwd", "--dtype", "float64",
                   "--repeat", "1", "--pause", "0", "--no-progress", "--device", "cpu",
                   "--no-peers", "--json", "cpu.json"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert rows and all(r["device"] == "cpu" for r in rows)
    assert {"auto", "naive"} <= {r["method"] for r in rows}


def test_bench_from_saved_results_reports_them_together(tmp_path):
    common = ["--shapes", "tiny", "--dtype", "float64", "--repeat", "1", "--pause", "0",
              "--no-progress", "--no-peers"]
    for ops, name in (("conv-fwd", "a.json"), ("conv-bwd", "b.json")):
        out = run_cli(["bench", "--ops", ops, *common, "--json", name], tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
    args = ["bench", "--from", "b.json,a.json", "--json", "ab.json", "--markdown", "ab.md"]
    if _importable("matplotlib"):
        args += ["--plot", "ab.png"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("fastconv bench: ") == 2  # one line per source run
    data = json.loads((tmp_path / "ab.json").read_text())
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert len(data["meta"]) == 2 and len(data["results"]) == len(a["results"]) + len(b["results"])
    assert [r["op"] for r in data["results"]][0] == "conv-fwd"  # suite order, not file order
    assert {x["op"] for x in data["auto"]} == {"conv-fwd", "conv-bwd"}
    assert (tmp_path / "ab.md").read_text().count("Measured ") == 2
    if _importable("matplotlib"):
        assert (tmp_path / "ab.png").read_bytes()[:4] == b"\x89PNG"
    out = run_cli(["bench", "--from", "ab.json"], tmp_path)  # a merged file reads back
    assert out.returncode == 0 and out.stdout.count("fastconv bench: ") == 2
    out = run_cli(["bench", "--from", "a.json", "--save-policy", "p.json"], tmp_path)
    assert out.returncode == 1 and "cannot be used with --from" in out.stderr
    (tmp_path / "bad.json").write_text("{}")
    out = run_cli(["bench", "--from", "bad.json"], tmp_path)
    assert out.returncode == 1 and "bad.json is not a results file" in out.stderr


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_bench_list_and_bad_arguments(tmp_path):
    out = run_cli(["bench", "--list"], tmp_path)
    assert out.returncode == 0
    for s in bench.CONV_SHAPES + bench.POOL_SHAPES:
        assert s.name in out.stdout
    bad = run_cli(["bench", "--shapes", "nope"], tmp_path)
    assert bad.returncode != 0 and "--shapes" in bad.stderr


# ---------------------------------------------------------------------------------------------
# the pieces


def test_shape_suite_is_design_section_4():
    conv = {s.name: (s.n, s.c, s.hw, s.k, s.r, s.stride, s.pad, s.groups)
            for s in bench.CONV_SHAPES if not s.hidden}
    assert conv == {
        "lenet-c1": (64, 1, 28, 30, 5, 1, 0, 1), "keras-c1": (64, 1, 28, 64, 3, 1, 0, 1),
        "keras-c2": (64, 64, 13, 64, 3, 1, 0, 1), "cifar-c1": (128, 3, 32, 32, 3, 1, 1, 1),
        "vgg-64": (8, 64, 56, 64, 3, 1, 1, 1), "vgg-256": (8, 256, 28, 256, 3, 1, 1, 1),
        "resnet-1x1": (8, 256, 28, 64, 1, 1, 0, 1), "alexnet-c1": (8, 3, 224, 96, 11, 4, 2, 1),
        "mobilenet-dw": (8, 128, 56, 128, 3, 1, 1, 128)}
    pools = {(s.x_shape, s.kernel, s.stride) for s in bench.POOL_SHAPES if not s.hidden}
    assert pools == {((64, 30, 24, 24), 2, 2), ((64, 64, 26, 26), 2, 2),
                     ((8, 64, 112, 112), 2, 2), ((8, 256, 56, 56), 2, 2),
                     ((8, 96, 55, 55), 3, 2)}
    p = bench.Problem("conv-fwd", bench.SHAPES["lenet-c1"], "float32")
    assert p.flops == 2 * 64 * 30 * 1 * 25 * 24 * 24
    assert bench.Problem("conv-bwd", bench.SHAPES["lenet-c1"], "float32").flops == 2 * p.flops


def test_select_shapes():
    assert [s.name for s in bench.select_shapes("lenet")] == ["lenet-c1"]
    assert [s.name for s in bench.select_shapes("vgg,pool3")] == ["vgg-64", "vgg-256",
                                                                   "pool3-8x96x55"]
    assert [s.name for s in bench.select_shapes("tiny")] == ["tiny"]
    assert len(bench.select_shapes(None, quick=True)) == len(bench.QUICK_SHAPES)
    assert all(not s.hidden for s in bench.select_shapes(None))


@pytest.mark.parametrize("case", [c for c in CONV_CASES if "medium" not in c.name],
                         ids=lambda c: c.name)
def test_numpy_and_scipy_peers_match_the_references(case):
    x, w, b = case.arrays(np.float64, seed=5)
    want = scipy_conv2d(x, w, b, **case.conf)
    np.testing.assert_allclose(_peers.im2col_conv2d(x, w, b, **case.conf), want,
                               **tol(np.float64))
    np.testing.assert_allclose(_peers.scipy_conv2d(x, w, b, **case.conf), want,
                               **tol(np.float64))
    g = np.random.default_rng(6).standard_normal(want.shape)
    got = _peers.im2col_conv2d_backward(g, x, w, **case.conf)
    ref = fc.conv2d_backward(g, x, w, **case.conf, method="naive")
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, **tol(np.float64))


@pytest.mark.parametrize("opts", [dict(kernel_size=2), dict(kernel_size=3, stride=2),
                                  dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1),
                                       dilation=(2, 1))],
                         ids=["2", "3s2", "3s2p1", "32-dil"])
def test_numpy_pool_peer_matches_the_reference(opts):
    rng = np.random.default_rng(7)
    x = rng.permutation(2 * 3 * 11 * 9).reshape(2, 3, 11, 9).astype(np.float64)
    out, idx = _peers.im2col_max_pool2d(x, **opts)
    want, want_idx = ref_max_pool2d(x, **opts)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(idx, want_idx)
    g = rng.standard_normal(out.shape)
    np.testing.assert_allclose(
        _peers.im2col_max_pool2d_backward(g, idx, x.shape, **opts),
        fc.max_pool2d_backward(g, idx, x.shape, **opts, method="naive"), **tol(np.float64))


TINY = {"conv": "tiny", "pool": "tiny-pool", "box": "tiny-gap", "transpose": "tiny-decoder"}


def _tiny(op):
    return TINY[bench.OPS[op][1]]


@pytest.mark.parametrize("op", list(bench.OPS))
def test_torch_peer_agrees(op):
    pytest.importorskip("torch")
    shape = bench.SHAPES[_tiny(op)]
    p = bench.Problem(op, shape, "float64")
    call, finish = bench.peer_call(p, "torch")
    err, ok = bench.max_error(p, finish(call()), p.reference())
    assert ok, err


def test_measure_counts_warmup_separately():
    calls = []
    med, samples, result = bench.measure(lambda: calls.append(1) or len(calls), repeat=4)
    assert result == 1 and len(samples) == 4 and len(calls) == 5
    assert med == pytest.approx(float(np.median(samples)))
    calls.clear()
    _, samples, _ = bench.measure(lambda: calls.append(1), budget=0.0, min_repeat=3)
    assert len(samples) == 3 and len(calls) == 5  # warm-up, estimate, three timed


def test_measure_together_goes_round_robin_from_a_new_start_each_round():
    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    meds, samples = bench.measure_together(calls, rounds=4)
    assert log == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert [len(s) for s in samples] == [4, 4, 4]
    assert meds == [pytest.approx(float(np.median(s))) for s in samples]
    log.clear()  # rounds from the budget and the estimates, within [min_repeat, max_repeat]
    bench.measure_together(calls, budget=1.0, estimates=[0.1, 0.1, 0.05], max_repeat=100)
    assert len(log) == 3 * 12
    log.clear()
    bench.measure_together(calls, budget=0.0, estimates=[1.0] * 3, min_repeat=2)
    assert len(log) == 3 * 2
    log.clear()
    bench.measure_together(calls, estimates=[5.0] * 3, slow=2.0)  # slow calls: one round
    assert len(log) == 3


def test_contenders_and_auto_are_retimed_together(monkeypatch):
    """auto, its choice and every method within CONTENDERS of the fastest get their times from
    one round-robin run; methods far behind keep their own."""
    p = bench.Problem("conv-fwd", bench.SHAPES["tiny"], "float64")
    entries = [bench.Entry(m, "fastconv", "cpu") for m in ("a", "b", "c")]
    entries += [bench.Entry("auto", "auto", "cpu"), bench.Entry("numpy", "peer", "cpu")]
    rows = [_result("conv-fwd", "a", 1.0), _result("conv-fwd", "b", 1.4),
            _result("conv-fwd", "c", 9.0), _result("conv-fwd", "auto", 3.0, "auto", "c"),
            _result("conv-fwd", "numpy", 0.5, "peer")]
    made = []

    def fake_call(problem, e):
        made.append(e.method)
        return (lambda: None), None, None

    monkeypatch.setattr(runner, "_fastconv_or_peer_call", fake_call)
    seen = {}

    def fake_together(calls, **kw):
        seen.update(kw, n=len(calls))
        return [0.25 * (i + 1) for i in range(len(calls))], [[0.1]] * len(calls)

    monkeypatch.setattr(runner, "measure_together", fake_together)
    runner._retime_contenders(p, entries, rows, dict(repeat=None, budget=0.5, slow=2.0))
    assert made == ["a", "b", "c", "auto"] and seen["n"] == 4 and seen["budget"] == 0.5
    assert seen["estimates"] == [1.0, 1.4, 9.0, 3.0]
    assert [r.time for r in rows] == [0.25, 0.5, 0.75, 1.0, 0.5]
    assert [r.together for r in rows] == [True, True, True, True, False]
    assert rows[0].gflops == pytest.approx(p.flops / 0.25 / 1e9)
    made.clear()
    rows = [_result("conv-fwd", "a", 1.0), _result("conv-fwd", "b", 1.6),
            _result("conv-fwd", "c", 9.0), _result("conv-fwd", "auto", 1.1, "auto", "a"),
            _result("conv-fwd", "numpy", 0.5, "peer")]
    runner._retime_contenders(p, entries, rows, dict(repeat=7, budget=0.5, slow=2.0))
    assert made == ["a", "auto"] and seen["rounds"] == 7
    assert [r.time for r in rows] == [0.25, 1.6, 9.0, 0.5, 0.5]


def test_max_error_flags_wrong_results():
    p = bench.Problem("conv-fwd", bench.SHAPES["tiny"], "float32")
    ref = p.reference()
    good = (ref[0].astype(np.float32),)
    assert bench.max_error(p, good, ref)[1]
    bad = (good[0] + np.float32(1e-2),)
    err, ok = bench.max_error(p, bad, ref)
    assert not ok and err > 1e-4
    assert not bench.max_error(p, (good[0][:1],), ref)[1]
    q = bench.Problem("pool-fwd", bench.SHAPES["tiny-pool"], "float64")
    out, idx = q.reference()
    assert bench.max_error(q, (out, idx), (out, idx))[1]
    assert not bench.max_error(q, (out, idx + 1), (out, idx))[1]


def _result(op, method, t, kind="fastconv", chose=None, device="cpu"):
    return bench.Result(op, "s", "float32", method, kind, device, method, time=t, chose=chose,
                        ok=True)


def test_auto_report_compares_with_the_fastest_method():
    rs = [_result("conv-fwd", "a", 1.0), _result("conv-fwd", "b", 2.0),
          _result("conv-fwd", "auto", 1.05, "auto", "a"),
          _result("pool-fwd", "a", 1.0), _result("pool-fwd", "b", 2.0),
          _result("pool-fwd", "auto", 2.0, "auto", "b"),
          _result("pool-fwd", "numpy", 0.1, "peer")]
    rep = {a["op"]: a for a in bench.auto_report(rs)}
    assert rep["conv-fwd"]["within"] and rep["conv-fwd"]["fastest"] == "a"
    assert not rep["pool-fwd"]["within"] and rep["pool-fwd"]["choice_ratio"] == 2.0
    text = bench.format_auto(list(rep.values()))
    assert "1/2 problems" in text and "over: pool-fwd" in text


def test_saved_policy_drives_auto(tmp_path, monkeypatch):
    """bench --save-policy writes the table auto reads, in the shipped table's JSON form."""
    results = []
    for op in bench.OPS:
        shape = _tiny(op)
        for m in _registry.methods(bench.OPS[op][0]):
            if not m.startswith("cuda"):
                r = _result(op, m, 1.0 if m == "naive" else 5.0)
                r.shape, r.dtype = shape, "float64"
                results.append(r)
    entries = bench.policy_entries(results, threads=fc.get_num_threads())
    assert len(entries) == len(bench.OPS)
    meta = {"date": "2026-11-22"}
    bench.save_policy(entries, tmp_path / "t.json", meta)
    shipped = json.loads(_policy.SHIPPED_TABLE.read_text())
    written = json.loads((tmp_path / "t.json").read_text())
    assert set(written) == set(shipped) == {"source", "entries"}
    assert _policy.read_table(tmp_path / "t.json")[0] == written["entries"]
    monkeypatch.setenv("FASTCONV_AUTO_TABLE", str(tmp_path / "t.json"))
    try:
        _policy.AUTO.set_table(None)
        spec = bench.Problem("conv-fwd", bench.SHAPES["tiny"], "float64").spec()
        assert _registry.resolve("conv2d", "auto", spec).method == "naive"
    finally:
        monkeypatch.delenv("FASTCONV_AUTO_TABLE")
        _policy.AUTO.set_table(None)


def test_saving_the_policy_merges_with_the_file(tmp_path):
    spec_a = bench.Problem("conv-fwd", bench.SHAPES["tiny"], "float64").spec()
    spec_b = bench.Problem("pool-fwd", bench.SHAPES["tiny-pool"], "float64").spec()
    a = _policy.entry("conv2d", spec_a, {"naive": 1.0}, threads=2, name="tiny")
    b = _policy.entry("max_pool2d", spec_b, {"naive": 1.0}, threads=2, name="tiny-pool")
    path = tmp_path / "table.json"
    bench.save_policy([a, b], path, {"run": 1})
    a2 = dict(a, times={"naive": 2.0})
    bench.save_policy([a2], path, {"run": 2})
    entries, source = _policy.read_table(path)
    assert len(entries) == 2
    assert {e["op"]: e["times"]["naive"] for e in entries} == {"conv2d": 2.0, "max_pool2d": 1.0}
    assert source == [{"run": 1}, {"run": 2}]
    bench.save_policy([a2], path, {"run": 3}, merge=False)
    assert len(_policy.read_table(path)[0]) == 1


def test_bench_on_a_fresh_machine_without_torch_tqdm_or_matplotlib(tmp_path, monkeypatch,
                                                                    capsys):
    """No PyTorch, no tqdm, no GPU: the default path still runs and prints plain progress."""
    monkeypatch.setattr(runner, "has_torch", lambda: False)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = tmp_path / "r.json"
    rc = _cli.main(["bench", "--shapes", "tiny", "--ops", "conv-fwd", "--dtype", "float32",
                    "--repeat", "1", "--pause", "0", "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "[1/" in captured.err  # the plain progress lines
    methods = {r["method"] for r in json.loads(out.read_text())["results"]}
    assert "torch" not in methods and {"numpy", "scipy", "auto"} <= methods
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        _cli.main(["bench", "--shapes", "tiny", "--plot", str(tmp_path / "p.png")])


def test_info_and_bench_warn_loudly_about_a_missing_cpu_method():
    code = ("import sys; sys.modules['fastconv.kernels._im2col'] = None\n"
            "from fastconv._cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    info = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith("WARNING: method 'im2col' cannot run here: the fastconv "
                                  "imported from ")
    bench = subprocess.run([sys.executable, "-c", code, "bench", "--shapes", "lenet-c1",
                            "--ops", "conv-fwd", "--dtype", "float32", "--methods",
                            "naive,im2col", "--no-peers", "--no-progress", "--repeat", "1"],
                           capture_output=True, text=True, timeout=300)
    assert "WARNING: method 'im2col' cannot run here, so it has no rows" in bench.stderr


def test_the_table_says_why_the_torch_column_is_empty(monkeypatch):
    from fastconv.bench import report

    rows = [runner.Result("conv-fwd", "tiny", "float32", "direct", "fastconv", "cpu", "direct",
                          time=1e-3)]
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: object())
    assert any("PyTorch was not timed" in n for n in report.peer_notes(rows))
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    assert any("PyTorch is not installed" in n for n in report.peer_notes(rows))
