"""OPT-m's network-level choice (issue 5): the significance rule against a numpy reference, the
greedy against a synthetic evaluator with known answers, and the pipeline / CLI / report on a
tiny ViT through ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from graphs import random_images, smoothed_capture
from onnx_mptq.config import Config, OptmConfig, OptmSelect, QuantConfig, ScaleSearchConfig
from onnx_mptq.errors import ConfigError, PlanError
from onnx_mptq.evaluate.evaluator import ParamEvaluator
from onnx_mptq.numerics.metrics import family_z, kl_softmax, paired_improvement
from onnx_mptq.pipeline import emit_from_plan, quantize
from onnx_mptq.plan import LayerPlan, QuantPlan, Scheme
from onnx_mptq.search.optm import Measure, make_evaluator, measure_logits, select_twins, significant_gain
from onnx_mptq.search.scales import TwinOption, search_scales


def _batches(x: np.ndarray, bs: int = 16) -> list[dict]:
    return [{"input": x[i:i + bs]} for i in range(0, len(x), bs)]


# ---------------------------------------------------------------------------------------------
# numerics


def test_paired_improvement_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    g, se = paired_improvement(a, b)
    d = a - b
    assert g == pytest.approx(d.mean())
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(50))
    assert paired_improvement(np.ones(1), np.zeros(1))[1] == float("inf")  # one sample: never significant
    with pytest.raises(ValueError):
        paired_improvement(np.zeros(0), np.zeros(0))


def test_family_z():
    from statistics import NormalDist

    nd = NormalDist()
    assert family_z(2.0, 1) == 2.0
    for k in (2, 5, 25, 1000):
        zk = family_z(2.0, k)
        # the tail of one test at zk is the tail at 2 shared among k comparisons
        assert nd.cdf(-zk) == pytest.approx(nd.cdf(-2.0) / k, rel=1e-9)
    assert family_z(2.0, 25) == pytest.approx(3.12, abs=0.01)
    assert family_z(2.0, 5) < family_z(2.0, 25) < family_z(3.0, 25)
    assert family_z(1e9, 25) == 1e9 and family_z(0.0, 10) > 0


def test_measure_logits_is_nmse_and_kl():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 10))
    out = ref + 0.1 * rng.normal(size=(40, 10))
    m = measure_logits(ref, out)
    assert m.nmse == pytest.approx(np.sum((ref - out) ** 2) / np.sum(ref ** 2))
    assert m.mean_kl == pytest.approx(kl_softmax(ref, out))
    with pytest.raises(Exception, match="non-finite"):
        measure_logits(ref, np.full_like(ref, np.nan))


def test_significance_rule():
    rng = np.random.default_rng(2)
    base = Measure(err=1.0 + 0.1 * rng.random(400), kl=1.0 + 0.1 * rng.random(400))
    clear = Measure(err=base.err * 0.9, kl=base.kl * 0.9)  # 10 % better on every sample
    ok, gain, se = significant_gain(base, clear, base, z=2.0)
    assert ok and gain > 2 * se
    # a small mean gain drowned in per-sample noise is not significant at z = 2, but is at z = 0
    swing = np.where(np.arange(400) % 2 == 0, 0.5, -0.5)
    noisy = Measure(err=base.err - 0.001 + swing, kl=base.kl - 0.001 + swing)
    ok2, g2, se2 = significant_gain(base, noisy, base, z=2.0)
    assert not ok2 and 0 < g2 < 2 * se2
    assert significant_gain(base, noisy, base, z=0.0)[0]
    # a trade (logit error down, KL up) is never a gain, whatever z
    trade = Measure(err=base.err * 0.5, kl=base.kl * 1.01)
    assert not significant_gain(base, trade, base, z=0.0)[0]
    # z = 0: any Pareto improvement of the means counts
    tiny_gain = Measure(err=base.err * 0.999, kl=base.kl * 0.999)
    assert significant_gain(base, tiny_gain, base, z=0.0)[0]


# ---------------------------------------------------------------------------------------------
# the greedy against a synthetic evaluator


class FakeEvaluator:
    """Logits = reference + noise: each unit adds its own noise pattern per quantizer (uniform and
    twin patterns independent), scaled by ``effect[unit][scheme]``, so the expected distance of
    every assignment is known and a small difference of scales is inside the sample noise."""

    def __init__(self, effects: dict[str, dict[str, float]], samples: int = 300, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.reference_logits = rng.normal(size=(samples, 10)) * 3
        self.noise = {(u, k): rng.normal(size=(samples, 10)) for u in effects for k in ("uniform", "twin")}
        self.effects = effects
        self.samples = samples
        self.calls = 0

    def logits(self, layers):
        self.calls += 1
        out = self.reference_logits.copy()
        for u, eff in self.effects.items():
            k = layers[u].inputs[0].scheme.value
            out += eff[k] * self.noise[(u, k)]
        return out


def _layer(unit: str, scheme: str) -> LayerPlan:
    from onnx_mptq.plan import ActQuant, TwinKind

    if scheme == "twin":
        aq = ActQuant(tensor=f"{unit}_in", bits=4, scheme=Scheme.TWIN, twin_kind=TwinKind.GELU, delta1=0.01, m=3,
                      split=None)
    else:
        aq = ActQuant(tensor=f"{unit}_in", bits=4, scheme=Scheme.UNIFORM, symmetric=False, scale=0.05, zero_point=2)
    return LayerPlan(unit=unit, role="fc2", inputs=(aq,), weight=None, params=0, act_elems=16)


def _synthetic(effects: dict[str, dict[str, float]], layer_says_twin: set[str]):
    units = list(effects)
    options = {u: TwinOption(u, "gelu", _layer(u, "uniform"), _layer(u, "twin"), 1.0, 0.5 if u in layer_says_twin else 2.0)
               for u in units}
    plan = QuantPlan(source_digest="s", model_digest="m",
                     layers=tuple(options[u].twin if u in layer_says_twin else options[u].uniform for u in units),
                     avg_weight_bits=8.0, avg_activation_bits=4.0, notes=tuple(f"optm {u}: per layer" for u in units))
    return plan, options


def test_select_twins_keeps_only_real_network_gains():
    # a: twin clearly better; b: twin clearly worse (although its layer error says better);
    # c: twin better by a hair (inside the noise); d: twin worse, layer error agrees
    eff = {"a": {"uniform": 0.3, "twin": 0.1}, "b": {"uniform": 0.1, "twin": 0.3},
           "c": {"uniform": 0.1, "twin": 0.0995}, "d": {"uniform": 0.1, "twin": 0.2}}
    plan, options = _synthetic(eff, layer_says_twin={"a", "b", "c"})
    ev = FakeEvaluator(eff)
    sel = select_twins(plan, options, ev, z=2.0, progress=False)
    chosen = {d.unit for d in sel.decisions if d.chosen}
    assert chosen == {"a"}
    assert [lp.unit for lp in sel.plan.layers] == ["a", "b", "c", "d"]
    assert {lp.unit for lp in sel.plan.layers if lp.inputs[0].scheme is Scheme.TWIN} == {"a"}
    assert sel.nmse < sel.nmse_uniform and sel.kl < sel.kl_uniform
    # uniform + layer-wise + one toggle per operand; the threshold covers those 5 comparisons
    assert sel.evaluations == ev.calls == 2 + len(eff)
    assert sel.z == 2.0 and sel.z_family == pytest.approx(family_z(2.0, 1 + len(eff)))
    # every eligible unit has a decision note; the per-layer notes it supersedes are gone
    assert not any(n.endswith("per layer") for n in sel.plan.notes)
    assert sum(n.startswith("optm ") for n in sel.plan.notes) == 4
    assert any(n.startswith("optm-net: the layer-wise") for n in sel.plan.notes)
    # an unreachable bar keeps everything uniform
    assert select_twins(plan, options, FakeEvaluator(eff), z=1e9, progress=False).twins == 0


def test_select_twins_falls_back_to_uniform():
    eff = {"a": {"uniform": 0.1, "twin": 0.2}, "b": {"uniform": 0.1, "twin": 0.15}}
    plan, options = _synthetic(eff, layer_says_twin={"a", "b"})
    sel = select_twins(plan, options, FakeEvaluator(eff), progress=False)
    assert sel.twins == 0
    assert all(lp == options[lp.unit].uniform for lp in sel.plan.layers)
    assert sel.nmse == sel.nmse_uniform


def test_select_twins_rejects_foreign_options():
    eff = {"a": {"uniform": 0.1, "twin": 0.2}}
    plan, options = _synthetic(eff, set())
    bad = {"zz": dataclasses.replace(options["a"], unit="zz")}
    with pytest.raises(PlanError, match="zz"):
        select_twins(plan, bad, FakeEvaluator(eff), progress=False)


def test_config_checks():
    with pytest.raises(ConfigError, match="quant.optm.subset"):
        OptmConfig(subset=1)
    with pytest.raises(ConfigError, match="quant.optm.z"):
        OptmConfig(z=-1.0)
    cfg = Config.from_dict({"quant": {"optm": {"select": "layer", "subset": 64, "z": 1.5}}})
    assert cfg.quant.optm.select is OptmSelect.LAYER
    with pytest.raises(ConfigError, match="quant.optm.select"):
        Config.from_dict({"quant": {"optm": {"select": "both"}}})


# ---------------------------------------------------------------------------------------------
# through ONNX Runtime


@pytest.fixture(scope="module")
def tiny():
    return smoothed_capture(blocks=2, samples=64, seed=3)


def test_network_choice_on_tiny_vit_is_measured_by_ort(tiny):
    cfg = Config(quant=QuantConfig(w_bits=4, a_bits=4, search=ScaleSearchConfig(grid_size=20), optm=OptmConfig(subset=48)))
    searched = search_scales(tiny.work, tiny.an, tiny.cap, cfg, source_digest="x", smoothing=tiny.splan, progress=False)
    plan, options = searched.plan, searched.twin_options
    eligible = {u.name for u in tiny.an.units if u.role.value in ("fc2", "attn_av")}
    assert set(options) == eligible  # tiny_vit: GELU MLPs and softmax attention
    for name, opt in options.items():  # the plan holds the layer-wise choice
        assert plan.layer(name) == (opt.twin if opt.error_twin <= opt.error_uniform else opt.uniform)
        assert opt.twin.inputs[0].scheme is Scheme.TWIN and opt.uniform.inputs[0].scheme is Scheme.UNIFORM
    ev = make_evaluator(tiny.work, tiny.an, tiny.cap, tiny.data, cfg)
    assert ev.samples == 48
    sel = select_twins(plan, options, ev, z=cfg.quant.optm.z, progress=False)
    # the reported distances are what a fresh evaluator measures for the chosen and the all-uniform plans
    fresh = ParamEvaluator(ev.graph, tiny.work, tiny.data, cfg.runtime, samples=48, seed=cfg.seed, staged=False)
    chosen = {lp.unit: lp for lp in sel.plan.layers}
    uniform = {**chosen, **{n: o.uniform for n, o in options.items()}}
    m_chosen = measure_logits(fresh.reference_logits, fresh.logits(chosen))
    m_uni = measure_logits(fresh.reference_logits, fresh.logits(uniform))
    assert m_chosen.nmse == pytest.approx(sel.nmse, rel=1e-4)
    assert m_uni.nmse == pytest.approx(sel.nmse_uniform, rel=1e-4)
    assert m_chosen.nmse <= m_uni.nmse and m_chosen.mean_kl <= m_uni.mean_kl
    # the chosen plan emits and runs
    report = emit_from_plan(tiny.src, dataclasses.replace(sel.plan, source_digest=_digest(tiny.src))).report
    # every twin fits one uint8 lattice at 4 bits (quant.optm.lattice): one integer matmul per unit
    assert sum(eu.matmuls for eu in report.units) == len(tiny.an.units)


def _digest(model) -> str:
    from onnx_mptq.graph.io import graph_digest

    return graph_digest(model)


def test_pipeline_network_vs_layer(tiny):
    base = QuantConfig(w_bits=4, a_bits=4, search=ScaleSearchConfig(grid_size=20), optm=OptmConfig(subset=32))
    net = quantize(tiny.src, tiny.data, Config(quant=base))
    lay = quantize(tiny.src, tiny.data, Config(quant=dataclasses.replace(base, optm=dataclasses.replace(base.optm, select=OptmSelect.LAYER))))
    off = quantize(tiny.src, tiny.data, Config(quant=dataclasses.replace(base, optm=dataclasses.replace(base.optm, enabled=False))))
    assert net.optm is not None and lay.optm is None and off.optm is None
    assert "optm_select_s" in net.timings and "optm_select_s" not in lay.timings
    twins = lambda p: {lp.unit for lp in p.layers if any(a.scheme is Scheme.TWIN for a in lp.inputs)}  # noqa: E731
    assert twins(net.plan) == {d.unit for d in net.optm.decisions if d.chosen}
    assert not twins(off.plan)
    # the network choice only picks between the two layer-searched quantizers of each operand
    for lp in net.plan.layers:
        other = lay.plan.layer(lp.unit)
        if lp.unit in {d.unit for d in net.optm.decisions}:
            continue
        assert lp == other
    # the plan round-trips through JSON with the choice intact
    assert QuantPlan.from_json(net.plan.to_json()) == net.plan


def test_cli_optm_select_and_report(tmp_path, tiny):
    from onnx_mptq.cli import main
    from onnx_mptq.graph.io import save_model

    src = tmp_path / "m.onnx"
    save_model(tiny.src, src)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=random_images(32, seed=5))
    cfgf = tmp_path / "cfg.json"
    cfgf.write_text(json.dumps({"quant": {"search": {"grid_size": 10}, "optm": {"subset": 16}}}))
    out = tmp_path / "q.onnx"
    rep = tmp_path / "rep"
    rc = main(["quantize", str(src), "-o", str(out), "--calib", str(calib), "--w-bits", "4", "--a-bits", "4",
               "--config", str(cfgf), "--report", str(rep), "--plan-out", str(tmp_path / "plan.json"), "--providers", "cpu"])
    assert rc == 0 and out.exists()
    md = (rep / "report.md").read_text()
    assert "## OPT-m" in md and "eligible operands, chosen on the network on 16 calibration samples" in md
    js = json.loads((rep / "report.json").read_text())
    assert js["optm"]["eligible"] == 4 and js["optm"]["samples"] == 16
    plan = QuantPlan.from_json((tmp_path / "plan.json").read_text())
    assert sum(a.scheme is Scheme.TWIN for lp in plan.layers for a in lp.inputs) == js["optm"]["twins"]
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q2.onnx"), "--calib", str(calib), "--w-bits", "4",
               "--a-bits", "4", "--config", str(cfgf), "--optm-select", "layer", "--report", str(tmp_path / "rep2"),
               "--providers", "cpu"])
    assert rc == 0
    js2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert js2["optm"] is None
    assert "## OPT-m" in (tmp_path / "rep2" / "report.md").read_text()  # from the plan's per-layer notes


@pytest.mark.parametrize("bits", [4, 6])
def test_searched_ratios_fit_one_lattice(tiny, bits):
    from onnx_mptq.cli import _config_from, build_parser
    from onnx_mptq.numerics.twin import lattice_fits, lattice_max_m

    cfg = Config(quant=QuantConfig(w_bits=bits, a_bits=bits, search=ScaleSearchConfig(grid_size=20)))
    free = Config(quant=dataclasses.replace(cfg.quant, optm=OptmConfig(lattice=False)))
    ms = {}
    for name, c in (("lattice", cfg), ("free", free)):
        searched = search_scales(tiny.work, tiny.an, tiny.cap, c, source_digest=_digest(tiny.src), smoothing=tiny.splan,
                                 progress=False)
        plan, options = searched.plan, searched.twin_options
        assert options
        ms[name] = {n: o.twin.inputs[0].m for n, o in options.items()}
        if name == "lattice":
            for o in options.values():
                assert o.twin.inputs[0].m <= lattice_max_m(o.kind, bits)
                assert lattice_fits(o.twin.inputs[0].params())
            # every operand twin: still one integer matmul per unit
            twin_plan = dataclasses.replace(plan, layers=tuple(options[lp.unit].twin if lp.unit in options else lp
                                                               for lp in plan.layers))
            report = emit_from_plan(tiny.src, twin_plan).report
            assert sum(eu.matmuls for eu in report.units) == len(tiny.an.units)
        else:
            assert all(m <= free.quant.optm.max_m for m in ms[name].values())
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--optm-any-m"])
    assert _config_from(args).quant.optm.lattice is False
    assert _config_from(build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx"])).quant.optm.lattice is True
