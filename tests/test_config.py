"""The config tree: nesting, enums, pins, dotted-path errors, and the CLI mapping onto it (no drift)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import typing
from pathlib import Path

import pytest

from onnx_mptq.cli import CONFIG_FILE_ONLY, NOT_CONFIG, _config_from, build_parser
from onnx_mptq.config import (
    CalibConfig,
    Config,
    MixedConfig,
    OptmConfig,
    OptmSelect,
    Pin,
    QuantConfig,
    ScaleMethod,
    ScaleSearchConfig,
    SensitivityMetric,
    leaf_paths,
)
from onnx_mptq.errors import ConfigError, MptqError, clip, quote
from onnx_mptq.plan import WeightContainer

PKG = Path(__file__).resolve().parents[1] / "onnx_mptq"


def _get(cfg: Config, path: str):
    v = cfg
    for part in path.split("."):
        v = getattr(v, part)
    return v


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def _actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


# ---------------------------------------------------------------------------------------------
# no drift between the config tree and the command line


def test_every_flag_is_a_config_field_or_declared_not_config():
    parser = build_parser()
    paths = set(leaf_paths())
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for a in _actions(sub):
            assert a.dest in paths or a.dest in NOT_CONFIG, (
                f"{name} {a.option_strings or a.dest}: dest {a.dest!r} is neither a config path nor in cli.NOT_CONFIG")


def test_every_config_field_has_a_flag_or_is_declared_config_file_only():
    parser = build_parser()
    flagged = {a.dest for sub in _subparsers(parser).values() for a in _actions(sub)}
    paths = leaf_paths()
    for path in paths:
        assert (path in flagged) != (path in CONFIG_FILE_ONLY), (
            f"{path}: " + ("has a flag and is listed as config-file-only" if path in flagged
                           else "has no flag; add one or list it in cli.CONFIG_FILE_ONLY"))
    assert CONFIG_FILE_ONLY <= set(paths), sorted(CONFIG_FILE_ONLY - set(paths))
    assert not NOT_CONFIG & set(paths)


# a value other than the default for every flag that takes one (store_const flags need none)
SAMPLE = {
    "runtime.providers": "cpu", "runtime.threads": "2", "runtime.batch_size": "7",
    "calib.limit": "5", "calib.batch_size": "3", "seed": "11",
    "smooth.alpha": "0.25", "smooth.shift": "midpoint",
    "quant.w_bits": "4", "quant.a_bits": "6", "quant.search.method": "percentile",
    "quant.optm.max_bits": "5", "quant.optm.select": "layer", "quant.emission.weight_container": "int8", "quant.emission.weight_storage": "int4",
    "quant.emission.graph_form": "verbose", "quant.emission.constant_storage": "float16",
    "mixed.target_bits": "5", "mixed.target_size_mb": "1.5", "mixed.candidates": "4,8", "mixed.keep": "8:*head*",
    "quant.compensate.damp": "0.05", "quant.compensate.ridge": "0.5", "quant.compensate.inputs": "sequential",
}
EXPECTED = {
    "runtime.threads": 2, "runtime.batch_size": 7, "calib.limit": 5, "calib.batch_size": 3, "seed": 11,
    "smooth.alpha": 0.25, "quant.w_bits": 4, "quant.a_bits": 6, "quant.optm.max_bits": 5,
    "mixed.target_bits": 5.0, "mixed.target_size_mb": 1.5, "mixed.candidates": (4, 8), "mixed.keep": (Pin(8, "*head*"),),
    "quant.compensate.damp": 0.05, "quant.compensate.ridge": 0.5,
}


@pytest.mark.parametrize("command", ["quantize", "smooth", "demo", "evaluate", "export"])
def test_each_flag_sets_the_field_its_dest_names(command):
    sub = _subparsers(build_parser())[command]
    base = {"quantize": ["m.onnx", "-o", "q.onnx"], "smooth": ["m.onnx", "-o", "q.onnx", "--calib", "c.npz"],
            "demo": [], "evaluate": ["m.onnx", "--data", "d.npz"], "export": ["vit", "-o", "v.onnx"]}[command]
    assert _config_from(build_parser().parse_args([command, *base])) == Config()  # no flags: the defaults
    paths = set(leaf_paths())
    for a in _actions(sub):
        if a.dest not in paths:
            continue
        flag = a.option_strings[-1]
        mixed = ["--target-bits", "5"] if a.dest.startswith("mixed.") and a.dest not in ("mixed.target_bits", "mixed.target_size_mb") else []
        argv = [flag] if isinstance(a, argparse._StoreConstAction) else [flag, SAMPLE[a.dest]]
        cfg = _config_from(build_parser().parse_args([command, *base, *mixed, *argv]))
        got, default = _get(cfg, a.dest), _get(Config(), a.dest)
        assert got != default, f"{command} {flag}: {a.dest} stayed {default!r}"
        if isinstance(a, argparse._StoreConstAction):
            assert got == a.const
        elif a.dest in EXPECTED:
            assert got == EXPECTED[a.dest]
        else:
            assert isinstance(got, enum.Enum) and got.value == SAMPLE[a.dest]


def test_flags_override_the_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"quant": {"w_bits": 5, "optm": {"z": 3.0}}, "runtime": {"threads": 3}}))
    cfg = _config_from(build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--config", str(f), "--w-bits", "6"]))
    assert cfg.quant.w_bits == 6 and cfg.quant.optm.z == 3.0
    assert cfg.runtime.threads == 3  # the file's runtime section is not reset by the flags' absence


def test_a_budget_implies_mixed_precision_and_pins_need_it():
    p = build_parser()
    base = ["quantize", "m.onnx", "-o", "q.onnx"]
    assert _config_from(p.parse_args([*base, "--target-bits", "5"])).mixed.enabled
    assert _config_from(p.parse_args([*base, "--target-size", "2"])).mixed.enabled
    help_text = " ".join(_subparsers(p)["quantize"].format_help().split())
    assert help_text.count("implies --mixed-precision") == 2
    with pytest.raises(ConfigError, match="mixed.target_bits"):
        _config_from(p.parse_args([*base, "--mixed-precision"]))
    for extra in (["--keep", "8:*head*"], ["--candidates", "4,8"]):
        with pytest.raises(ConfigError, match=f"{extra[0]} applies to mixed precision only"):
            _config_from(p.parse_args([*base, *extra]))


def test_every_flag_has_one_line_of_help_with_its_default():
    parser = build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for a in _actions(sub):
            if a.dest in ("help", "version"):
                continue
            assert a.help and "\n" not in a.help, f"{name} {a.option_strings or a.dest}: no help"
            if a.option_strings and not a.required:
                assert "default" in a.help, f"{name} {a.option_strings}: help does not give the default"


def test_help_quotes_the_config_defaults():
    text = " ".join(_subparsers(build_parser())["quantize"].format_help().split())
    d = Config()
    for flag, value in (("--w-bits", d.quant.w_bits), ("--optm-max-bits", d.quant.optm.max_bits),
                        ("--calib-batch-size", d.calib.batch_size), ("--batch-size", d.runtime.batch_size)):
        assert f"(default: {value})" in text.split(flag, 2)[-1].split(" --", 1)[0], flag


# ---------------------------------------------------------------------------------------------
# the tree itself


def test_round_trip_through_json_and_dotted_paths():
    cfg = Config.from_dict({"quant": {"search": {"method": "minmax", "grid_size": 10}, "optm": {"select": "layer"},
                                      "emission": {"weight_container": "uint8"}},
                            "mixed": {"keep": ["8:*head*", "6:fc2"], "metric": "kl"}, "capture": {"tokens_per_layer": 64}})
    assert cfg.quant.search.method is ScaleMethod.MINMAX and cfg.quant.optm.select is OptmSelect.LAYER
    assert cfg.quant.emission.weight_container is WeightContainer.UINT8
    assert cfg.mixed.keep == (Pin(8, "*head*"), Pin(6, "fc2")) and cfg.mixed.metric is SensitivityMetric.KL
    doc = cfg.to_dict()
    assert doc["mixed"]["keep"] == ["8:*head*", "6:fc2"] and doc["quant"]["emission"]["weight_container"] == "uint8"
    assert Config.from_dict(json.loads(json.dumps(doc))) == cfg
    assert cfg.with_value("quant.optm.enabled", False).quant.optm == dataclasses.replace(cfg.quant.optm, enabled=False)
    with pytest.raises(ConfigError, match=r"unknown config key quant\.optm\.enable "):
        cfg.with_value("quant.optm.enable", False)


@pytest.mark.parametrize("doc,message", [
    ({"quant": {"optm": {"max_m": 20}}}, "quant.optm.max_m must be an integer from 0 to 16, got 20"),
    ({"quant": {"search": {"grid_size": 1}}}, "quant.search.grid_size must be an integer >= 2, got 1"),
    ({"quant": {"search": {"method": "best"}}}, "quant.search.method must be one of mse, minmax, percentile, got 'best'"),
    ({"quant": {"emission": {"weight_container": "int4"}}}, "quant.emission.weight_container must be one of auto, int8, uint8"),
    ({"mixed": {"metric": "mse"}}, "mixed.metric must be one of nmse, kl, got 'mse'"),
    ({"mixed": {"keep": ["head"]}}, "mixed.keep entries must look like BITS:GLOB"),
    ({"mixed": {"keep": ["9:head"]}}, "mixed.keep entries must look like BITS:GLOB with BITS from 2 to 8, got '9:head'"),
    ({"capture": {"tokens_per_layer": 8}}, "capture.tokens_per_layer must be an integer >= 16, got 8"),
    ({"quant": {"optm_z": 1.0}}, "unknown config key quant.optm_z"),
    ({"quant": {"optm": True}}, "quant.optm must be an object"),
])
def test_errors_name_the_dotted_path(doc, message):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(doc)
    assert message in str(e.value)


def test_enum_fields_take_their_values_and_sections_their_types():
    hints = {}
    for cls in (ScaleSearchConfig, OptmConfig, MixedConfig, CalibConfig):
        hints.update({(cls, k): v for k, v in typing.get_type_hints(cls).items()})
    enums = [(cls, k, tp) for (cls, k), tp in hints.items() if isinstance(tp, type) and issubclass(tp, enum.Enum)]
    assert len(enums) == 3  # method, select, metric
    for cls, name, tp in enums:
        member = list(tp)[-1]
        assert getattr(cls(**{name: member.value}), name) is member
    assert QuantConfig().emission.weight_container is WeightContainer.AUTO
    with pytest.raises(ConfigError, match=r"quant\.optm must be a OptmConfig"):
        QuantConfig(optm=False)  # the old flat boolean


def test_pin_has_one_parser():
    p = Pin.parse("8:*head*")
    assert (p.bits, p.pattern, str(p)) == (8, "*head*", "8:*head*")
    assert p.matches("x", "head") and p.matches("/blocks.0/head", "fc1") and not p.matches("fc1", "fc1")
    for bad in ("head", "x:head", "9:head", "8:"):
        with pytest.raises(ConfigError, match="mixed.keep"):
            Pin.parse(bad)
    assert MixedConfig(keep=("6:fc*",)).keep == (Pin(6, "fc*"),)
    # nowhere else in the package splits a BITS:GLOB string
    hits = sorted({str(f.relative_to(PKG)) for f in PKG.rglob("*.py") for line in f.read_text().splitlines()
                   if 'partition(":")' in line and any(w in line.lower() for w in ("keep", "pin", "bits"))})
    assert hits == ["config.py"], hits
    assert not any("def parse_pins" in f.read_text() for f in PKG.rglob("*.py"))


def test_error_messages_are_capped():
    long = {"scales": [0.001234567] * 2000}
    msg = str(ConfigError(f"plan: layer x: cannot read {long!r}"))
    assert len(msg) <= 650 and "\n" not in msg and msg.startswith("plan: layer x") and "chars]" in msg
    assert len(quote("y" * 10_000)) < 200
    assert clip("short", 10) == "short"
    assert issubclass(ConfigError, MptqError)
