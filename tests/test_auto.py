"""method="auto": it only ever picks a candidate, follows the measured table, and autotunes."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastconv as fc
from fastconv import _policy, _registry, _validate
from fastconv.kernels import naive
from helpers import CONV_CASES

SUITE_LIKE = [  # (x_shape, w_shape, conf): a small and a large problem, and a depthwise one
    ((2, 3, 8, 8), (4, 3, 3, 3), {}),
    ((8, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),
    ((2, 8, 10, 10), (8, 1, 3, 3), dict(padding=1, groups=8)),
]


AUTO = _policy.AUTO


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts from an empty table, autotuning off, nothing remembered."""
    with fc.autotune(False):
        AUTO.set_table([], "empty (test)")
        AUTO.forget()
        yield
    AUTO.set_table(None)  # reloaded lazily, from the environment outside the test
    AUTO.forget()


def tuned_problems():
    return len(AUTO.tuned)


@pytest.fixture
def fake_methods():
    """Replace the conv2d methods by fakes (thin wrappers over naive) for one test; the
    registry comes back as it was, in its order (error messages list methods in that order)."""
    def add(method, *, priority=0, supports=lambda spec: True, unavailable=lambda: None,
            target="fast_conv", device="cpu"):
        _registry.register("conv2d", method, f"{__name__}:{target}", device=device,
                           unavailable=unavailable, priority=priority,
                           unsupported=lambda spec: None if supports(spec) else "not this one")

    with _registry.scoped():
        for impl in _registry.implementations("conv2d"):
            _registry.unregister("conv2d", impl.method)
        yield add
    AUTO.forget()


CALLS = {"fast": 0, "slow": 0}


def fast_conv(x, w, b, spec):
    CALLS["fast"] += 1
    return naive.conv2d_forward(x, w, b, spec)


def slow_conv(x, w, b, spec):
    CALLS["slow"] += 1
    time.sleep(0.01)
    return naive.conv2d_forward(x, w, b, spec)


def conv_spec(x_shape, w_shape, dtype=np.float64, **conf):
    x, w = np.zeros(x_shape, dtype), np.zeros(w_shape, dtype)
    return _validate.conv2d(x, w, None, conf.get("stride", 1), conf.get("padding", 0),
                            conf.get("dilation", 1), conf.get("groups", 1))[-1]


def table_entry(spec, times, op="conv2d", threads=None):
    return _policy.entry(op, spec, times, threads=threads or fc.get_num_threads())


# ---------------------------------------------------------------------------------------------
# auto only picks candidates


def _all_specs():
    for case in CONV_CASES:
        for dtype in (np.float32, np.float64):
            x, w, b = case.arrays(dtype)
            c = case.conf
            args = (c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1),
                    c.get("groups", 1))
            yield "conv2d", _validate.conv2d(x, w, b, *args)[-1]
            g = np.zeros(_validate.conv2d(x, w, b, *args)[-1].out_shape, dtype)
            yield "conv2d_backward", _validate.conv2d_backward(g, x, w, *args)[-1]
    for opts in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                 dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1))):
        x = np.zeros((2, 3, 11, 9))
        args = (opts["kernel_size"], opts.get("stride"), opts.get("padding", 0),
                opts.get("dilation", 1), opts.get("ceil_mode", False))
        spec = _validate.max_pool2d(x, *args)[-1]
        yield "max_pool2d", spec
        idx = np.zeros(spec.out_shape, np.int64)
        yield "max_pool2d_backward", _validate.max_pool2d_backward(
            np.zeros(spec.out_shape), idx, x.shape, *args)[-1]
    x = np.zeros((2, 3, 11, 9))
    for lay in ("NCHW", "NHWC"):
        xl = x if lay == "NCHW" else x.transpose(0, 2, 3, 1)
        for opts in ((3, 2, 1, True, False, None), (2, None, 0, False, True, 3)):
            spec = _validate.avg_pool2d(xl, *opts, lay)[-1]
            yield "avg_pool2d", spec
            g = np.zeros(_validate._shown(spec.out_shape, lay))
            yield "avg_pool2d_backward", _validate.avg_pool2d_backward(g, xl.shape, *opts,
                                                                       lay)[-1]
        for size in (1, (4, 3)):
            spec = _validate.adaptive_avg_pool2d(xl, size, lay)[-1]
            yield "adaptive_avg_pool2d", spec
            g = np.zeros(_validate._shown(spec.out_shape, lay))
            yield "adaptive_avg_pool2d_backward", _validate.adaptive_avg_pool2d_backward(
                g, xl.shape, size, lay)[-1]
        w = np.zeros((3, 2, 2, 2) if lay == "NCHW" else (2, 2, 2, 3))
        for opts in ((2, 0, 0, 1, 1), (2, 1, 1, 1, 1)):
            spec = _validate.conv_transpose2d(xl, w, None, *opts, lay)[-1]
            yield "conv_transpose2d", spec
            g = np.zeros(_validate._shown(spec.x_shape, lay))
            yield "conv_transpose2d_backward", _validate.conv_transpose2d_backward(
                g, xl, w, *opts, lay)[-1]
        wc = np.zeros((4, 3, 3, 3) if lay == "NCHW" else (3, 3, 3, 4))
        spec = _validate.conv2d(xl, wc, None, 1, 1, 1, 1, lay)[-1]
        yield "conv2d", spec


