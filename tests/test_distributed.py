"""Data-parallel training on CPU: 2 gloo processes stand in for nnU-Net's `-num_gpus 2` (same DDP settings:
find_unused_parameters=False, broadcast_buffers=True, the batch split over the ranks): the 2-rank gradient is the
single-process gradient of the whole batch, the ranks stay equal, and the final validation finishes with fewer
validation cases than ranks. One spawn (~30 s of CPU) serves all of them."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _dsm_helpers import tiny_network
from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS
from nnunetv2_dsm.training import distributed
from nnunetv2_dsm.training.loss import DSMLoss

WORLD = 2
PATCH = 16
SCALES = (16, 16, 8, 4, 2)  # the tiny 4-stage network's outputs at a 16³ patch: final, then kMMM layers fine → coarse


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=int(os.environ.get("NNUNETV2_DSM_TEST_GLOO_TIMEOUT", 60))))


def _network(stage: int):
    net = tiny_network(stage, seed=0)
    if stage == 2:
        g = torch.Generator().manual_seed(0)
        net.alignment.set_text_embeddings(F.normalize(torch.randn(NUM_CLASSES, 512, generator=g), dim=-1))
    return net


def _global_batch():
    """Two cases with different partial labels: case 0 annotates every organ and two tumors, case 1 a single
    organ and its tumor (a LiTS-like case). Per-rank normalisation weighs case 1's two pairs ~13× too much."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, PATCH, PATCH, PATCH, generator=g)
    targets = [torch.rand(2, NUM_CLASSES, s, s, s, generator=g) > 0.6 for s in SCALES]
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[0, :NUM_ORGANS] = True
    annotated[0, NUM_ORGANS:NUM_ORGANS + 2] = True
    annotated[1, [5, NUM_ORGANS + 3]] = True
    return x, targets, annotated


def _loss(net, stage, x, targets, annotated, normalizer=None):
    output = net(x)
    return DSMLoss(len(output.predictions()), alignment_weight=1.0 if stage == 2 else 0.0, normalizer=normalizer)(
        output, targets, annotated)


def _worker(rank: int, port: int, folder: str) -> None:
    """One DDP step per stage on this rank's case (saves the synchronised gradients and the updated weights),
    then the final validation of :func:`_final_validation`. One process group for all: spawning costs seconds."""
    _init(rank, port)
    x, targets, annotated = _global_batch()
    mine = slice(rank, rank + 1)
    for stage in (1, 2):
        net = DDP(_network(stage), find_unused_parameters=False, broadcast_buffers=True)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = _loss(net, stage, x[mine], [t[mine] for t in targets], annotated[mine],
                     distributed.global_pair_normalizer)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.module.named_parameters()}
        optimizer.step()
        weights = {n: p.detach().clone() for n, p in net.module.named_parameters()}
        torch.save({"grads": grads, "weights": weights}, os.path.join(folder, f"stage{stage}_rank{rank}.pt"))
    _final_validation(rank, folder)
    dist.destroy_process_group()


def _single_process_grads(stage: int, cases: slice):
    x, targets, annotated = _global_batch()
    net = _network(stage)
    _loss(net, stage, x[cases], [t[cases] for t in targets], annotated[cases]).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _relative_error(a: dict, b: dict) -> float:
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b])
    return float(diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm())


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    os.environ["NNUNETV2_DSM_TEST_GLOO_TIMEOUT"] = "30"  # a hang shows as a gloo timeout, not a stuck test
    try:
        mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    finally:
        del os.environ["NNUNETV2_DSM_TEST_GLOO_TIMEOUT"]
    results = {(s, r): torch.load(folder / f"stage{s}_rank{r}.pt") for s in (1, 2) for r in range(WORLD)}
    results["validated"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("validated"))
    return results


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_give_the_single_process_gradient_of_the_whole_batch(ddp_results, stage):
    reference = _single_process_grads(stage, slice(0, 2))
    ranks = ddp_results[(stage, 0)]["grads"]
    assert set(ranks) == set(reference)
    assert all(bool(torch.isfinite(g).all()) for g in ranks.values())
    assert _relative_error(ranks, reference) < 1e-5
    # the data discriminate: DDP's average of per-rank means (the old normalisation) is > 1000× the tolerance off
    per_rank_mean = {k: (a + b) / 2 for (k, a), b in zip(_single_process_grads(stage, slice(0, 1)).items(),
                                                         _single_process_grads(stage, slice(1, 2)).values())}
    assert _relative_error(per_rank_mean, reference) > 1e-2


@pytest.mark.parametrize("stage", [1, 2])
def test_ranks_hold_equal_weights_after_the_step(ddp_results, stage):
    w0, w1 = ddp_results[(stage, 0)]["weights"], ddp_results[(stage, 1)]["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    before = dict(_network(stage).named_parameters())
    assert any(not torch.equal(w0[k], before[k]) for k in w0)  # the step changed the weights


def test_helpers_outside_a_process_group_are_a_single_process():
    count = torch.tensor(7)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_rank0()
    assert distributed.global_pair_normalizer(count).item() == 7.0


def _nnunet_validation_share(self, save_probabilities=False):
    """What nnU-Net's perform_actual_validation does with the network, without the files: predict this rank's
    share of the validation cases (``val_keys[rank::world]``, here 1 case for 2 ranks), then a barrier."""
    self.network.eval()
    with torch.no_grad():
        for _ in range(1)[dist.get_rank()::dist.get_world_size()]:
            self.network(torch.randn(1, 1, PATCH, PATCH, PATCH))
    dist.barrier()


def _final_validation(rank: int, folder: str) -> None:
    """`nnUNetv2_train … --val` with one validation case and 2 ranks: the DSM trainer's final validation on a
    freshly wrapped DDP network (as after loading a checkpoint), nnU-Net's prediction loop stood in for."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1
    nnUNetTrainer.perform_actual_validation = _nnunet_validation_share  # in this spawned process only
    trainer = object.__new__(nnUNetTrainerDSMStage1)
    trainer.is_ddp, trainer.local_rank, trainer.preprocessed_dataset_folder_base = True, rank, None
    ddp = DDP(_network(1), find_unused_parameters=False, broadcast_buffers=True)
    trainer.network = ddp
    trainer.perform_actual_validation()
    assert trainer.network is ddp  # the wrapper is back for whatever follows
    open(os.path.join(folder, f"validated{rank}"), "w").close()


def test_final_validation_with_fewer_cases_than_ranks_finishes(ddp_results):
    assert ddp_results["validated"] == ["validated0", "validated1"]


def test_trainers_normalise_by_the_global_batch_under_ddp_only():
    from types import SimpleNamespace
    from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2
    trainer = object.__new__(nnUNetTrainerDSMStage2)
    trainer.configuration_manager = SimpleNamespace(pool_op_kernel_sizes=[[1, 1, 1]] + [[2, 2, 2]] * 3)
    trainer.enable_deep_supervision = True
    for ddp in (False, True):
        trainer.is_ddp = ddp
        assert trainer._build_loss().normalizer is (distributed.global_pair_normalizer if ddp else None)
