"""The experiment report: markdown tables, JSON and PNG figures from :func:`run_systems` output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from routerretriever.files import atomic_write

if TYPE_CHECKING:
    from routerretriever.experiment import Experiment


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    fmt = [[f"{100 * c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in fmt),
        ]
    )


def environment_line(env: dict[str, Any]) -> str:
    """One line saying what ran the models (:func:`routerretriever.devices.describe`)."""
    native = "native" if env.get("bfloat16_native") else "not native"
    runtimes = ", ".join(env.get("corpus_runtimes", [])) or "unknown"
    return (
        f"Ran on {env.get('name', 'an unknown processor')} ({env.get('device', '?')}, "
        f"{env.get('cpu_threads', '?')} CPU threads, bfloat16 {native}), torch "
        f"{env.get('torch', '?')}; corpus runtime: {runtimes}. Scores move in the last digits "
        "from one processor to another."
    )


def write_report(exp: Experiment, res: dict[str, Any]) -> Path:
    """Markdown tables, JSON and PNG figures in the results folder; returns the markdown path."""
    out = exp.cfg.results
    out.mkdir(parents=True, exist_ok=True)
    seen, unseen = res["seen"], res["unseen"]
    md = [
        "# RouterRetriever experiment results",
        "",
        "nDCG@10 x 100 on the test splits. Routing rule chosen on dev instances: "
        f"**{res['rule']}** (dev nDCG@10 by rule: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in res["dev_rule_scores"].items())
        + ").",
        "",
    ]
    if "environment" in res:
        md += [environment_line(res["environment"]), ""]
    md += [
        "## Single models: each expert alone on every test set",
        "",
        _table(
            ["model", *seen, *unseen, "avg (seen)"],
            [
                [
                    m,
                    *(res["per_expert"][m][d] for d in [*seen, *unseen]),
                    float(np.mean([res["per_expert"][m][d] for d in seen])),
                ]
                for m in exp.models
            ],
        ),
        "",
    ]
    md += [
        "## Table 1: systems on the domains with experts",
        "",
        _table(
            ["system", *seen, "avg"],
            [[s.name, *(s.per_domain[d] for d in seen), s.average] for s in res["systems"]],
        ),
        "",
    ]
    md += [
        "Routing accuracy (share of each test set routed to its own domain's expert, "
        f"RouterRetriever ({res['rule']})): "
        + ", ".join(f"{d} {100 * a:.0f}%" for d, a in res["routing_accuracy"].items()),
        "",
    ]
    if res.get("bf16_agreement"):
        md += [
            "Routing pass in bfloat16: share of each test set routed as by the float32 pass: "
            + ", ".join(f"{d} {100 * a:.1f}%" for d, a in res["bf16_agreement"].items()),
            "",
        ]
    z = res["zero_shot"]
    cols = [*seen, *unseen]
    md += [
        "## Table 2: zero-shot (own expert and its instances removed; unseen domains with all)",
        "",
        _table(
            ["system", *cols, "avg"],
            [
                [k, *(v[d] for d in cols), float(np.mean([v[d] for d in cols]))]
                for k, v in z.items()
            ],
        ),
        "",
    ]
    md += [
        "## Table 3: experts added one at a time (average over the domains with experts)",
        "",
        _table(
            ["experts", "RouterRetriever", "InstanceOracle"],
            [[" + ".join(g["experts"]), g["router"], g["instance_oracle"]] for g in res["growth"]],
        ),
        "",
    ]
    md += ["![growth](growth.png)", "", "![routing](routing.png)", ""]
    if "pool" in res:
        md += _pool_section(res["pool"], seen, unseen)
    path = out / "results.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(md)))
    payload = {**res, "systems": [asdict(s) | {"average": s.average} for s in res["systems"]]}
    if "pool" in res:  # what scripts read first: the default system
        d = res["pool"]["default"]
        payload = {
            "default": {
                "name": d["name"],
                "per_domain": d["per_domain"],
                "average": d["average"],
                "zero_shot_average": d["zero_shot_average"],
            },
            **payload,
        }
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    _figures(exp, res, out)
    return path


def _margin_note(d: dict[str, Any]) -> str:
    """What the default's lead on dev is worth, and whether its gate kept any expert."""
    m = d.get("dev_margin")
    note = ""
    if m and m["over"] != d["name"]:
        note = (
            f"On the dev queries it was chosen on, it leads {m['over']} by "
            f"{100 * m['difference']:+.2f} (standard error {100 * m['se']:.2f})"
            + (
                ": within one standard error, so dev does not tell them apart."
                if m["within_noise"]
                else "."
            )
        )
    best = d.get("best_on_dev", d["name"])
    if m and best != d["name"]:
        note = (
            f"The best on dev was {best}, leading by {100 * m['difference']:+.2f} (standard "
            f"error {100 * m['se']:.2f}): under {d.get('min_lead_se', 0):g} standard errors "
            "(the config's min_lead_se), so base + BM25 is the default."
        )
    if d.get("declines_every_expert"):
        note += (
            " Fitted on all dev instances, its gate declines every expert: the saved system "
            "answers every query as the base model fused with BM25 (its dev score is that of "
            "the gates fitted on the folds)."
        )
    return note.strip()


