"""Tests for megaret.config: YAML files, overrides, type checks, cross-field validation, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megaret.config import (
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    load_config,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))


def error_of(overrides, path=None) -> str:
    """The one-line ConfigError message raised by load_config(path, overrides)."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------------------------
# the YAML files


def test_config_dir_is_populated():
    names = {p.name for p in YAMLS}
    assert {"tiny.yaml", "1.3b.yaml", "2.7b.yaml", "6.7b.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.dir == f"runs/{path.stem}"
    cfg.validate_world(cfg.launch.world_size)  # the launch section fits the parallel layout
    written = save_config(cfg, tmp_path / "run")
    assert written == tmp_path / "run" / "config.yaml"
    assert load_config(written) == cfg
    assert load_config(tmp_path / "run") == cfg  # a run dir works too


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_sets_the_model_shape(path):
    # the shape is written out in the file rather than left to the schema defaults
    raw = yaml.safe_load(path.read_text())
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
        assert key in raw["model"], f"{path.name} does not set model.{key}"


TABLE7 = {
    # name: (layers, hidden, ffn, heads, lr)
    "1.3b": (24, 2048, 4096, 8, 6e-4),
    "2.7b": (32, 2560, 5120, 10, 3e-4),
    "6.7b": (32, 4096, 8192, 16, 3e-4),
}


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_retnet_paper_table7(name):
    path = CONFIG_DIR / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "RetNet" in first and "Table 7" in path.read_text().split("\nmodel:")[0]
    cfg = load_config(path)
    layers, hidden, ffn, heads, lr = TABLE7[name]
    m, o, t = cfg.model, cfg.optimizer, cfg.train
    assert (m.arch, m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_heads) == (
        "retnet", layers, hidden, ffn, heads,
    )  # fmt: skip
    assert o.lr == pytest.approx(lr)
    assert (m.ffn_type, m.value_factor, m.vocab_size, m.dropout, m.chunk_size) == ("gelu", 2, 32000, 0.1, 256)
    assert o.betas == [0.9, 0.98]
    assert (o.weight_decay, o.eps, o.warmup_steps, o.decay_style, o.clip_grad) == (
        0.01, 1e-8, 375, "polynomial", 2.0,
    )  # fmt: skip
    assert (cfg.data.seq_length, t.steps, t.precision) == (2048, 25000, "bf16")
    assert t.global_batch_size * cfg.data.seq_length == 2048 * 2048  # 4M tokens per step
    assert cfg.launch.gpus_per_node == 8


def test_parallel_layouts_of_the_paper_configs():
    six = load_config(CONFIG_DIR / "6.7b.yaml")
    assert (six.parallel.tensor, six.parallel.pipeline, six.parallel.zero_stage) == (4, 2, 1)
    assert (six.launch.nodes, six.launch.cpus_per_task, six.launch.time_min) == (4, 8, 2880)
    assert six.validate_world(32) == 4
    assert load_config(CONFIG_DIR / "2.7b.yaml").parallel.tensor == 2
    assert load_config(CONFIG_DIR / "1.3b.yaml").parallel.tensor == 1


def test_tiny_is_tiny():
    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    m = cfg.model
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.ffn_hidden_size, m.chunk_size) == (
        512, 64, 2, 4, 128, 16,
    )  # fmt: skip
    assert (cfg.data.seq_length, cfg.train.precision, cfg.train.steps) == (64, "fp32", 20)
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (2, 4)
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps) == (3e-3, 5)
    assert (cfg.launch.nodes, cfg.launch.gpus_per_node, cfg.launch.tasks_per_node) == (1, 1, 1)
    assert cfg.launch.cpus_per_task == 2


# --------------------------------------------------------------------------------------------
# defaults and required keys


def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.arch == "retnet" and cfg.model.hidden_size == 2048
    assert cfg.optimizer.betas == [0.9, 0.98]
    assert cfg.launch.resolved_tasks_per_node == 8 and cfg.launch.world_size == 8
    assert cfg.data.paths == [] and cfg.data.weights is None


def test_required_keys_exist():
    cfg = load_config(None)
    assert cfg.parallel.tensor == 1
    assert cfg.parallel.pipeline == 1
    assert cfg.parallel.zero_stage == 1
    assert cfg.train.steps == 25000
    assert cfg.train.seed == 1234
    assert cfg.run.dir == "runs/default"
    d = cfg.to_dict()
    for section, key in [("parallel", "tensor"), ("parallel", "pipeline"), ("parallel", "zero_stage"),
                         ("train", "steps"), ("train", "seed"), ("run", "dir")]:  # fmt: skip
        assert key in d[section]