@pytest.mark.parametrize("use_table", [False, True], ids=["priority", "table"])
def test_auto_picks_a_usable_method_that_supports_the_problem(use_table):
    specs = list(_all_specs())
    if use_table:  # a table that claims every method is fastest somewhere
        entries = []
        for i, (op, spec) in enumerate(specs):
            names = _registry.known(op)
            entries.append(table_entry(spec, {m: 1.0 + (j - i) % len(names)
                                              for j, m in enumerate(names)}, op=op))
        AUTO.set_table(entries)
    for op, spec in specs:
        impl = _registry.resolve(op, "auto", spec)
        assert impl in _registry.candidates(op, spec), (op, spec, impl.method)
        assert impl.unavailable() is None and impl.supports(spec)
        assert impl.device == "cpu"


def test_auto_never_picks_an_unsupported_or_unavailable_method(fake_methods):
    fake_methods("fake-any")
    fake_methods("fake-nogroups", priority=100, supports=lambda spec: spec.groups == 1)
    fake_methods("fake-missing", priority=200, unavailable=lambda: "not built here")
    plain = conv_spec((2, 4, 8, 8), (4, 4, 3, 3))
    grouped = conv_spec((2, 4, 8, 8), (4, 2, 3, 3), groups=2)
    # the table says the fakes are by far the fastest, on both problems
    AUTO.set_table([table_entry(s, {"fake-nogroups": 1e-6, "fake-missing": 1e-7,
                                         "fake-any": 1.0}) for s in (plain, grouped)])
    assert _registry.resolve("conv2d", "auto", plain).method == "fake-nogroups"
    assert _registry.resolve("conv2d", "auto", grouped).method != "fake-nogroups"
    for spec in (plain, grouped):
        assert _registry.resolve("conv2d", "auto", spec).method != "fake-missing"
    # and the answer runs
    x, w = np.ones((2, 4, 8, 8)), np.ones((4, 2, 3, 3))
    np.testing.assert_allclose(fc.conv2d(x, w, groups=2), fc.conv2d(x, w, groups=2,
                                                                   method="fake-any"))


def test_auto_on_device_arrays_only_considers_gpu_methods():
    spec = conv_spec((1, 1, 5, 5), (1, 1, 3, 3))._replace(on_device=True)
    cands = _registry.candidates("conv2d", spec)
    assert all(i.device == "cuda" for i in cands)
    if not cands:
        with pytest.raises(fc.BackendUnavailableError, match="python -m fastconv info"):
            _registry.resolve("conv2d", "auto", spec)
    else:
        assert _registry.resolve("conv2d", "auto", spec).device == "cuda"


# ---------------------------------------------------------------------------------------------
# the policy table


