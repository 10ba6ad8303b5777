"""The checks that run before anything heavy: output folder, tracking store, resume compatibility."""

import os
import socket
import sys

import pytest
from test_checkpoint import fake_checkpoint

from tada_dist.config import ConfigError, build_config
from tada_dist.preflight import check_output_dir, check_resume, check_tracking, run_record


def config_in(tmp_path, *overrides, world_size=1):
    return build_config(None, [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}", *overrides],
                        world_size=world_size)


def one_line_error(check, *args) -> str:
    with pytest.raises(ConfigError) as error:
        check(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = one_line_error(check_output_dir, blocker / "run")
    assert message.startswith(f"output_dir {blocker / 'run'} is not writable") and "output_dir=..." in message
    check_output_dir(tmp_path / "fresh" / "run")  # probed in its nearest parent: nothing created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    (tmp_path / "kept").mkdir()
    check_output_dir(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_an_unwritable_sqlite_store_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = config_in(tmp_path, f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    message = one_line_error(check_tracking, config)
    assert f"MLflow store {blocker}/mlflow.db is not writable" in message and "tracking.enabled=false" in message
    check_tracking(config_in(tmp_path))  # the default store beside the run folder
    check_tracking(config_in(tmp_path, f"tracking.uri=sqlite:///{blocker}/x.db", "tracking.enabled=false"))


def test_an_unreachable_tracking_server_is_named_with_the_way_to_train_without_it(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    message = one_line_error(check_tracking, config_in(tmp_path, f"tracking.uri={uri}"))
    assert message.startswith(f"MLflow tracking server {uri} did not answer") and "tracking.enabled=false" in message


def test_resume_is_refused_for_another_world_size_or_model_and_names_both_ways_out(tmp_path):
    saved = config_in(tmp_path)
    fake_checkpoint(tmp_path / "run", 4, run=run_record(saved, world_size=1))
    assert check_resume(saved, world_size=1) == 4

    message = one_line_error(check_resume, saved, 2)
    assert message.startswith(f"{tmp_path / 'run'} holds a checkpoint (step 4) of a different run: world_size 1 there, "
                              "2 now")
    assert "output_dir=..." in message and "checkpoint.resume=false" in message

    message = one_line_error(check_resume, config_in(tmp_path, "method=dann", "model.global_hidden=64"), 1)
    assert "method 'tada' there, 'dann' now" in message and "model.global_hidden 1024 there, 64 now" in message
    assert check_resume(config_in(tmp_path, "train.log_every=7"), world_size=1) == 4  # logging changes nothing
    assert check_resume(config_in(tmp_path, "method=dann", "checkpoint.resume=false"), world_size=2) is None


def test_a_checkpoint_beyond_train_steps_is_not_silently_finished(tmp_path):
    saved = config_in(tmp_path, "train.steps=10")
    fake_checkpoint(tmp_path / "run", 10, run=run_record(saved, world_size=1))
    assert check_resume(saved, world_size=1) == 10  # a finished run: evaluated again, not trained
    message = one_line_error(check_resume, config_in(tmp_path, "train.steps=6"), 1)
    assert "holds a checkpoint at step 10, beyond train.steps=6; raise train.steps to continue it" in message


def test_cli_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from tada_dist.train import main\n"
        "for args in (['--list-keys'], ['--print-config', 'method=dann'], ['optim.lrr=1']):\n"
        "    main(args)\n"
        "print('torch' in sys.modules, 'deepspeed' in sys.modules)\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert "optim.lrr" in result.stderr


def test_list_keys_shows_each_default_and_meaning(capsys):
    from tada_dist.train import main

    assert main(["--list-keys"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "auto" in lines["optim.new_layer_mult"] and "pretrained" in lines["optim.new_layer_mult"]
    assert "1500" in lines["train.steps"] and "optimizer steps" in lines["train.steps"]


def test_the_same_data_reached_through_a_symlink_resumes_but_other_data_does_not(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images")
    (tmp_path / "other").mkdir()
    saved = config_in(tmp_path, f"data.root={tmp_path / 'images'}")
    fake_checkpoint(tmp_path / "run", 4, run=run_record(saved, world_size=1))
    assert check_resume(config_in(tmp_path, f"data.root={tmp_path / 'link'}"), world_size=1) == 4
    message = one_line_error(check_resume, config_in(tmp_path, f"data.root={tmp_path / 'other'}"), 1)
    images, other = (os.path.realpath(tmp_path / name) for name in ("images", "other"))
    assert f"data.root '{images}' there, '{other}' now" in message
