"""(9) Born-Again language models: generations of a byte-level LSTM LM on Python's own reference text (pydoc).

Corpus: the built-in ``pydoc`` dataset (pydoc_data.topics, UTF-8 bytes as tokens; train = the first 90 %, 419 584
positions; test = the last 10 %, 46 592), windows of SEQ_LEN bytes.  Every generation is the same ``lstm_lm``
(dim 96), trained for the same budget (EPOCHS epochs, AdamW lr 3e-3, batch 32 windows):

    gen 0: labels (next-byte cross-entropy)                        -> kdcache dump --topk 32 (q8 values + tail)
    gen g: per-token KD from gen g-1's cache, T = 1, alpha = 0      -> dump -> ...
           (the teacher's distribution only, as in BAN)

Scores on the test split: perplexity per byte (what kdtrain reports), bits per byte, next-byte accuracy, ECE, and
the ensembles of generations (their predicted probabilities averaged per position), scored here with
build_model + load_weights on the test windows.  Generation g of seed s trains with seed 100 g + s.

Two controls: on every seed, generation 1 distilled *online* (gen 0 run in the training loop through run_train's
Targets hook, its full fp32 distribution) -- what the cache's top-32 + tail and q8 values cost, if anything; on
seed 0, generation 0 trained for as many epochs as the whole chain of generations ("just train longer").

    .venv/bin/python -m experiments.born_again_lm --seeds 5   # 1159 s on the 2 shared cores (load average ~18 -> ~7)
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import torch

from experiments.common import OnlineTeacher, cache_facts, md_table, paired_t, pm, setup
from kdcache.config import LossConfig
from kdcache.data.datasets import open_dataset
from kdcache.models import build_model, checkpoint_arch_args, load_weights, param_count
from kdcache.train import metrics

SEQ_LEN = 64
EPOCHS = 3
GENS = 3  # born-again generations after gen 0: gens 0..GENS, GENS + 1 models per seed
TOPK = 32
LM = dict(student="lstm_lm", student_args={"dim": 96}, dataset="pydoc", seq_len=SEQ_LEN, epochs=EPOCHS,
          batch_size=32, lr=3e-3)
BAN = LossConfig("kd", alpha=0.0, temperature=1.0)


def load_lm(ckpt: str, ds) -> torch.nn.Module:
    """A kdtrain checkpoint of the LM rebuilt for `ds` (build_model + load_weights), in eval mode."""
    model = build_model(LM["student"], ds.info.num_classes, tuple(ds.info.sample_shape), checkpoint_arch_args(ckpt),
                        **ds.info.model_inputs)
    load_weights(model, ckpt, LM["student"])
    return model.eval()


@torch.inference_mode()
def test_logprobs(ckpt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (N * L, V), next-byte labels (N * L,)) of a checkpoint on the pydoc test windows."""
    ds = open_dataset("pydoc", "test", seq_len=SEQ_LEN)
    model = load_lm(ckpt, ds)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    out = torch.cat([model(x[i:i + 128]).float().log_softmax(-1) for i in range(0, len(x), 128)])
    return out.reshape(-1, out.shape[-1]), torch.from_numpy(np.asarray(ds.labels, dtype=np.int64)).reshape(-1)


def lm_scores(logp: torch.Tensor, y: torch.Tensor) -> dict:
    """Perplexity per byte, bits per byte, next-byte accuracy, ECE (15 bins) of per-position log-probabilities."""
    nll = float(-logp.gather(1, y[:, None]).mean())
    return {"ppl": math.exp(nll), "bits_per_byte": nll / math.log(2), "nll": nll,
            "top1": float((logp.argmax(1) == y).float().mean()), "ece": metrics.ece(logp.exp(), y)}