def test_policy_follows_the_nearest_measured_problem(fake_methods):
    for m in ("fake-a", "fake-b", "fake-c"):
        fake_methods(m)
    small, large = (conv_spec(x, w, **c) for x, w, c in SUITE_LIKE[:2])
    AUTO.set_table([table_entry(small, {"fake-a": 1.0, "fake-b": 2.0, "fake-c": 3.0}),
                         table_entry(large, {"fake-a": 2.0, "fake-b": 1.0, "fake-c": 30.0})])
    assert _registry.resolve("conv2d", "auto", small).method == "fake-a"
    assert _registry.resolve("conv2d", "auto", large).method == "fake-b"
    # near the large problem (batch 16 instead of 8): its ranking
    near_large = conv_spec((16, 64, 28, 28), (64, 64, 3, 3), padding=1)
    assert _registry.resolve("conv2d", "auto", near_large).method == "fake-b"
    # the other dtype still finds its nearest shape
    small32 = conv_spec(SUITE_LIKE[0][0], SUITE_LIKE[0][1], np.float32)
    assert _registry.resolve("conv2d", "auto", small32).method == "fake-a"
    ranking = _policy.rank("conv2d", large, {"fake-a", "fake-b", "fake-c"}, AUTO.table,
                           fc.get_num_threads())
    assert [m for m, _ in ranking] == ["fake-b", "fake-a", "fake-c"]


def test_a_method_the_table_never_measured_wins_only_by_priority(fake_methods):
    spec = conv_spec(*SUITE_LIKE[0][:2])
    fake_methods("fake-measured", priority=5)
    fake_methods("fake-other", priority=7)
    fake_methods("fake-new-low", priority=1)
    AUTO.set_table([table_entry(spec, {"fake-measured": 1.0, "fake-other": 2.0})])
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-measured"
    fake_methods("fake-new-high", priority=50)
    AUTO.forget()
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-new-high"


def test_remembered_choices_follow_the_table_threads_registry_and_tuning(fake_methods):
    """resolve() remembers auto's choice per problem; every change that could alter the
    choice must make it choose again."""
    spec = conv_spec(*SUITE_LIKE[0][:2])
    fake_methods("fake-a")
    fake_methods("fake-b")
    AUTO.set_table([table_entry(spec, {"fake-a": 1.0, "fake-b": 2.0})])
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-a"
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-a"
    AUTO.set_table([table_entry(spec, {"fake-a": 2.0, "fake-b": 1.0})])  # a new table
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-b"
    two = table_entry(spec, {"fake-a": 1.0, "fake-b": 2.0})
    two["threads"] = 1  # a ranking measured with one thread, for when one thread is set
    AUTO.set_table([table_entry(spec, {"fake-a": 2.0, "fake-b": 1.0}), two])
    before = fc.get_num_threads()
    try:
        fc.set_num_threads(1)
        assert _registry.resolve("conv2d", "auto", spec).method == "fake-a"
    finally:
        fc.set_num_threads(before)
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-b"
    fake_methods("fake-d", priority=-1)  # never measured, lowest priority: not chosen
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-b"
    fake_methods("fake-d", priority=50)  # registered again, same count of methods: now it wins
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-d"
    fake_methods("fake-b", priority=3)  # the chosen implementation replaced ...
    fake_methods("fake-c", priority=99)  # ... and a new one the table never measured
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-c"
    n = tuned_problems()
    with fc.autotune():  # turning measured mode on is not hidden by the remembered choice
        _registry.resolve("conv2d", "auto", spec)
        assert tuned_problems() == n + 1
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-c"


def test_without_a_table_the_highest_priority_wins(fake_methods):
    fake_methods("fake-low", priority=1)
    fake_methods("fake-top", priority=2)
    assert _registry.resolve("conv2d", "auto", conv_spec(*SUITE_LIKE[0][:2])).method == \
        "fake-top"


def test_table_from_the_user_cache_dir_and_the_environment(tmp_path, monkeypatch):
    spec = conv_spec(*SUITE_LIKE[0][:2])
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCONV_AUTO_TABLE", raising=False)
    (tmp_path / "auto_table.json").write_text(json.dumps(
        {"entries": [table_entry(spec, {"naive": 1.0})]}))
    AUTO.set_table(None)
    entries, source = AUTO.table.entries, AUTO.table.source
    assert len(entries) == 1 and "user cache" in source
    other = tmp_path / "other.json"
    other.write_text(json.dumps([table_entry(spec, {"naive": 1.0}), table_entry(spec, {})]))
    monkeypatch.setenv("FASTCONV_AUTO_TABLE", str(other))
    AUTO.set_table(None)
    entries, source = AUTO.table.entries, AUTO.table.source
    assert len(entries) == 1 and "FASTCONV_AUTO_TABLE" in source  # the empty entry is dropped
    other.write_text("{not json")
    AUTO.set_table(None)
    with pytest.warns(RuntimeWarning, match="ignoring the auto policy table"):
        AUTO.table