# --------------------------------------------------------------------------------------------
# overrides


def test_overrides_of_every_type():
    cfg = load_config(
        None,
        [
            "model.num_layers=4",  # int
            "optimizer.lr=1e-3",  # float in exponent form (a str to PyYAML)
            "model.norm_eps=1",  # int accepted for float
            "model.tie_embeddings=true",  # bool
            "optimizer.betas=[0.9,0.95]",  # list[float]
            "data.paths=[a.tar, b.tar]",  # list[str]
            "data.weights=[1, 2.5]",  # list[float] | None
            "launch.partition=gpu",  # str | None
            "run.name=123",  # a string field gets the raw text
            "launch.mem_gb=64",
            "launch.mem_gb=null",  # null, and later overrides win
            "parallel.virtual_pipeline=null",
            "launch.extra_sbatch={exclusive: ''}",  # dict
            "launch.extra_sbatch.gres=gpu:8",  # one entry of a dict
        ],
    )
    assert cfg.model.num_layers == 4
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.norm_eps == 1.0 and isinstance(cfg.model.norm_eps, float)
    assert cfg.model.tie_embeddings is True
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.data.paths == ["a.tar", "b.tar"]
    assert cfg.data.weights == [1.0, 2.5]
    assert cfg.launch.partition == "gpu"
    assert cfg.run.name == "123"
    assert cfg.launch.mem_gb is None
    assert cfg.parallel.virtual_pipeline is None
    assert cfg.launch.extra_sbatch == {"exclusive": "", "gres": "gpu:8"}


def test_later_override_wins_and_overrides_beat_the_file():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["train.steps=7", "train.steps=9", "run.dir=/tmp/x"])
    assert cfg.train.steps == 9
    assert cfg.run.dir == "/tmp/x"
    assert cfg.model.hidden_size == 64  # the rest of the file is kept


def test_override_fixes_a_bad_file_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: ten\n")
    assert "train.steps: expected int, got str 'ten'" in error_of([], path)
    assert load_config(path, ["train.steps=10"]).train.steps == 10


def test_bad_override_syntax():
    msg = error_of(["model.num_layers 4"])
    assert msg == "'model.num_layers 4': overrides look like section.key=value"
    assert "overrides look like section.key=value" in error_of(["num_layers=4"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.num_layer=4", "model.num_layer: unknown key; did you mean model.num_layers?"),
        ("modle.num_layers=4", "modle.num_layers: unknown key; did you mean model.num_layers?"),
        ("train.lr=1e-3", "train.lr: unknown key; did you mean optimizer.lr?"),
        ("train.micro_batch=2", "did you mean train.micro_batch_size?"),
        ("run.directory=x", "run.directory: unknown key; run has dir, name"),
        ("launch.partition.x=1", "launch.partition.x: unknown key"),
    ],
)
def test_unknown_override_keys(override, expected):
    msg = error_of([override])
    assert msg.startswith(override.split("=")[0] + ": unknown key")
    assert expected in msg


def test_unknown_keys_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layer: 4\n")
    msg = error_of([], path)
    assert msg == f"{path}: model.num_layer: unknown key; did you mean model.num_layers?"
    path.write_text("modle:\n  num_layers: 4\n")
    assert error_of([], path) == f"{path}: modle: unknown section; did you mean model?"
    path.write_text("model: 4\n")
    assert "model: expected a mapping" in error_of([], path)
    path.write_text("model: [1, 2\n")
    assert f"{path}: invalid YAML" in error_of([], path)
    assert "config file not found" in error_of([], tmp_path / "missing.yaml")


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()
    path.write_text("model:\ntrain:\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=ten", "train.steps: expected int, got str 'ten'"),
        ("train.steps=true", "train.steps: expected int, got bool True"),
        ("train.steps=4.5", "train.steps: expected int, got float 4.5"),
        ("optimizer.lr=fast", "optimizer.lr: expected float, got str 'fast'"),
        ("optimizer.lr=true", "optimizer.lr: expected float, got bool True"),
        ("model.tie_embeddings=1", "model.tie_embeddings: expected bool, got int 1"),
        ("optimizer.betas=[0.9, x]", "optimizer.betas[1]: expected float, got str 'x'"),
        ("optimizer.betas=0.9", "optimizer.betas: expected list of float, got float 0.9"),
        ("data.paths=[1, a]", "data.paths[0]: expected str, got int 1"),
        ("data.weights=3", "data.weights: expected list of float or null, got int 3"),
        ("launch.mem_gb=lots", "launch.mem_gb: expected int or null, got str 'lots'"),
        ("train.steps=null", "train.steps: expected int, got null"),
        ("launch.extra_sbatch=[1]", "launch.extra_sbatch: expected mapping of str to str, got list [1]"),
        ("launch.extra_sbatch={a: [1]}", "launch.extra_sbatch.a: expected str, got list [1]"),
    ],
)
def test_wrong_types(override, expected):
    assert error_of([override]).startswith(expected)


