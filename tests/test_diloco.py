"""DiLoCo: literal outer steps with a fake collective, and 2 real gloo ranks against references."""

import functools

import pytest
import torch

from lightning_localsgd.algorithms.diloco import DiLoCo
from tests.fakes import FakeCollectives, Toy, bind_fake
from tests.launch import run_ranks
from tests.scenarios_diloco import least_squares_shard

# The other rank's replicas and the expected anchors were worked out by hand (see each test).
X0, OTHER0 = [0.8, 2.2, 0.4], [0.6, 1.8, 0.2]  # mean [0.7, 2.0, 0.3]; anchor [1, 2, 0.5] → Δ = [0.3, 0, 0.2]
X1, OTHER1 = [0.5, 1.9, 0.3], [0.502, 1.7, 0.368]  # mean [0.501, 1.8, 0.334] → Δ₂ = [0.1, 0.2, −0.1]


def attached(algorithm: DiLoCo, comm_dtype: torch.dtype | None = None) -> tuple[Toy, FakeCollectives]:
    module, comm = Toy(), FakeCollectives(comm_dtype)
    bind_fake(algorithm, module, comm)
    return module, comm


def assert_params(module: Toy, expected: list[float], atol: float = 1e-12) -> None:
    torch.testing.assert_close(module.flat(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=atol)


def local_round(module: Toy, comm: FakeCollectives, mine: list[float], other: list[float]) -> None:
    """This rank's replica after its local steps, and what the other rank will contribute."""
    module.set_(mine)
    comm.other = torch.tensor(other, dtype=torch.float64)


def test_two_syncs_are_nesterov_steps_on_the_mean_pseudo_gradient():
    alg = DiLoCo(sync_every=2)  # outer SGD lr 0.7, momentum 0.9, Nesterov
    module, comm = attached(alg)
    local_round(module, comm, X0, OTHER0)
    alg.after_step(1)
    assert torch.equal(module.flat(), torch.tensor(X0, dtype=torch.float64)) and not comm.sent  # a local step
    alg.after_step(2)
    # buf = Δ; θ ← θ − 0.7·(Δ + 0.9·buf) = [1, 2, 0.5] − 1.33·[0.3, 0, 0.2]
    assert_params(module, [0.601, 2.0, 0.234])
    assert len(comm.sent) == 1 and comm.sent[0].numel() == 3 + 2  # one allreduce: payload + one flag per rank
    torch.testing.assert_close(comm.sent[0][:3], torch.tensor(X0, dtype=torch.float64), rtol=0, atol=0)

    local_round(module, comm, X1, OTHER1)
    alg.after_step(3)
    alg.finalize(3)  # end of fit on a partial period: one more outer step
    # buf = 0.9·[0.3, 0, 0.2] + Δ₂ = [0.37, 0.2, 0.08]; step = Δ₂ + 0.9·buf = [0.433, 0.38, −0.028]
    # θ = [0.601, 2.0, 0.234] − 0.7·[0.433, 0.38, −0.028]
    assert_params(module, [0.2979, 1.734, 0.2536])
    assert alg.num_syncs == 2 and len(comm.sent) == 2


@pytest.mark.parametrize(
    "spec",
    [{"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1}}, functools.partial(torch.optim.Adam, lr=0.1)],
    ids=["yaml-dict", "callable"],
)
def test_any_stock_outer_optimizer(spec):
    alg = DiLoCo(sync_every=1, outer_optimizer=spec)
    module, comm = attached(alg)
    local_round(module, comm, X0, OTHER0)
    alg.after_step(1)
    # Adam's first step moves each coordinate by lr·Δ/(|Δ| + eps): 0.1 against the sign of Δ = [0.3, 0, 0.2]
    assert_params(module, [0.9, 2.0, 0.4], atol=1e-8)
    assert isinstance(alg.outer, torch.optim.Adam)


def test_lightning_cli_yaml_builds_the_outer_optimizer():
    jsonargparse = pytest.importorskip("jsonargparse")
    from lightning.pytorch import Callback

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    yaml = """
    callbacks:
      - class_path: lightning_localsgd.algorithms.diloco.DiLoCo
        init_args:
          sync_every: 1
          outer_optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.1}}
    """
    (alg,) = parser.instantiate(parser.parse_string(yaml)).callbacks
    module, comm = attached(alg)
    local_round(module, comm, X0, OTHER0)
    alg.after_step(1)
    assert isinstance(alg.outer, torch.optim.Adam) and alg.outer.defaults["lr"] == 0.1
    assert_params(module, [0.9, 2.0, 0.4], atol=1e-8)


def test_anchor_is_retaken_at_the_end_of_warmup_and_kept_in_fp32_on_anchor_device():
    alg = DiLoCo(sync_every=2, warmup_steps=1, anchor_device="cpu")
    module, comm = attached(alg)
    module.set_([0.9, 2.1, 0.6])  # where the (DDP-like) warm-up step led
    alg.after_step(1)
    local_round(module, comm, X0, OTHER0)
    alg.after_step(3)  # first sync at warmup + H: Δ = [0.9, 2.1, 0.6] − [0.7, 2.0, 0.3] = [0.2, 0.1, 0.3]
    assert_params(module, [0.634, 1.967, 0.201])
    assert alg.anchor.device.type == "cpu" and alg.anchor.dtype == torch.float64

    half = DiLoCo(sync_every=2)
    module, comm = Toy().half(), FakeCollectives()
    bind_fake(half, module, comm)
    assert half.anchor.dtype == torch.float32  # fp32 anchor for a fp16 model


def test_reduced_precision_transport_sends_replica_minus_anchor():
    alg = DiLoCo(sync_every=1)
    module, comm = attached(alg, comm_dtype=torch.bfloat16)
    anchor = module.flat()
    local_round(module, comm, X0, [])
    comm.other = (torch.tensor(OTHER0, dtype=torch.float64) - anchor).to(torch.bfloat16)  # its payload
    alg.after_step(1)
    sent = comm.sent[0]
    assert sent.dtype == torch.bfloat16
    assert torch.equal(sent[:3], (torch.tensor(X0, dtype=torch.float64) - anchor).to(torch.bfloat16))
    assert_params(module, [0.601, 2.0, 0.234], atol=3e-3)


def test_state_dict_round_trip_continues_the_outer_momentum():
    alg = DiLoCo(sync_every=2)
    module, comm = attached(alg)
    local_round(module, comm, X0, OTHER0)
    alg.after_step(2)
    state = alg.state_dict()
    assert set(state) >= {"anchor", "outer_optimizer"}

    resumed = DiLoCo(sync_every=2)
    resumed.load_state_dict(state)
    module2, comm2 = Toy(), FakeCollectives()  # fresh parameters: the anchor must come from the checkpoint
    bind_fake(resumed, module2, comm2, step=2)
    local_round(module2, comm2, X1, OTHER1)
    resumed.after_step(4)
    assert_params(module2, [0.2979, 1.734, 0.2536])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_every": 0}, "sync_every must be an integer >= 1"),
        ({"outer_lr": 0.0}, "outer_lr must be a positive number"),
        ({"outer_lr": "0.7"}, "outer_lr must be a positive number"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be a number in \[0, 1\)"),
        ({"nesterov": "yes"}, "nesterov must be True or False"),
        ({"outer_momentum": 0.0}, "pass nesterov=False"),
        ({"outer_optimizer": functools.partial(torch.optim.Adam), "outer_lr": 0.5}, "outer_lr=0.5 would have no"),
        ({"outer_optimizer": {"class_path": "torch.optim.SGD"}, "nesterov": False}, "nesterov=False would have no"),
        ({"outer_optimizer": {"class_path": "torch.optim.Nope"}}, "is not a torch.optim.Optimizer"),
        ({"outer_optimizer": {"class": "torch.optim.Adam"}}, "takes the keys 'class_path' and 'init_args'"),
        ({"anchor_device": "gpu0"}, "anchor_device must be None, 'cpu'"),
        ({"buffers": "mean"}, "buffers must be one of"),
        ({"nonfinite": "ignore"}, "nonfinite must be 'raise' or 'skip'"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiLoCo(**kwargs)


def test_outer_optimizer_that_is_not_an_optimizer_factory():
    with pytest.raises(TypeError, match="callable params -> Optimizer"):
        DiLoCo(outer_optimizer=3)
    with pytest.raises(TypeError, match="must build a torch.optim.Optimizer"):
        DiLoCo(outer_optimizer=lambda params: list(params))


# ---------------------------------------------------------------------------------- 2 gloo ranks
def test_outer_sgd_lr_1_without_momentum_is_periodic_averaging_step_for_step():
    common = {"sync_every": 3, "warmup_steps": 2}
    runs = {
        "periodic": ("periodic", common),
        "diloco": ("diloco", {**common, "outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}),
    }
    ranks = run_ranks("tests.scenarios_diloco:compare_algorithms", world=2, steps=11, runs=runs)
    for r in ranks:
        assert r["periodic"].shape == (11, 73)
        assert (r["periodic"] - r["diloco"]).abs().max() <= 1e-12
        assert (r["periodic_buffers"] - r["diloco_buffers"]).abs().max() <= 1e-12  # BatchNorm stats averaged
        assert r["diloco_calls"]["sync"] == r["periodic_calls"]["sync"] == 3  # steps 5, 8, 11
        assert r["diloco_calls"]["grad"] == 2  # the warm-up steps average gradients
    assert (ranks[0]["diloco"][3] - ranks[1]["diloco"][3]).abs().max() > 1e-4  # step 4 is local: replicas differ


def diloco_reference(steps: int, sync_every: int, lr: float, outer_lr: float = 0.7, momentum: float = 0.9):
    """Plain-torch DiLoCo on the two least-squares shards: per-step replicas and the final model."""
    shards = [least_squares_shard(r) for r in (0, 1)]
    d = shards[0][0].shape[1]
    theta, buf = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    w = [theta.clone(), theta.clone()]
    records = [[], []]

    def outer_step() -> None:
        nonlocal theta, buf
        delta = theta - (w[0] + w[1]) / 2
        buf = momentum * buf + delta  # torch SGD momentum (first step: buf = Δ)
        theta = theta - outer_lr * (delta + momentum * buf)  # Nesterov
        w[0], w[1] = theta.clone(), theta.clone()

    for step in range(1, steps + 1):
        for r, (x, y) in enumerate(shards):
            w[r] = w[r] - lr * x.T @ (x @ w[r] - y) / x.shape[0]  # ∇ of mean((xw − y)²)/2
        if step % sync_every == 0:
            outer_step()
        for r in (0, 1):
            records[r].append(w[r].clone())
    if steps % sync_every:
        outer_step()  # end of fit closes the partial period
    return [torch.stack(rec) for rec in records], theta


def test_nesterov_outer_steps_match_a_plain_torch_reference_on_two_ranks():
    ranks = run_ranks(
        "tests.scenarios_diloco:diloco_least_squares", world=2, steps=10, lr=0.1, algorithm={"sync_every": 3}
    )
    records, final = diloco_reference(steps=10, sync_every=3, lr=0.1)
    for r, out in enumerate(ranks):
        assert (out["after"] - records[r]).abs().max() <= 1e-12
        assert (out["final"] - final).abs().max() <= 1e-12
        assert out["calls"]["sync"] == 4  # steps 3, 6, 9 and the end of fit
    assert (records[0][3] - records[1][3]).abs().max() > 1e-3  # the replicas really drift between syncs


def test_resume_mid_period_and_at_a_sync_is_exact():
    # inner SGD momentum 0.9 and the default Nesterov outer step; syncs at 3, 6, 9, end of fit at 10
    r0, r1 = run_ranks(
        "tests.scenarios_diloco:resume", world=2, steps=10, save_at=(4, 6), algorithm="diloco", kwargs={"sync_every": 3}
    )
    for r in (r0, r1):
        assert r[0].shape == (10, 57)
        for start in (4, 6):
            assert (r[start] - r[0][start:]).abs().max() <= 1e-9
    assert (r0[0][3] - r1[0][3]).abs().max() > 1e-4  # step 4 is mid-period: the replicas differ
    stored = torch.cat([v.reshape(-1) for v in r0["ckpt_state"].values()])
    assert (stored - (r0[0][3] + r1[0][3]) / 2).abs().max() <= 1e-12  # the checkpoint's model is the average