def test_the_shipped_table_is_well_formed():
    entries, source = _policy.read_table(_policy.SHIPPED_TABLE)
    assert entries and source
    for e in entries:
        assert e["op"] in _registry.OPS and e["device"] in ("cpu", "cuda")
        assert e["dtype"] in ("float32", "float64") and e["times"]
        assert all(t > 0 for t in e["times"].values())


def test_merge_replaces_only_the_same_problem():
    def entry(shape, t, **kw):
        e = dict(op="conv2d", shape=shape, dtype="float32", device="cpu", threads=2,
                 times={"direct": t})
        return e | kw

    old = [entry("a", 1.0), entry("a", 2.0, layout="NHWC"), entry("a", 3.0, threads=1),
           entry("b", 4.0)]
    merged = _policy.merge(old, [entry("a", 5.0), entry("c", 6.0)])
    times = sorted(e["times"]["direct"] for e in merged)
    assert times == [2.0, 3.0, 4.0, 5.0, 6.0]  # only the NCHW 2-thread "a" was re-measured


# ---------------------------------------------------------------------------------------------
# the measured mode


def test_autotune_times_once_then_remembers(fake_methods):
    fake_methods("fake-fast", target="fast_conv")
    fake_methods("fake-slow", target="slow_conv", priority=10**6)  # the policy's choice
    x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    spec = conv_spec(x.shape, w.shape)
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-slow"
    with fc.autotune(cache=False):
        before = tuned_problems()
        assert _registry.resolve("conv2d", "auto", spec).method == "fake-fast"
        assert tuned_problems() == before + 1
        CALLS.update(fast=0, slow=0)
        for _ in range(3):
            y = fc.conv2d(x, w)
        assert tuned_problems() == before + 1  # remembered: no new timing
        assert CALLS == {"fast": 3, "slow": 0}
        np.testing.assert_allclose(y, naive.conv2d_forward(x, w, None, spec))
        # another shape is a new problem
        fc.conv2d(np.ones((1, 3, 9, 9)), w)
        assert tuned_problems() == before + 2
    assert not AUTO.tuning  # the with block restored the setting
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-slow"


def test_autotune_cache_file_is_shared(fake_methods, tmp_path):
    fake_methods("fake-fast", target="fast_conv")
    fake_methods("fake-slow", target="slow_conv", priority=10**6)
    spec = conv_spec((2, 3, 8, 8), (4, 3, 3, 3))
    path = tmp_path / "sub" / "autotune.json"
    fc.autotune(cache=path)
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-fast"
    data = json.loads(path.read_text())
    (record,) = data["choices"].values()
    assert record["method"] == "fake-fast" and set(record["times"]) == {"fake-fast", "fake-slow"}
    # a new process (simulated: memory cleared) reads the file instead of timing again
    AUTO.forget()
    CALLS.update(fast=0, slow=0)
    assert _registry.resolve("conv2d", "auto", spec).method == "fake-fast"
    assert CALLS["slow"] == 0  # nothing timed: the slow one was never called
    fc.autotune(False)
    assert not AUTO.tuning


def test_autotune_cache_true_uses_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    with fc.autotune(cache=True):
        assert AUTO.tune_path == tmp_path / "autotune.json"
    assert AUTO.tune_path is None


@pytest.mark.parametrize("op", _registry.OPS)
def test_autotune_runs_every_op_with_the_real_methods(op):
    """Random inputs of every op are valid for every registered CPU method."""
    specs = [s for o, s in _all_specs() if o == op]
    specs = specs[:2] + specs[-1:]  # the last, for the new ops, is channels-last
    with fc.autotune():
        for spec in specs:
            impl = _registry.resolve(op, "auto", spec)
            assert impl in _registry.candidates(op, spec)
    for spec in (specs[0], specs[-1]):
        cands = _registry.candidates(op, spec)
        times = _policy.time_candidates(op, spec, cands)
        assert set(times) == {i.method for i in cands} and all(t > 0 for t in times.values())


