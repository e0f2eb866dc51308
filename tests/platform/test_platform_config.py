"""Configs: TOML loading, validation messages, the resolved-config round trip, schedules and the CI formula."""
import math

import pytest
import scipy.stats

from metaray.platform import ConfigError, ExperimentConfig, OuterConfig, learning_rate, load_config, loads_config, mean_ci95

BASE = """
name = "t"
[problem]
name = "sinusoid"
shots = 5
[solver]
name = "maml"
inner_steps = 2
inner_lr = 0.05
[outer]
optimizer = "sgd"
lr = 0.1
momentum = 0.9
[run]
steps = 7
"""


def test_loads_and_resolved_round_trip(tmp_path):
    cfg = loads_config(BASE)
    assert cfg.problem.options == {"shots": 5}
    assert cfg.solver.options == {"inner_steps": 2, "inner_lr": 0.05}
    assert cfg.outer.optimizer == "sgd" and cfg.outer.momentum == 0.9 and cfg.run.steps == 7
    assert cfg.tasks.test_tasks == 600  # the literature's default meta-test size
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again == cfg
    assert again.to_dict()["outer"]["betas"] == [0.9, 0.999]


def test_int_is_accepted_for_float_and_overrides():
    cfg = loads_config(BASE).replace(**{"outer.lr": 1, "run.steps": 3, "solver.inner_steps": 4})
    assert cfg.outer.lr == 1.0 and isinstance(cfg.outer.lr, float)
    assert cfg.run.steps == 3 and cfg.solver.options["inner_steps"] == 4


@pytest.mark.parametrize(
    "text, needle",
    [
        (BASE + "[tasks]\nmeta_bach_size = 3\n", "unknown key 'meta_bach_size' in [tasks]; did you mean 'meta_batch_size'?"),
        (BASE.replace("[run]", "[rnu]"), "unknown key 'rnu' in top level; did you mean 'run'?"),
        (BASE.replace("inner_lr = 0.05", "inner_rl = 0.05"), "'inner_rl' (did you mean 'inner_lr'?)"),
        (BASE.replace("shots = 5", "shot = 5"), "unknown option 'shot' for problem 'sinusoid' (did you mean 'shots'?)"),
        (BASE.replace('name = "maml"', 'name = "mmal"'), "unknown solver 'mmal' (did you mean 'maml'?)"),
        (BASE.replace('name = "sinusoid"', 'name = "sinusiod"'), "unknown problem 'sinusiod' (did you mean 'sinusoid'?)"),
    ],
)
def test_unknown_keys_suggest_the_nearest(text, needle):
    with pytest.raises(ConfigError) as e:
        loads_config(text)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        (BASE.replace("steps = 7", 'steps = "7"'), "run.steps must be int, got '7' (str)"),
        (BASE.replace("steps = 7", "steps = 7.5"), "run.steps must be int, got 7.5 (float)"),
        (BASE.replace("lr = 0.1", "lr = true"), "outer.lr must be float, got True (bool)"),
        (BASE + "[cluster]\naddress = 5\n", "cluster.address must be str or none, got 5"),
        (BASE.replace("inner_steps = 2", 'inner_steps = "2"'), "option 'inner_steps' must be int"),
    ],
)
def test_wrong_types_are_named(text, needle):
    with pytest.raises(ConfigError) as e:
        loads_config(text)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        (BASE.replace("lr = 0.1", "lr = -0.1"), "outer.lr must be > 0, got -0.1"),
        (BASE.replace('optimizer = "sgd"', 'optimizer = "adma"'), "outer.optimizer must be one of ['sgd', 'adam', 'adamw'], got 'adma' (did you mean 'adam'?)"),
        (BASE.replace("momentum = 0.9", "momentum = 1.5"), "outer.momentum must be in [0, 1), got 1.5"),
        (BASE + "[tasks]\nmeta_batch_size = 0\n", "tasks.meta_batch_size must be > 0, got 0"),
        (BASE + "[cluster]\nstrategy = \"SPREDA\"\n", "cluster.strategy must be one of"),
        (BASE.replace("inner_lr = 0.05", "inner_lr = 0.0"), "option 'inner_lr' must be > 0, got 0.0"),
        (BASE.replace("lr = 0.1", "lr = inf"), "outer.lr must be finite"),
        (BASE.replace('name = "t"', 'name = "a b"'), "name must be a non-empty string without spaces"),
        (BASE + "[cluster]\ntask_threads = 2\n", "cluster.task_threads=2 computes a call's tasks in parallel, but "
         "tasks_per_batch=1 sends one task per call"),
    ],
)
def test_bad_values_are_named(text, needle):
    with pytest.raises(ConfigError) as e:
        loads_config(text)
    assert needle in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text(BASE + "[tasks]\nmeta_bach_size = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'meta_bach_size'"):
        load_config(bad)


def test_schedules_match_their_formulas():
    lr0 = 0.1
    cos = OuterConfig(lr=lr0, schedule="cosine", min_lr=0.01, warmup_steps=10)
    assert learning_rate(cos, 0, 110) == pytest.approx(lr0 / 10)        # linear warm-up from lr/warmup
    assert learning_rate(cos, 9, 110) == pytest.approx(lr0)
    assert learning_rate(cos, 10, 110) == pytest.approx(lr0)            # cosine starts at lr
    assert learning_rate(cos, 60, 110) == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cos, 110, 110) == pytest.approx(0.01)          # ... and ends at min_lr
    step = OuterConfig(lr=lr0, schedule="step", decay_every=5, gamma=0.5)
    assert [learning_rate(step, t, 100) for t in (0, 4, 5, 12)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    exp = OuterConfig(lr=lr0, schedule="exponential", decay_every=10, gamma=0.5)
    assert learning_rate(exp, 5, 100) == pytest.approx(0.1 * 0.5**0.5)


def test_ci95_matches_the_normal_interval():
    values = [0.2, 0.4, 0.5, 0.9, 0.7, 0.3]
    mean, ci = mean_ci95(values)
    sem = scipy.stats.sem(values)
    assert mean == pytest.approx(sum(values) / 6)
    assert ci == pytest.approx(1.96 * sem)