def _pool_section(pool: dict[str, Any], seen: list[str], unseen: list[str]) -> list[str]:
    """Markdown for :func:`routerretriever.hybrid_eval.run_pool`'s results."""
    lab = pool["labelled_dev_domains"]
    chosen = set(pool["family_choice"].values())
    d = pool["default"]

    def row(name: str, dev: dict, test: dict, extra: Sequence[Any]) -> list[Any]:
        return [
            name,
            float(np.mean([dev[x] for x in lab])),
            float(np.mean(list(dev.values()))),
            *(test[x] for x in seen),
            float(np.mean([test[x] for x in seen])),
            *extra,
        ]

    header = ["system", "dev (labelled)", "dev (all)", *seen, "avg", "passes", "chosen"]
    rows = [row(n, v["dev"], v["test"], ["", ""]) for n, v in pool["baselines"].items()] + [
        row(
            c["name"],
            c["dev"],
            c["test"],
            [
                f"{c['cost']:.2f}",
                "default" if c["name"] == d["name"] else "family" if c["name"] in chosen else "",
            ],
        )
        for c in pool["candidates"]
    ]
    z = d["zero_shot"]
    b = pool["base_fused"]["per_domain"]
    cols = [*seen, *unseen]
    zero_rows = [
        [pool["base_fused"]["name"], *(b[x] for x in cols), float(np.mean([b[x] for x in cols]))]
    ]
    if d["name"] != pool["base_fused"]["name"]:  # the default may be base + BM25 itself
        zero_rows.append([d["name"], *(z[x] for x in cols), float(np.mean([z[x] for x in cols]))])
    gates = pool.get("gates", [])
    for g in gates:
        if g["name"] != d["name"]:
            gz = g["zero_shot"]
            zero_rows.append(
                [g["name"], *(gz[x] for x in cols), float(np.mean([gz[x] for x in cols]))]
            )
    gate_lines: list[str] = []
    if gates:
        gate_lines = [
            "Gated routers: an expert is kept only if, on the dev instances routed to it, it "
            "beats the base model (both fused with BM25 at the same weight) with a one-sided "
            "paired t-test at p < 0.05; its queries otherwise get the base model's vector, which "
            "costs no expert pass. Dev scores of gated families are cross-fitted (every dev set "
            f"in {pool.get('folds', 2)} folds, each scored by the gate fitted on the others). "
            "Gated per corpus: the same test on each domain's dev instances apart; an expert is "
            "kept only on the corpora where it passed, elsewhere (unseen corpora included) its "
            "queries get base + BM25 at the base family's weight. "
            "Declined, fitted on all dev: "
            + "; ".join(f"{g['name']}: {', '.join(g['declined']) or 'none'}" for g in gates)
            + ". Kept per corpus: "
            + "; ".join(
                f"{g['name']}: "
                + (", ".join(f"{e} on {'/'.join(cs)}" for e, cs in g["kept_on"].items()) or "none")
                for g in gates
                if g.get("kept_on") is not None
            )
            + ".",
            "",
        ]
    return [
        "## The pool with a lexical member: every candidate",
        "",
        f"Default (chosen on dev, see selection.py): **{d['name']}**, test average "
        f"{100 * d['average']:.1f}, zero-shot average {100 * d['zero_shot_average']:.1f}. "
        "dev (labelled): mean over the dev instances of "
        + ", ".join(lab)
        + " (real queries; each family's lexical weight, then the family, among those needing "
        f"at most {pool.get('max_passes', 1.0)} expert passes per query, are chosen there); "
        "dev (all): mean over every domain's dev instances. passes: expert passes per query beyond "
        "the routing pass, on dev. Lexical weight each family would get if chosen on all dev "
        "instances, pseudo-queries included: "
        + ", ".join(f"{f} {a}" for f, a in pool["alpha_if_chosen_on_all_dev"].items())
        + ".",
        "",
        *([note, ""] if (note := _margin_note(d)) else []),
        "Dev instances of each domain (gates, lexical weights and families are scored there): "
        + "; ".join(f"{k}: {v}" for k, v in pool.get("dev_sets", {}).items())
        + ".",
        "",
        _table(header, rows),
        "",
        *gate_lines,
        "### Zero-shot (own expert and its instances removed; unseen domains with all)",
        "",
        _table(["system", *cols, "avg"], zero_rows),
        "",
        "### Growth: experts added one at a time (default system, average over seen domains)",
        "",
        _table(
            ["experts", d["name"]],
            [[" + ".join(g["experts"]), g["average"]] for g in pool["growth"]],
        ),
        "",
    ]


def _figures(exp: Experiment, res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = res["growth"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(1, len(g) + 1)
    ax.plot(
        xs, [100 * p["router"] for p in g], marker="o", label=f"RouterRetriever ({res['rule']})"
    )
    ax.plot(xs, [100 * p["instance_oracle"] for p in g], marker="s", label="InstanceOracle")
    base = next(s for s in res["systems"] if s.name == "Base model").average
    ax.axhline(100 * base, color="grey", ls="--", label="Base model")
    ax.set_xticks(list(xs), [p["experts"][-1] for p in g], rotation=30)
    ax.set_xlabel("expert added")
    ax.set_ylabel("avg nDCG@10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=120)
    plt.close(fig)

    seen, experts = res["seen"], exp.experts
    rr = next(s for s in res["systems"] if s.name == f"RouterRetriever ({res['rule']})")
    io = next(s for s in res["systems"] if s.name == "InstanceOracle")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sysres, title in ((axes[0], rr, rr.name), (axes[1], io, "InstanceOracle")):
        m = np.array([[sysres.routes[d].get(e, 0.0) for e in experts] for d in seen])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(seen)):
            for j in range(len(experts)):
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(experts)), experts, rotation=45)
        ax.set_yticks(range(len(seen)), seen)
        ax.set_xlabel("expert")
        ax.set_ylabel("test set")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=120)
    plt.close(fig)