# --------------------------------------------------------------------------------------------
# per-section and cross-field validation


def test_choices():
    assert error_of(["model.ffn_type=relu"]) == "model.ffn_type: 'relu' is not one of gelu, swiglu"
    assert "model.arch: 'gpt' is not one of retnet, transformer, sliding, brt" in error_of(["model.arch=gpt"])
    assert "train.precision" in error_of(["train.precision=fp16"])
    assert "parallel.zero_stage=4 is not one of 0, 1, 2, 3" in error_of(["parallel.zero_stage=4"])
    assert load_config(None, ["model.arch=brt", "model.norm_type=rmsnorm"]).model.arch == "brt"


@pytest.mark.parametrize(
    "override",
    ["model.hidden_size=0", "train.steps=0", "launch.gpus_per_node=0", "parallel.tensor=-1",
     "train.micro_batch_size=0", "checkpoint.keep_every=0", "optimizer.lr=0"],
)  # fmt: skip
def test_positive_sizes(override):
    key = override.split("=")[0]
    assert error_of([override]).startswith(key + "=")


def test_heads_not_divisible_by_tensor():
    msg = error_of(["model.hidden_size=2560", "model.num_heads=10", "parallel.tensor=4"])
    expected = (
        "model.num_heads=10 is not divisible by parallel.tensor=4; choose parallel.tensor from 1, 2, 5, 10"
    )
    assert msg == expected


def test_layers_not_divisible_by_pipeline():
    msg = error_of(["model.num_layers=24", "parallel.pipeline=5"])
    assert "model.num_layers=24 is not divisible by parallel.pipeline=5" in msg
    assert "choose parallel.pipeline from 1, 2, 3, 4, 6, 8, 12, 24" in msg
    msg = error_of(["model.num_layers=24", "parallel.pipeline=4", "parallel.virtual_pipeline=4"])
    assert "parallel.pipeline*parallel.virtual_pipeline=4*4=16" in msg
    assert "1, 2, 3, 4, 6, 8, 12, 24" in msg
    cfg = load_config(None, ["model.num_layers=24", "parallel.pipeline=4", "parallel.virtual_pipeline=3"])
    assert cfg.parallel.virtual_pipeline == 3
    assert "parallel.pipeline > 1" in error_of(["parallel.virtual_pipeline=2"])


def test_seq_length_multiple_of_chunk():
    msg = error_of(["data.seq_length=1000", "model.chunk_size=256"])
    assert msg == (
        "data.seq_length=1000 is not a multiple of model.chunk_size=256; set data.seq_length to a multiple "
        "(e.g. 1024) or change model.chunk_size"
    )
    # the chunk size does not constrain the parallel form
    cfg = load_config(None, ["data.seq_length=1000", "model.retention_mode=parallel"])
    assert cfg.data.seq_length == 1000


def test_hidden_divisible_by_heads():
    msg = error_of(["model.hidden_size=100", "model.num_heads=8"])
    assert "model.hidden_size=100 is not divisible by model.num_heads=8" in msg
    assert "choose model.num_heads from 1, 2, 4, 5, 10, 20, 25, 50, 100" in msg


@pytest.mark.parametrize("key, value, fix", [("vocab_size", 32001, 32002), ("ffn_hidden_size", 4097, 4098)])
def test_vocab_and_ffn_divisible_by_tensor(key, value, fix):
    msg = error_of([f"model.{key}={value}", "parallel.tensor=2"])
    assert f"model.{key}={value} is not divisible by parallel.tensor=2" in msg
    assert f"set model.{key} to a multiple of 2 (e.g. {fix})" in msg


def test_global_batch_divisible_by_micro():
    msg = error_of(["train.global_batch_size=10", "train.micro_batch_size=4"])
    assert "train.global_batch_size=10 is not divisible by train.micro_batch_size=4" in msg
    assert "(e.g. 12)" in msg