def test_environment_turns_autotune_on(tmp_path):
    code = ("from fastconv._policy import AUTO; print(AUTO.tuning, AUTO.tune_path)")
    env = dict(os.environ, FASTCONV_AUTOTUNE="1", FASTCONV_AUTOTUNE_CACHE="1",
               FASTCONV_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(fc.__file__)), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(tmp_path / "autotune.json")]


# ---------------------------------------------------------------------------------------------
# the public choice, as SciPy's choose_conv_method


def test_choose_method_is_autos_choice_for_every_op():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
    y = fc.conv2d(x, w, padding=1)
    p, i = fc.max_pool2d(x, 2, return_indices=True)
    calls = {
        "conv2d": ((x, w), dict(padding=1)),
        "conv2d_backward": ((np.ones_like(y), x, w), dict(padding=1, need_input=False)),
        "max_pool2d": ((x, 2), dict(return_indices=True)),
        "max_pool2d_backward": ((np.ones_like(p), i, x.shape, 2), {}),
    }
    specs = {
        "conv2d": _validate.conv2d(x, w, None, 1, 1, 1, 1)[-1],
        "conv2d_backward": _validate.conv2d_backward(y, x, w, 1, 1, 1, 1)[-1],
        "max_pool2d": _validate.max_pool2d(x, 2, None, 0, 1, False)[-1],
        "max_pool2d_backward": _validate.max_pool2d_backward(p, i, x.shape, 2, None, 0, 1,
                                                             False)[-1],
    }
    for op, (args, opts) in calls.items():
        chosen = fc.choose_method(op, *args, **opts)
        assert chosen == _registry.resolve(op, "auto", specs[op]).method
        method, times = fc.choose_method(op, *args, **opts, measure=True)
        assert set(times) == {c.method for c in _registry.candidates(op, specs[op])}
        assert method == min(times, key=times.get) and all(t > 0 for t in times.values())


def test_choose_method_measures_on_the_given_arrays(fake_methods):
    fake_methods("fake-fast", target="fast_conv")
    fake_methods("fake-slow", target="slow_conv", priority=10**6)  # the policy's choice
    x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    assert fc.choose_method("conv2d", x, w) == "fake-slow"
    method, times = fc.choose_method("conv2d", x, w, measure=True)
    assert method == "fake-fast" and times["fake-slow"] > times["fake-fast"]
    assert fc.choose_method("conv2d", x, w) == "fake-slow"  # auto itself is unchanged


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fc.choose_method("conv3d", np.ones((1, 1, 3, 3))), ValueError, "op='conv3d'"),
    (lambda: fc.choose_method("conv2d", np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)),
                              method="naive"), TypeError, "chooses the method"),
    (lambda: fc.choose_method("conv2d", np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)),
                              stride=0), ValueError, "stride must be >= 1"),
    (lambda: fc.choose_method("conv2d", np.ones((1, 1, 3, 3))), TypeError, "missing"),
    (lambda: fc.choose_method("conv2d", np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)),
                              measure="yes"), TypeError, "measure must be a bool"),
])
def test_choose_method_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_held_out_shapes_stay_out_of_the_table():
    from fastconv import bench
    from fastconv.bench.runner import Result

    names = {s.name for s in bench.HELDOUT_SHAPES}
    assert names and not names & {s.name for s in bench.CONV_SHAPES + bench.POOL_SHAPES}
    shipped = {e.get("shape") for e in _policy.read_table(_policy.SHIPPED_TABLE)[0]}
    assert not names & shipped
    rows = [Result("conv-fwd", s, "float32", "naive", "fastconv", "cpu", "naive", time=1.0,
                   ok=True) for s in ("lenet-c1", "held-vgg-128")]
    assert [e["shape"] for e in bench.policy_entries(rows, threads=2)] == ["lenet-c1"]
    assert [s.name for s in bench.select_shapes("heldout")] == [s.name for s in
                                                                bench.HELDOUT_SHAPES]
