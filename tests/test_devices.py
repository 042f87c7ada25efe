"""Which GPU each evaluation gets, on a simulated machine of eight GPUs: one evaluation device
per usable GPU, each sandbox pinned to exactly its own, and evaluations on different GPUs
never waiting for each other while those on one GPU take turns (issue 5's scheduling and
pinning, tested where only a CPU or one GPU is present)."""

from __future__ import annotations

import threading
import time

import pytest

from evo import devices, run_setup
from evo.config import VerifyPolicy

# Indices no real GPU has, so the device locks these tests take never meet a real evaluation's.
EIGHT = [(str(900 + number), "NVIDIA H200", "9.0") for number in range(8)]


@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(devices, "list_gpus", lambda: list(EIGHT))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_one_evaluation_device_per_gpu_unless_one_is_asked_for(eight_gpus):
    assert run_setup.device_list(VerifyPolicy()) == [f"cuda:{ordinal}" for ordinal in range(8)]
    assert run_setup.device_list(VerifyPolicy(device="cuda:3")) == ["cuda:3"]
    assert run_setup.device_list(VerifyPolicy(device="cpu")) == ["cpu"]


def test_the_gpus_the_user_made_visible_are_the_only_ones_used(eight_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "903,905")
    assert run_setup.device_list(VerifyPolicy()) == ["cuda:0", "cuda:1"]
    assert devices.resolve("cuda:1").visible == "905"
    with pytest.raises(devices.DeviceError, match="only 2 are visible"):
        devices.resolve("cuda:2")


def test_each_sandbox_sees_exactly_its_own_gpu(eight_gpus, tmp_path):
    pinned = set()
    for ordinal in range(8):
        device = devices.resolve(f"cuda:{ordinal}")
        visible = devices.sandbox_env(tmp_path, device, {})["CUDA_VISIBLE_DEVICES"]
        assert visible == EIGHT[ordinal][0] and "," not in visible
        assert device.torch_name == "cuda:0"  # inside its sandbox, its one GPU is the first
        pinned.add(device.lock_name)
    assert len(pinned) == 8  # a device lock of its own per GPU


def test_evaluations_on_different_gpus_do_not_wait_for_each_other(eight_gpus):
    first, second = devices.resolve("cuda:0"), devices.resolve("cuda:1")
    waits = {}

    def take(device, name):
        with devices.exclusive(device) as waited:
            waits[name] = waited

    with devices.exclusive(first):
        other_gpu = threading.Thread(target=take, args=(second, "other gpu"))
        same_gpu = threading.Thread(target=take, args=(first, "same gpu"))
        other_gpu.start(), same_gpu.start()
        other_gpu.join(timeout=5)
        time.sleep(0.5)
        assert "same gpu" not in waits  # still waiting while the first evaluation holds its GPU
    same_gpu.join(timeout=5)
    assert waits["other gpu"] < 0.25
    assert waits["same gpu"] >= 0.5


def test_a_new_evaluation_goes_to_the_gpu_with_the_fewest_in_flight():
    load = devices.DeviceLoad(["cuda:0", "cuda:1"])
    assert [load.take() for _ in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    load.done("cuda:1"), load.done("cuda:1")  # GPU 1 finished its two while GPU 0 is still busy
    assert [load.take() for _ in range(3)] == ["cuda:1", "cuda:1", "cuda:0"]
    assert load.counts == {"cuda:0": 3, "cuda:1": 2}


def test_a_few_evaluations_hold_processes_on_each_device_and_gpus_sharing_a_machine_split_its_cores(monkeypatch):
    """Enough to keep a device busy and no more (each one's processes start and end beside the
    timed one); on a small machine or one shared by several GPUs, what its cores allow."""
    def machine(cores: int, builds: int) -> None:
        monkeypatch.setattr(devices.os, "sched_getaffinity", lambda _pid: set(range(cores)))
        monkeypatch.setattr(devices, "parallel_builds", lambda _kind: builds)

    machine(16, 14)  # the H200 machine
    assert devices.evaluations_at_device("cuda") == devices.EVALUATIONS_AT_DEVICE == 4
    machine(128, 126)
    assert devices.evaluations_at_device("cuda") == 4
    assert devices.evaluations_at_device("cuda", devices_in_use=8) == 4
    machine(16, 14)
    assert devices.evaluations_at_device("cuda", devices_in_use=2) == 4
    assert devices.evaluations_at_device("cuda", devices_in_use=4) == 2
    machine(6, 6)
    assert devices.evaluations_at_device("cuda") == 3
    machine(2, 2)  # the CI machine: never fewer than two, so that one loads while another is timed
    assert devices.evaluations_at_device("cpu") == 2


def test_only_plain_entries_built_by_the_compiling_sandbox_reach_the_extension_cache(tmp_path):
    """What a build names comes from a sandbox's report: an entry with a path in its name, or a
    directory outside that sandbox's, is not copied."""
    built_in, elsewhere, cache = tmp_path / "compiler", tmp_path / "elsewhere", tmp_path / "cache"
    for directory in (built_in / "extensions" / "kit-1", elsewhere / "secrets", cache):
        directory.mkdir(parents=True)
        (directory / "file").write_text(directory.name)
    devices.publish_extensions([
        {"entry": "kit-1", "build_directory": str(built_in / "extensions" / "kit-1")},
        {"entry": "../escaped", "build_directory": str(built_in / "extensions" / "kit-1")},
        {"entry": ".hidden", "build_directory": str(built_in / "extensions" / "kit-1")},
        {"entry": "stolen", "build_directory": str(elsewhere / "secrets")},
        {"entry": "sneaky", "build_directory": str(built_in / ".." / "elsewhere" / "secrets")},
    ], cache, built_in)
    assert sorted(path.name for path in cache.iterdir()) == ["file", "kit-1"]
    assert not (tmp_path / "escaped").exists()
