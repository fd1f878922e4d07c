"""(8) Abnar et al. 2020, LSTM -> Transformer: does distilling an LSTM's cache pass on its recurrent bias?

Task: the built-in ``agreement`` dataset (subject-verb number agreement; the label is the number of the main verb,
test split 600 sentences at each of 0-4 attractors).  Models, one seed s = one of each:

* LSTM teacher     ``lstm_cls`` (dim 48), labels, 4 epochs;
* Transformer      ``transformer_cls`` (dim 32, 2 blocks, 2 heads; about as many parameters), labels, 4 epochs;
* Transformer KD   the same Transformer trained from the LSTM's cache of its own training sentences
                   (kdcache dump -> kdtrain --cache; T = 1, alpha = 0: the teacher's distribution only);
* Transformer KD+  the same, from the LSTM's cache of the *whole* train split: the LSTM's answers on the 3000
                   sentences with 2-4 attractors that no model here was given labels for;
* Transformer hard+  control for KD+: the same 10 000 sentences, each labelled with the LSTM's argmax (the LSTM run
                   in the loop through run_train's Targets hook, one-hot targets): KD+'s extra inputs without its
                   soft targets.

Transfer set: the built-in train split restricted to its sentences with 0 or 1 attractors (7000 of 10 000;
``experiments.agreement:agreement_low``); the test split is the whole built-in one.  A first check on seed 0 trains
both architectures on the whole train split, where the Transformer is the stronger model (the subject is always
the first noun, one or two words in: a position a Transformer reads directly) -- which is why the comparison is
made where inductive bias decides: generalising to more attractors than training showed.

    .venv/bin/python -m experiments.agreement          # 5 seeds: 1114 s on the 2 shared cores (load average ~10)
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.common import OnlineTeacher, cache_facts, md_table, mean_std, paired_t, pm, savefig, setup
from kdcache.config import LossConfig
from kdcache.data.agreement import AgreementDataset
from kdcache.data.datasets import open_dataset
from kdcache.data.render import model_input
from kdcache.data.sources import ArrayDataset
from kdcache.models import build_model, checkpoint_arch_args, load_weights, param_count
from kdcache.train import metrics
from kdcache.train.eval import predict

LOW = "experiments.agreement:agreement_low"
MAX_TRAIN_ATTRACTORS = 1
LSTM = dict(student="lstm_cls", student_args={"dim": 48}, epochs=4)
TRANSFORMER = dict(student="transformer_cls", student_args={"dim": 32, "depth": 2, "heads": 2}, epochs=4)
KD = LossConfig("kd", alpha=0.0, temperature=1.0)
GROUPS = (0, 1, 2, 3, 4)
ARMS = ("lstm", "scratch", "kd", "kd_whole", "hard_whole")
STUDENTS = ARMS[2:]
NAMES = {"lstm": "LSTM teacher (labels)", "scratch": "Transformer from scratch (labels)",
         "kd": "Transformer KD from the LSTM's cache", "kd_whole": "Transformer KD+ (cache of the whole train split)",
         "hard_whole": "Transformer hard+ (LSTM's argmax on the whole train split)"}


# --------------------------------------------------------------------------- the transfer set


class _AgreementSubset(ArrayDataset):
    """Some sentences of the built-in agreement split, with their attractor counts as evaluation groups."""

    def __init__(self, spec: str, split: str, keep: np.ndarray):
        base = AgreementDataset(spec, split)
        super().__init__(base.info, np.ascontiguousarray(base.data[keep]), base.labels[keep], "N")
        self.attractors = np.ascontiguousarray(base.attractors[keep])

    def _sample(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.data[i].copy())

    @property
    def groups(self) -> tuple[str, np.ndarray]:
        return "attractors", self.attractors


def agreement_low(split: str = "train", root: str | None = None):
    """The built-in agreement train split without its sentences of 2+ attractors (7000 of 10 000, original order);
    test = the whole built-in test split (600 sentences at each of 0-4 attractors)."""
    if split == "test":
        return AgreementDataset(LOW, "test")
    a = AgreementDataset(LOW, "train").attractors
    return _AgreementSubset(LOW, "train", np.flatnonzero(a <= MAX_TRAIN_ATTRACTORS))


def one_hot_argmax(z: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is one-hot at z's argmax: with KD at T = 1, alpha = 0 the loss is the cross-entropy
    against the teacher's hard labels."""
    return 1e4 * torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).float()


# --------------------------------------------------------------------------- scoring


def load(ckpt: str, arch: str, ds) -> torch.nn.Module:
    """A kdtrain checkpoint rebuilt with build_model + load_weights, in eval mode."""
    model = build_model(arch, ds.info.num_classes, tuple(ds.info.sample_shape), checkpoint_arch_args(ckpt),
                        **ds.info.model_inputs)
    load_weights(model, ckpt, arch)
    return model.eval()


