"""Command-line overrides of config.py's constants."""

import pytest

import config
from config import UserError


def test_defaults_are_the_constants_in_lower_case():
    assert config.load([])["max_steps"] == config.MAX_STEPS
    assert config.load([])["out_dir"] == "checkpoints"


def test_key_equals_value_and_key_space_value_both_override():
    assert config.load(["--max_steps=500"])["max_steps"] == 500
    assert config.load(["--max_steps", "500"])["max_steps"] == 500


def test_values_take_the_type_of_the_constant():
    cfg = config.load(["--learning_rate=1e-3", "--max_steps=2e3", "--dataset=data.txt", "--compile=true"])
    assert cfg["learning_rate"] == 1e-3 and cfg["max_steps"] == 2000 and isinstance(cfg["max_steps"], int)
    assert cfg["dataset"] == "data.txt" and cfg["compile"] is True
    assert config.load(["--learning_rate=1"])["learning_rate"] == 1.0


def test_a_bare_flag_sets_a_boolean_to_true():
    assert config.load(["--greedy", "--max_steps=3"])["greedy"] is True
    assert config.load(["--resume=False"])["resume"] is False


def test_an_unknown_key_names_the_closest_valid_one():
    with pytest.raises(UserError, match="did you mean --max_steps"):
        config.load(["--max_step=5"])


def test_a_value_of_the_wrong_type_is_refused():
    with pytest.raises(UserError, match="--max_steps takes an int"):
        config.load(["--max_steps=ten"])
    with pytest.raises(UserError, match="--max_steps takes an int"):
        config.load(["--max_steps=2.5"])
    with pytest.raises(UserError, match="True or False"):
        config.load(["--resume=maybe"])


def test_a_key_without_a_value_is_refused():
    with pytest.raises(UserError, match="needs a value"):
        config.load(["--max_steps"])


def test_a_positional_argument_is_refused():
    with pytest.raises(UserError, match="--key=value"):
        config.load(["500"])


def test_every_setting_has_a_group_and_a_comment_in_config_py():
    documented = {name: note for settings in config.documented().values() for name, note in settings}
    assert set(documented) == {k for k in vars(config) if k.isupper()}
    assert all(note.strip() for note in documented.values())


@pytest.mark.parametrize("script, flag", [("train.py", "--help"), ("sample.py", "-h"), ("bench.py", "--help")])
def test_help_lists_the_settings_a_command_reads_with_their_defaults_and_exits_0(script, flag):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(config.__file__).parent
    done = subprocess.run([sys.executable, script, flag], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert f"--device={config.DEVICE}" in done.stdout  # every one of them reads the device
    # train.py samples from the prompt while it trains (SAMPLE_INTERVAL); bench.py reads no prompt
    assert f"--prompt={config.PROMPT}" in done.stdout if script != "bench.py" else "--prompt" not in done.stdout
    if script == "train.py":  # each with config.py's own comment on it
        assert f"--max_steps={config.MAX_STEPS}" in done.stdout and "optimizer steps in all" in done.stdout


def test_check_leaves_the_inherited_settings_to_init_from_unless_named():
    argv = ["--init_from=run", "--n_layer=2"]
    cfg = config.load(argv)
    config.check(cfg, argv, inherited=("n_layer", "n_head"))
    assert cfg["n_layer"] == 2 and cfg["n_head"] is None