def test_zero_stage_with_pipeline():
    msg = error_of(["parallel.zero_stage=2", "parallel.pipeline=2"])
    assert msg == (
        "parallel.zero_stage=2 cannot run under a pipeline schedule (parallel.pipeline=2): DeepSpeed "
        "ZeRO-2/3 reduce gradients inside each micro-batch; use parallel.zero_stage=1 or parallel.pipeline=1"
    )
    assert "parallel.zero_stage=3" in error_of(["parallel.zero_stage=3", "parallel.pipeline=4"])
    assert load_config(None, ["parallel.zero_stage=3"]).parallel.zero_stage == 3
    assert load_config(None, ["parallel.zero_stage=0", "parallel.pipeline=2"]).parallel.pipeline == 2


def test_sequence_parallel_needs_tensor():
    msg = error_of(["parallel.sequence_parallel=true"])
    assert "parallel.sequence_parallel" in msg and "parallel.tensor > 1" in msg
    cfg = load_config(None, ["parallel.sequence_parallel=true", "parallel.tensor=2"])
    assert cfg.parallel.sequence_parallel is True


def test_optimizer_and_data_rules():
    assert "optimizer.betas" in error_of(["optimizer.betas=[0.9]"])
    assert "optimizer.betas" in error_of(["optimizer.betas=[0.9, 1.0]"])
    msg = error_of(["data.paths=[a]", "data.weights=[1, 2]"])
    assert "data.weights has 2 entries but data.paths has 1" in msg
    assert "optimizer.min_lr" in error_of(["optimizer.min_lr=1", "optimizer.lr=0.1"])


def test_validate_world():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=8"])
    assert cfg.validate_world(8) == 2
    assert cfg.validate_world(16) == 4
    msg = str(pytest.raises(ConfigError, cfg.validate_world, 6).value)
    assert "world size 6 is not divisible by parallel.tensor*parallel.pipeline=2*2=4" in msg
    assert "\n" not in msg
    cfg = load_config(None, ["train.global_batch_size=6", "train.micro_batch_size=2"])
    msg = str(pytest.raises(ConfigError, cfg.validate_world, 2).value)
    assert "train.global_batch_size=6 is not divisible by" in msg
    assert "train.micro_batch_size*data-parallel size=2*2=4" in msg
    assert "\n" not in msg and "(e.g. 8)" in msg


def test_direct_construction_validates_and_validate_rechecks():
    with pytest.raises(ConfigError, match="model.num_heads=8 is not divisible by parallel.tensor=3"):
        Config(parallel=ParallelConfig(tensor=3))
    with pytest.raises(ConfigError, match="model.ffn_type"):
        ModelConfig(ffn_type="relu")
    cfg = Config()
    cfg.model.num_heads = 7
    with pytest.raises(ConfigError, match="model.hidden_size=2048 is not divisible by model.num_heads=7"):
        cfg.validate()


# --------------------------------------------------------------------------------------------
# saving


def test_save_config_writes_run_dir_config_yaml(tmp_path):
    cfg = load_config(None, ["optimizer.lr=1e-3", "launch.extra_sbatch.gres=gpu:8", "run.name=x"])
    run_dir = tmp_path / "deep" / "run"
    path = save_config(cfg, run_dir)
    assert path == run_dir / "config.yaml" and path.is_file()
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]  # no temp file left behind
    data = yaml.safe_load(path.read_text())
    assert data["optimizer"]["lr"] == pytest.approx(1e-3)
    assert data == cfg.to_dict()
    assert load_config(path) == cfg
    assert Config.from_dict(data) == cfg


def test_print_config_lists_every_key_with_its_value_type_and_description(capsys):
    """`python -m megaret.train --print-config [--config X] [overrides]`: every key of the schema,
    each with a one-line description taken from the schema's comments, and its default where the
    value differs."""
    from megaret.config.describe import config_rows
    from megaret.config.loader import _all_keys
    from megaret.train.__main__ import main

    rows = config_rows(load_config())
    assert [r[0] for r in rows] == _all_keys()
    assert [key for key, _, _, doc, _ in rows if not doc] == []  # a new key needs its comment in schema.py
    assert all(value == default for _, value, _, _, default in rows)  # no --config: the defaults
    assert main(["--print-config", "--config", "configs/tiny.yaml", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "train.steps = 7    (int; default 25000)\n    optimizer steps" in out
    assert "model.arch = retnet    (one of retnet, transformer, sliding, brt)" in out
    assert out.count("\n    ") == len(rows)