def test_scores(ckpt: str, arch: str, teacher_pred: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Top-1, ECE and NLL on the agreement test split, overall, per attractor count and for 2+ attractors, from the
    rebuilt checkpoint; agreement with the teacher's predictions if given; and the model's predictions."""
    ds = open_dataset("agreement", "test")
    model = load(ckpt, arch, ds)
    logits = predict(model, ds, model_input(ds.info, None), torch.device("cpu"))
    y = torch.from_numpy(ds.labels)
    att = torch.from_numpy(ds.attractors)
    pred = logits.argmax(1)
    out = {}
    for key, mask in [("all", torch.ones_like(y, dtype=torch.bool)), ("2+", att >= 2),
                      *[(str(g), att == g) for g in GROUPS]]:
        lg, yy = logits[mask], y[mask]
        out[key] = {"top1": metrics.accuracy(lg, yy), "ece": metrics.ece(lg.softmax(-1), yy),
                    "nll": float(torch.nn.functional.cross_entropy(lg, yy))}
        if teacher_pred is not None:
            out[key]["agrees"] = float((pred[mask] == teacher_pred[mask]).float().mean())
    out["params"] = param_count(model)
    return out, pred


# --------------------------------------------------------------------------- the experiment


def main() -> None:
    e = setup("agreement", __doc__.splitlines()[0], default_seeds=5)

    # ---------------------------------------------------------------- check: both models on the whole train split
    check = {}
    for arm, spec in (("lstm", LSTM), ("scratch", TRANSFORMER)):
        e.train(f"whole-{arm}-0", seed=0, dataset="agreement", **spec)
        check[arm], _ = test_scores(e.checkpoint(f"whole-{arm}-0"), spec["student"])
    e.data["whole_split_check_seed0"] = check
    e.log("check on the whole train split: LSTM " + ", ".join(f"{100 * check['lstm'][str(g)]['top1']:.1f}"
                                                             for g in GROUPS) +
          " | Transformer " + ", ".join(f"{100 * check['scratch'][str(g)]['top1']:.1f}" for g in GROUPS))

    # ---------------------------------------------------------------- the seeds
    res: dict[str, list[dict]] = {a: [] for a in ARMS}
    facts: list[dict] = []
    for s in e.seeds:
        e.train(f"lstm-{s}", seed=s, dataset=LOW, **LSTM)
        lstm, teacher_pred = test_scores(e.checkpoint(f"lstm-{s}"), "lstm_cls")
        res["lstm"].append(lstm)
        low = e.dump(f"lstm-low-{s}", f"lstm-{s}", "lstm_cls", dataset=LOW)
        whole = e.dump(f"lstm-whole-{s}", f"lstm-{s}", "lstm_cls", dataset="agreement")
        facts.append({"low": cache_facts(low), "whole": cache_facts(whole)})
        for arm, kw in (("scratch", {}), ("kd", {"caches": (low,), "objective": KD}),
                        ("kd_whole", {"caches": (whole,), "objective": KD, "dataset": "agreement"})):
            e.train(f"{arm}-{s}", seed=s, **{"dataset": LOW, **kw}, **TRANSFORMER)
            res[arm].append(test_scores(e.checkpoint(f"{arm}-{s}"), "transformer_cls", teacher_pred)[0])
        teacher = load(e.checkpoint(f"lstm-{s}"), "lstm_cls", open_dataset("agreement", "train"))
        e.train(f"hard_whole-{s}", seed=s, dataset="agreement", targets=OnlineTeacher(teacher, one_hot_argmax), objective=KD,
                **TRANSFORMER)
        res["hard_whole"].append(test_scores(e.checkpoint(f"hard_whole-{s}"), "transformer_cls", teacher_pred)[0])
        e.log(f"seed {s}: top-1 at 2+ attractors " + ", ".join(
            f"{a} {100 * res[a][-1]['2+']['top1']:.1f}" for a in ARMS) +
              f"; LSTM right on {100 * facts[-1]['low']['teacher_top1']:.2f}% of its training sentences")
    e.data["results"] = res
    e.data["caches"] = facts
    e.data["config"] = {"lstm": LSTM, "transformer": TRANSFORMER, "kd": vars(KD),
                        "train_attractors_at_most": MAX_TRAIN_ATTRACTORS}

    # ---------------------------------------------------------------- tables
    seeds = f"seeds 0–{len(e.seeds) - 1}"
    rows = [[f"{NAMES[a]}, {res[a][0]['params'] / 1000:.0f}k params", pm(r["all"]["top1"] for r in res[a]),
             *[pm(r[str(g)]["top1"] for r in res[a]) for g in GROUPS], pm(r["2+"]["top1"] for r in res[a]),
             pm((r["all"]["ece"] for r in res[a]), 1, 3), pm((r["2+"]["ece"] for r in res[a]), 1, 3),
             pm((r["all"]["nll"] for r in res[a]), 1, 3),
             "—" if a == "lstm" else pm(r["2+"]["agrees"] for r in res[a])] for a in ARMS]
    e.table(f"Agreement accuracy % on the test split by number of attractors (600 sentences each), trained on the "
            f"7000 train sentences with ≤ {MAX_TRAIN_ATTRACTORS} attractor ({seeds}; KD+ and hard+ also saw the 3000 "
            "with 2–4, with the LSTM's soft / hard answers and no labels)",
            md_table(["model", "all", *[f"{g} attr." for g in GROUPS], "2–4 attr.", "ECE all", "ECE 2–4",
                      "NLL all", "agrees w/ LSTM 2–4 %"], rows))

    drows = [row for a in STUDENTS for row in _diffs(res, a, "scratch")] + _diffs(res, "kd_whole", "hard_whole")
    e.table(f"Paired by seed, model − baseline: mean [90 % t-interval] (seeds where the model is better; for the "
            f"last column, more like the LSTM), {seeds}",
            md_table(["model − baseline", "test sentences", "top-1 pts", "ECE", "NLL", "agrees w/ LSTM pts"], drows,
                     "llrrrr"))

    crow = [[f"{NAMES[a].split(' (')[0]}", *[f"{100 * check[a][str(g)]['top1']:.1f}" for g in GROUPS],
             f"{100 * check[a]['2+']['top1']:.1f}", f"{check[a]['all']['ece']:.3f}"] for a in ("lstm", "scratch")]
    e.table("Check (seed 0): the same two models trained on the whole train split (10 000 sentences, 0–4 "
            "attractors): test top-1 % by number of attractors",
            md_table(["model", *[f"{g} attr." for g in GROUPS], "2–4 attr.", "ECE all"], crow))

    frows = [[name, pm(f[k]["teacher_top1"] for f in facts), pm((f[k]["mean_entropy"] for f in facts), 1, 3),
              f"{np.mean([f[k]['bytes_per_sample'] for f in facts]):.1f}"]
             for k, name in (("low", "its 7000 training sentences (≤ 1 attractor)"),
                             ("whole", "the whole train split (10 000, incl. 3000 with 2–4)"))]
    e.table(f"The LSTM's caches: its accuracy on the cached sentences, mean entropy (nats), bytes/sample ({seeds})",
            md_table(["cache of the LSTM on", "LSTM top-1 %", "mean entropy", "bytes/sample"], frows))

    _plot(res)
    e.finish()


def _diffs(res: dict, a: str, b: str) -> list[list[str]]:
    """Rows of paired differences a - b over seeds: overall, 2-4 attractors and per attractor count."""
    n, rows = len(res[a]), []
    for key in ("all", "2+", *map(str, GROUPS)):
        cells = []
        for metric, scale, fmt, sign in (("top1", 100, "{:+.1f}", 1), ("ece", 1, "{:+.3f}", -1),
                                         ("nll", 1, "{:+.3f}", -1), ("agrees", 100, "{:+.1f}", 1)):
            m, lo, hi, better = paired_t([sign * r[key][metric] for r in res[a]],
                                         [sign * r[key][metric] for r in res[b]])
            lo, hi = sorted((sign * lo, sign * hi))
            cells.append(f"{fmt.format(scale * sign * m)} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}] "
                         f"({better}/{n})")
        label = {"all": "all", "2+": "2–4 attractors"}.get(key, f"{key} attractor{'s' * (key != '1')}")
        rows.append([f"{NAMES[a].split(' (')[0]} − {NAMES[b].split(' (')[0]}" if key == "all" else "", label, *cells])
    return rows


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = {"lstm": "tab:green", "scratch": "grey", "kd": "tab:blue", "kd_whole": "tab:purple",
               "hard_whole": "tab:orange"}
    for a in ARMS:
        for ax, metric in zip(axes, ("top1", "ece")):
            scale = 100 if metric == "top1" else 1
            ms = [mean_std(scale * r[str(g)][metric] for r in res[a]) for g in GROUPS]
            ax.errorbar(np.array(GROUPS) + 0.06 * (ARMS.index(a) - 2), [m for m, _ in ms], yerr=[s for _, s in ms],
                        marker="o", capsize=3, color=colours[a], label=NAMES[a])
    axes[0].set_ylabel("test top-1 %")
    axes[1].set_ylabel("test ECE (15 bins)")
    for ax in axes:
        ax.set_xlabel("attractors (training saw ≤ 1)")
        ax.set_xticks(GROUPS)
        ax.axvspan(1.5, 4.5, color="0.93", zorder=0)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[0].set_title("agreement accuracy by number of attractors (mean ± std over seeds)", fontsize=9)
    axes[1].set_title("calibration by number of attractors", fontsize=9)
    fig.tight_layout()
    savefig(fig, "agreement.png")


if __name__ == "__main__":
    main()
