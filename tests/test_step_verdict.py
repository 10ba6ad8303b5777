"""The all-ranks step verdict on two real ranks (torchrun, gloo, DeepSpeed): which way carries it for
which engine, that a flag raised on one rank reaches both, and that carrying the flags in the gradient
all-reduce leaves the averaged gradients exactly as DeepSpeed's own all-reduce makes them."""

from __future__ import annotations

import json
import sys

from e2e import run

WORKER = '''
import json, os
import torch
from tada_dist.config import build_config
from tada_dist.deepspeed_config import deepspeed_config
from tada_dist.distributed import deepspeed_output
from tada_dist.step_verdict import step_verdict

rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo")


def engine_for(overrides, grad_accum=1):
    torch.manual_seed(0)  # the same weights on every rank and in every engine
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(2)))  # no gradient in the backward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = build_config(None, ["data.batch_size=4", f"distributed.grad_accum={grad_accum}", *overrides],
                          world_size=2)
    with deepspeed_output():
        import deepspeed
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config, 2))
    return engine, optimizer


def loss_of(engine, micro_step):
    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * rank + micro_step))
    return engine(inputs).square().mean()


def gradients(engine):
    return [p.grad.clone() if p.grad is not None else None for p in engine.module.parameters()]


result = {}
# DeepSpeed's own all-reduce, then the same backward with the flags riding in it.
reference, _ = engine_for(["distributed.zero_stage=0"])
reference.backward(loss_of(reference, 1))
carried, optimizer = engine_for(["distributed.zero_stage=0"])
verdict = step_verdict(carried, optimizer, 2, torch.device("cpu"))
result["kind"] = type(verdict).__name__
# One rank: the trainer switches DeepSpeed's all-reduce off, so there is nothing to ride in.
result["one_rank_kind"] = type(step_verdict(carried, optimizer, 1, torch.device("cpu"))).__name__
verdict.before_backward(nonfinite=rank == 1, stop=False)
carried.backward(loss_of(carried, 1))
result["flags"] = verdict.after_backward(boundary=True)
result["same_gradients"] = all(torch.equal(a, b) for a, b in zip(gradients(reference), gradients(carried)))
carried.step()
verdict.before_backward(nonfinite=False, stop=rank == 0)
carried.backward(loss_of(carried, 2))
result["next_flags"] = verdict.after_backward(boundary=True)

# Two micro-steps: a flag of the first is held until the boundary, and only then reduced.
accumulating, optimizer = engine_for(["distributed.zero_stage=0"], grad_accum=2)
verdict = step_verdict(accumulating, optimizer, 2, torch.device("cpu"))
flags = []
for micro_step in (1, 2):
    verdict.before_backward(nonfinite=rank == 1 and micro_step == 1, stop=False)
    accumulating.backward(loss_of(accumulating, micro_step))
    flags.append(verdict.after_backward(boundary=accumulating.is_gradient_accumulation_boundary()))
    accumulating.step()
result["accumulated_flags"] = flags

# ZeRO-2 reduces inside the backward: the flags need their own all-reduce there.
zero2, optimizer = engine_for(["distributed.zero_stage=2"])
verdict = step_verdict(zero2, optimizer, 2, torch.device("cpu"))
result["zero2_kind"] = type(verdict).__name__
verdict.before_backward(nonfinite=False, stop=rank == 1)
zero2.backward(loss_of(zero2, 1))
result["zero2_flags"] = verdict.after_backward(boundary=True)
with open(f"result_rank{rank}.json", "w") as handle:  # a file per rank: printed lines of two ranks interleave
    json.dump(result, handle)
# Close the group before the interpreter exits: gloo's threads still running at teardown abort the process.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_the_verdict_reaches_every_rank_and_leaves_the_averaged_gradients_as_they_were(tmp_path):
    worker = tmp_path / "verdict_worker.py"
    worker.write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)],
        tmp_path, OMP_NUM_THREADS="1")
    results = {rank: json.loads((tmp_path / f"result_rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank, result in results.items():
        assert result["kind"] == "GradientVerdict" and result["one_rank_kind"] == "SeparateVerdict"
        assert result["flags"] == [True, False], f"rank {rank}: rank 1's NaN must reach every rank"
        assert result["same_gradients"], f"rank {rank}: the flags changed the averaged gradients"
        assert result["next_flags"] == [False, True], f"rank {rank}: the flags of a step must not leak into the next"
        assert result["accumulated_flags"] == [[False, False], [True, False]]
        assert result["zero2_kind"] == "SeparateVerdict"
        assert result["zero2_flags"] == [False, True]

