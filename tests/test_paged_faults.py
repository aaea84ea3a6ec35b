"""The paged placement's spill file under faults: a full disk, SIGKILL, a low descriptor limit.

A full disk is a real 1 MiB tmpfs (mounting needs root, as in CI; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import set_grads

import hf_optim
from hf_optim.state.arena import remove_stale_spill_files

pytestmark = pytest.mark.filterwarnings("ignore:hf_optim. paged_dir .* is in memory")
HP = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1}


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: the spill directory of a disk that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory, leave: int) -> str:
    """A ballast file leaving about ``leave`` bytes free in ``directory``'s filesystem."""
    stat = os.statvfs(directory)
    path = os.path.join(directory, "ballast")
    with open(path, "wb") as f:
        f.write(b"\1" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return path


def two_groups(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    small = [torch.randn(300, generator=gen).requires_grad_(), torch.randn(20, 7, generator=gen).requires_grad_()]
    large = [torch.randn(64, 512, generator=gen).requires_grad_()]  # 256 KiB of state
    return small + large, [{"params": small}, {"params": large, "lr": 1e-3}]


def test_full_disk_mid_step_changes_nothing_and_a_retry_steps_once(small_fs):
    params, groups = two_groups()
    ref_params, ref_groups = two_groups()
    opt = hf_optim.AdamW(groups, execution="eager", placement="paged", paged_budget=0, paged_dir=str(small_fs), **HP)
    ref = hf_optim.AdamW(ref_groups, execution="eager", **HP)
    set_grads(params, 1)
    set_grads(ref_params, 1)
    before = [p.detach().clone() for p in params]
    ballast = fill(small_fs, leave=64 * 1024)  # room for group 0's states, not group 1's
    with pytest.raises(OSError, match=r"cannot reserve \d+ bytes for paged optimizer state .*paged_dir="):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # group 0 was not stepped ...
    assert not any(opt.state.values())  # ... nor did any state (or step counter) appear
    assert opt.paging_stats()["paged_params"] == 0
    os.unlink(ballast)
    for _ in range(3):  # the retry steps every group once
        opt.step()
        ref.step()
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
    assert [float(s["step"]) for s in opt.state.values()] == [3.0] * 3


def test_full_disk_during_load_leaves_the_optimizer_and_pager_as_they_were(small_fs):
    params, groups = two_groups()
    ref_params, ref_groups = two_groups()
    opt = hf_optim.AdamW(groups, execution="eager", placement="paged", paged_budget=0, paged_dir=str(small_fs), **HP)
    ref = hf_optim.AdamW(ref_groups, execution="eager", **HP)
    for i in range(2):
        set_grads(params, i)
        set_grads(ref_params, i)
        opt.step()
        ref.step()
    other_params, other_groups = two_groups(seed=5)
    other = hf_optim.AdamW(other_groups, execution="eager", **HP)
    set_grads(other_params, 9)
    other.step()
    saved = other.state_dict()
    stats = opt.paging_stats()
    ballast = fill(small_fs, leave=64 * 1024)
    with pytest.raises(OSError, match="cannot reserve"):
        opt.load_state_dict(saved)
    assert opt.paging_stats()["paged_bytes"] == stats["paged_bytes"]
    for i in range(2, 5):  # steps on as if the load had not been tried, the disk still full
        set_grads(params, i)
        set_grads(ref_params, i)
        opt.step()
        ref.step()
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
    os.unlink(ballast)
    opt.load_state_dict(saved)  # with space it loads, and then equals the source
    for mine, theirs in zip(params, other_params, strict=True):
        assert all(torch.equal(t, opt.state[mine][k]) for k, t in other.state[theirs].items())


_PLACE_FOREVER = """
import sys, torch, hf_optim
ps = [torch.randn(64, 64).requires_grad_() for _ in range(200)]
for p in ps:
    p.grad = torch.randn(p.shape)
print("placing", flush=True)
while True:  # new states placed over and over: a kill lands mid-placement
    opt = hf_optim.AdamW(ps, execution="eager", placement="paged", paged_budget=0, paged_dir=sys.argv[1])
    opt.step()
"""


def test_sigkill_while_states_are_placed_leaves_no_file(tmp_path):
    rng = random.Random(0)
    for _ in range(4):  # the spill file never has a name, so any moment will do; a few random ones
        child = subprocess.Popen([sys.executable, "-c", _PLACE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "placing", child.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        assert not list(tmp_path.iterdir())


_MANY_TENSORS = """
import os, sys, torch, hf_optim
ps = [torch.randn(40).requires_grad_() for _ in range(1100)]
opt = hf_optim.AdamW(ps, execution="eager", placement="paged", paged_budget=0, paged_dir=sys.argv[1])
for _ in range(2):
    for p in ps:
        p.grad = torch.ones(40)
    opt.step()
print(opt.paging_stats()["paged_params"], len(os.listdir("/proc/self/fd")))
"""


def test_1100_paged_tensors_need_one_file_descriptor(tmp_path):
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    out = subprocess.run([sys.executable, "-c", _MANY_TENSORS, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, preexec_fn=low_limit)
    assert out.returncode == 0, out.stderr[-2000:]
    paged, fds = map(int, out.stdout.split())
    assert paged == 1100 and fds < 128


def test_named_spill_files_of_ended_processes_are_removed(tmp_path):
    # where a filesystem cannot O_TMPFILE, a spill file has a name for a moment: one left by a killed process
    # is removed by the next arena in that directory; a live process's and other files are kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"hf_optim_paged_{int(dead.stdout)}_x.bin"
    live = tmp_path / f"hf_optim_paged_{os.getpid()}_y.bin"
    other = tmp_path / "hf_optim_paged_notes.txt"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_spill_files(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_freed_range_is_reused_only_once_no_tensor_views_it_and_reads_as_zeros(tmp_path):
    import gc

    from hf_optim.state.arena import PAGE, SpillArena

    arena = SpillArena(str(tmp_path))
    first = arena.allocate(3 * PAGE)
    view = first.tensor(0, torch.Size([3 * PAGE // 4]), torch.float32)
    view.fill_(7.0)
    del first
    gc.collect()
    second = arena.allocate(3 * PAGE)  # the first range is still viewed: a new range
    assert second.address != view.data_ptr() and float(view[0]) == 7.0
    fd_size = os.fstat(arena.file_descriptor).st_size
    del view
    gc.collect()
    third = arena.allocate(2 * PAGE)  # now the first range is free: reused, zeroed, the file does not grow
    assert os.fstat(arena.file_descriptor).st_size == fd_size
    assert torch.count_nonzero(third.tensor(0, torch.Size([2 * PAGE]), torch.uint8)) == 0