def ensemble(logps: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' probabilities."""
    return torch.logsumexp(torch.stack(logps), 0) - math.log(len(logps))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean KL(p || q) per position, nats."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def main() -> None:
    e = setup("born_again_lm", __doc__.splitlines()[0], default_seeds=5)
    gens = list(range(GENS + 1))
    names = [f"gen {g}" for g in gens]
    ens = {f"ensemble gens 0–{GENS}": gens, f"ensemble gens 1–{GENS}": gens[1:]}
    res: dict[str, list[dict]] = {n: [] for n in [*names, *ens]}
    facts: list[dict] = []
    ctrl: dict[str, list[dict]] = {"online": [], "full": []}
    for s in e.seeds:
        logps, f = [], {}
        cache = None
        for g in gens:
            run = f"gen{g}-{s}"
            kw = {} if g == 0 else {"caches": (cache,), "objective": BAN}
            final = e.train(run, seed=100 * g + s, **kw, **LM)["final"]
            logp, y = test_logprobs(e.checkpoint(run))
            sc = lm_scores(logp, y)
            assert abs(sc["ppl"] - final["test_ppl"]) < 1e-3 * sc["ppl"], (sc["ppl"], final["test_ppl"])
            if g > 0:
                sc["kl_to_teacher"] = kl(logps[-1], logp)
                sc["nll_minus_teacher"] = sc["nll"] - res[names[g - 1]][-1]["nll"]
            res[names[g]].append(sc)
            logps.append(logp)
            if g < GENS:
                cache = e.dump(run, run, LM["student"], dataset="pydoc", seq_len=SEQ_LEN, topk=TOPK)
                f[names[g]] = cache_facts(cache)
                if g == 0:  # controls: gen 1 from a full-logit fp16 cache, and online (no cache); same seed
                    full = e.dump(f"{run}-full", run, LM["student"], dataset="pydoc", seq_len=SEQ_LEN, dtype="float16")
                    f["gen 0 full"] = cache_facts(full)
                    e.train(f"full-gen1-{s}", seed=100 + s, caches=(full,), objective=BAN, **LM)
                    shutil.rmtree(full)  # 100+ MB
                    teacher = load_lm(e.checkpoint(run), open_dataset("pydoc", "train", seq_len=SEQ_LEN))
                    e.train(f"online-gen1-{s}", seed=100 + s, targets=OnlineTeacher(teacher), objective=BAN, **LM)
                    for arm in ctrl:
                        lp, _ = test_logprobs(e.checkpoint(f"{arm}-gen1-{s}"))
                        ctrl[arm].append(lm_scores(lp, y) | {"kl_to_teacher": kl(logp, lp)})
        for name, members in ens.items():
            res[name].append(lm_scores(ensemble([logps[g] for g in members]), y))
        facts.append(f)
        e.log(f"seed {s}: perplexity " + ", ".join(f"{n} {res[n][-1]['ppl']:.3f}" for n in res))
    # control: gen 0 trained for the epochs of the whole chain
    long_epochs = EPOCHS * (GENS + 1)
    e.train("gen0-long-0", seed=0, **{**LM, "epochs": long_epochs})
    long = lm_scores(*test_logprobs(e.checkpoint("gen0-long-0")))
    ds = open_dataset("pydoc", "test", seq_len=SEQ_LEN)
    params = param_count(load_lm(e.checkpoint("gen0-0"), ds))
    e.data |= {"results": res, "caches": facts, "controls_gen1": ctrl, "long_gen0_seed0": long, "params": params,
               "config": {"lm": LM, "ban": vars(BAN), "topk": TOPK, "generations": GENS}}

    # ---------------------------------------------------------------- tables
    n = len(e.seeds)
    rows = []
    base = [r["nll"] for r in res["gen 0"]]
    for name, rs in res.items():
        if name == "gen 0":
            d = "—"
        else:
            m, lo, hi, better = paired_t([-r["nll"] for r in rs], [-b for b in base])
            ratio = [math.exp(r["nll"] - b) - 1 for r, b in zip(rs, base)]
            d = (f"{100 * np.mean(ratio):+.1f} % ({-m:+.3f} nats [{-hi:+.3f}, {-lo:+.3f}]); better on {better}/{n}")
        kl_t = pm((r["kl_to_teacher"] for r in rs), 1, 3) if "kl_to_teacher" in rs[0] else "—"
        gap = pm((r["nll_minus_teacher"] for r in rs), 1, 3) if "nll_minus_teacher" in rs[0] else "—"
        label = name if name != "gen 0" else "gen 0 (labels)"
        if name.startswith("gen ") and name != "gen 0":
            label = f"{name} (BAN, KD from gen {int(name[4:]) - 1}'s cache)"
        rows.append([label, pm((r["ppl"] for r in rs), 1, 3), pm((r["bits_per_byte"] for r in rs), 1, 3),
                     pm(r["top1"] for r in rs), pm((r["ece"] for r in rs), 1, 3), d, kl_t, gap])
    e.table(f"Byte-level `lstm_lm` (dim {LM['student_args']['dim']}, {params / 1000:.0f}k parameters) on pydoc, "
            f"--seq-len {SEQ_LEN}, "
            f"{EPOCHS} epochs per generation, top-{TOPK} + tail q8 caches; test split, 46 592 bytes "
            f"(seeds 0–{n - 1})",
            md_table(["model", "perplexity / byte", "bits / byte", "next-byte acc %", "ECE",
                      "perplexity vs gen 0: mean change (Δ NLL [90 % t-interval]); seeds better",
                      "KL(teacher ‖ it) on test, nats", "its NLL − teacher's NLL, nats"], rows, "lrrrrlrr"))

    crow = []
    arms = {"top-32 q8 cache": res["gen 1"], "full fp16 cache": ctrl["full"], "online": ctrl["online"]}
    for name, rs in zip(("gen 1 from gen 0's top-32 + tail q8 cache (BAN, as above)",
                         "gen 1 from gen 0's full-logit float16 cache", "gen 1 online: gen 0 in the loop, fp32 logits"),
                        arms.values()):
        crow.append([name, pm((r["ppl"] for r in rs), 1, 3), pm(r["top1"] for r in rs),
                     pm((r["nll"] for r in rs), 1, 4), pm((r["kl_to_teacher"] for r in rs), 1, 4)])
    for a in ("top-32 q8 cache", "full fp16 cache"):
        dn = paired_t([r["nll"] for r in arms[a]], [r["nll"] for r in ctrl["online"]])
        dk = paired_t([r["kl_to_teacher"] for r in arms[a]], [r["kl_to_teacher"] for r in ctrl["online"]])
        crow.append([f"{a} − online, paired by seed [90 % t-interval] (seeds where the cache is worse)", "", "",
                     f"{dn[0]:+.4f} [{dn[1]:+.4f}, {dn[2]:+.4f}] ({dn[3]}/{n})",
                     f"{dk[0]:+.4f} [{dk[1]:+.4f}, {dk[2]:+.4f}] ({dk[3]}/{n})"])
    crow.append([f"seed 0 only: gen 0 trained {long_epochs} epochs (the whole chain's budget), labels",
                 f"{long['ppl']:.3f}", f"{100 * long['top1']:.1f}", f"{long['nll']:.4f}", "—"])
    e.table(f"Controls: what the cache costs (generation 1 from the cache vs online KD, seeds 0–{n - 1}) and "
            "training gen 0 longer instead",
            md_table(["model", "perplexity / byte", "next-byte acc %", "test NLL, nats/byte",
                      "KL(gen 0 ‖ it) on test, nats"], crow))

    frow = []
    for key in [*(f"gen {g}" for g in gens[:-1]), "gen 0 full"]:
        fs = [f[key] for f in facts]
        frow.append([f"{key} (full logits, float16)" if key.endswith("full") else f"{key} (top-{TOPK} + tail, q8)",
                     pm(x["teacher_top1"] for x in fs), pm((x["mean_entropy"] for x in fs), 1, 3),
                     "100 (all 256)" if fs[0]["topk_mass"] is None else pm(x["topk_mass"] for x in fs),
                     f"{np.mean([x['bytes_per_sample'] for x in fs]) / SEQ_LEN:.1f}"])
    e.table(f"What each generation's cache holds (train split, 419 584 positions; seeds 0–{n - 1})",
            md_table(["teacher's cache", "next-byte acc % on train", "mean entropy (nats)", "mass kept %",
                      "bytes / token on disk"], frow))

    e.finish()


if __name__ == "__main__":
    main()
