from pathlib import Path

import pytest

from course_utils.core.config import REPO_ROOT, ConfigError, available_specs, load_config


def test_shipped_specs_load_and_smoke_inherits_default() -> None:
    assert {"default", "smoke", "full"} <= set(available_specs())
    default = load_config("default", environ={})
    smoke = load_config("smoke", environ={})
    assert smoke.spec == "smoke" and smoke.smoke and not default.smoke
    assert smoke.train.epochs_head < default.train.epochs_head
    assert smoke.model.backbone == default.model.backbone  # inherited, not restated


def test_precedence_spec_then_environment_then_overrides() -> None:
    env = {"COURSE_TRAIN__EPOCHS_HEAD": "7", "COURSE_TRAIN__LR_HEAD": "0.01"}
    config = load_config("default", {"train.epochs_head": 9}, environ=env)
    assert config.train.epochs_head == 9
    assert config.train.lr_head == pytest.approx(0.01)


def test_relative_paths_resolve_against_the_repository() -> None:
    config = load_config("default", environ={"COURSE_WORKSPACE": "ws", "COURSE_DATA_CACHE": "../shared/data"})
    assert config.workspace == (REPO_ROOT / "ws").resolve()
    assert config.data_cache == (REPO_ROOT / "../shared/data").resolve()


def test_nested_overrides_are_accepted() -> None:
    assert load_config("default", {"engine": {"batch_opt": 2}}, environ={}).engine.batch_opt == 2


def test_unknown_setting_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs_head'"):
        load_config("default", {"train.epoch_head": 1}, environ={})


def test_invalid_values_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="engine"):
        load_config("default", {"engine.batch_opt": 16}, environ={})
    with pytest.raises(ConfigError, match="prune.ratio"):
        load_config("default", {"prune.ratio": 1.5}, environ={})


def test_unknown_spec_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="did you mean smoke"):
        load_config("smokey", environ={})


def test_spec_file_with_a_base_and_a_cycle(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: smoke\nexperiment: mine\n")
    config = load_config(child, environ={})
    assert config.experiment == "mine" and config.train.epochs_head == 1
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="names itself"):
        load_config(loop, environ={})


def test_top_level_settings_come_from_the_environment() -> None:
    assert load_config(environ={"COURSE_OFFLINE": "1"}).offline is True
    assert load_config(environ={}).offline is False
    assert load_config("default", environ={"COURSE_SEED": "7"}).seed == 7


def test_environment_beats_the_spec_and_overrides_beat_the_environment() -> None:
    assert load_config("smoke", environ={}).train.epochs_head == 1
    assert load_config("smoke", environ={"COURSE_TRAIN__EPOCHS_HEAD": "5"}).train.epochs_head == 5
    config = load_config("smoke", {"seed": 3, "offline": False},
                         environ={"COURSE_SEED": "7", "COURSE_OFFLINE": "true"})
    assert config.seed == 3 and config.offline is False


def test_course_spec_picks_the_spec_and_an_explicit_spec_wins() -> None:
    assert load_config(environ={"COURSE_SPEC": "smoke"}).spec == "smoke"
    assert load_config("default", environ={"COURSE_SPEC": "smoke"}).spec == "default"


def test_a_spec_file_is_recorded_by_its_path_and_loads_again(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my.yaml").write_text("base: smoke\nexperiment: mine\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("my.yaml", environ={})  # relative to the current folder
    assert config.spec == str(tmp_path.resolve() / "my.yaml") and not config.smoke
    monkeypatch.chdir(REPO_ROOT)  # notebooks and the app's kernel load it from another folder
    again = load_config(config.spec, environ={})
    assert again.spec == config.spec and again.experiment == "mine" and again.train.epochs_head == 1
    assert load_config(environ={"COURSE_SPEC": config.spec}).experiment == "mine"


def test_a_shipped_spec_given_by_path_keeps_its_name() -> None:
    config = load_config(REPO_ROOT / "data" / "specs" / "smoke.yaml", environ={})
    assert config.spec == "smoke" and config.smoke


def test_environment_values_json_lists_and_null() -> None:
    env = {"COURSE_ENGINE__PRECISIONS": '["fp32", "int8"]', "COURSE_IMAGEGEN__OFFLINE_FALLBACK": "null",
           "course_train__unfreeze": "all"}
    config = load_config("default", environ=env)
    assert config.engine.precisions == ["fp32", "int8"]
    assert config.imagegen.offline_fallback is None and config.train.unfreeze == "all"
    with pytest.raises(ConfigError, match="JSON"):
        load_config("default", environ={"COURSE_ENGINE__PRECISIONS": "[fp32"})


def test_environment_typos_suggest_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="COURSE_TRIAN__EPOCHS_HEAD.*did you mean 'train'"):
        load_config("default", environ={"COURSE_TRIAN__EPOCHS_HEAD": "1"})
    with pytest.raises(ConfigError, match="did you mean 'epochs_head'"):
        load_config("default", environ={"COURSE_TRAIN__EPOCH_HEAD": "1"})
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        load_config("default", environ={"COURSE_SEDE": "1"})
    with pytest.raises(ConfigError, match="not a section"):
        load_config("default", environ={"COURSE_SEED__X": "1"})
