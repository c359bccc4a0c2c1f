"""``edge-eval`` reports: a markdown table, CSV rows, and PNG plots (ROC/PR curves, score histograms with the
threshold, a contact sheet of the worst misses and false alarms)."""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from clipad.runtime.atomic import write_bytes_atomic
from clipad.runtime.errors import ClipadError

COLUMNS = [("image", "auroc"), ("image", "ap"), ("image", "f1_max"), ("pixel", "auroc"), ("pixel", "ap"),
           ("pixel", "f1_max"), ("pixel", "aupro")]
HEADER = ["class", "good", "defect", "img AUROC", "img AP", "img F1max", "px AUROC", "px AP", "px F1max", "AUPRO",
          "false alarms", "misses"]


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def rows(report: dict) -> list[list[str]]:
    out = []
    for name, c in list(report["classes"].items()) + [("mean", report["mean"])]:
        d = c.get("decision", {})
        out.append([name, str(c.get("n_good", "")), str(c.get("n_defect", ""))]
                   + [_pct(c.get(g, {}).get(k)) for g, k in COLUMNS]
                   + [_pct(d.get("false_alarm_rate")), _pct(d.get("miss_rate"))])
    return out


def fewshot_rows(report: dict) -> list[list[str]]:
    fs = report["fewshot"]
    out = []
    for name, per in list(fs["classes"].items()) + [("mean", fs["mean"])]:
        for view in ("zero_shot", "few_shot", "fused"):
            c = per[view]
            out.append([name, view.replace("_", "-")] + [_pct(c.get(g, {}).get(k)) for g, k in COLUMNS])
    return out


def compare_rows(report: dict) -> list[list[str]]:
    out = []
    comp = report["compare"]
    for name, c in list(comp["classes"].items()) + [("mean", comp["mean"])]:
        out.append([name] + [("–" if c.get(g, {}).get(k) is None else f"{100 * c[g][k]:+.2f}") for g, k in COLUMNS]
                   + [("–" if c.get(k) is None else f"{c[k]:.5f}") for k in ("map_pearson_min", "score_spearman")]
                   + [_pct(c.get("ok_ng_agreement"))])
    return out


def markdown(report: dict) -> str:
    def table(header, body):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

    text = [f"**{report['model']}** on {report['backend']} ({report['precision']}); metrics in %"]
    if report.get("note"):
        text.append(f"**Note:** {report['note']}")
    text.append(table(HEADER, rows(report)))
    if "compare" in report:
        text.append(f"Compared with {report['compare']['candidate']} (deltas candidate − reference, in points):")
        text.append(table(["class"] + [h for h in HEADER[3:10]] + ["map Pearson min", "score Spearman",
                                                                   "OK/NG agreement"], compare_rows(report)))
        notes = {c.get("ok_ng_note") for c in report["compare"]["classes"].values()} - {None}
        text += [f"- OK/NG: {note}" for note in sorted(notes)]
    if "fewshot" in report:
        fs = report["fewshot"]
        coreset = f", coreset {fs['coreset']:g}" if fs.get("coreset") else ""
        text.append(f"Few-shot: a memory of {fs['k']} image(s) per class from {fs['memory_from']} (seed "
                    f"{fs['seed']}{coreset}); zero-shot, few-shot and fused:")
        text.append(table(["class", "view"] + HEADER[3:10], fewshot_rows(report)))
    for warning in report["warnings"][:20]:
        text.append(f"- warning: {warning}")
    if len(report["warnings"]) > 20:
        text.append(f"- … {len(report['warnings']) - 20} more warnings in the JSON report")
    if report["unreadable"]:
        text.append(f"- {len(report['unreadable'])} unreadable image(s) left out (listed in the JSON report)")
    return "\n\n".join(text) + "\n"


def write_csv(path: str, report: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HEADER)
    writer.writerows(rows(report))
    write_bytes_atomic(path, buf.getvalue().encode())


def check_plotting() -> None:
    """--plots needs matplotlib and scikit-learn: said before the run, not after it."""
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ClipadError(f"--plots needs {exc.name}: pip install 'clipad-edge[eval]'") from None


def plots(folder: str, report: dict, detector) -> list[str]:
    """Per class: ROC + PR curves, decision-score histograms (good vs defect, threshold line) and the worst cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    os.makedirs(folder, exist_ok=True)
    written = []
    for cls, result in report["classes"].items():
        rows_ = [r for r in report["images"] if r["class"] == cls and r["decision_score"] is not None]
        labels = np.array([r["label"] == "defect" for r in rows_])
        scores = np.array([r["decision_score"] for r in rows_], float)
        threshold = result["decision"].get("threshold")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        if labels.any() and (~labels).any():
            fpr, tpr, _ = roc_curve(labels, scores)
            precision, recall, _ = precision_recall_curve(labels, scores)
            axes[0].plot(fpr, tpr)
            axes[1].plot(recall, precision)
        axes[0].set(title=f"{cls}: image ROC (AUROC {_pct(result['image']['auroc'])})", xlabel="false positive rate",
                    ylabel="true positive rate")
        axes[1].set(title=f"image PR (AP {_pct(result['image']['ap'])})", xlabel="recall", ylabel="precision")
        bins = np.histogram_bin_edges(scores, 30) if len(scores) else 10
        axes[2].hist(scores[~labels], bins=bins, alpha=0.6, label="good")
        axes[2].hist(scores[labels], bins=bins, alpha=0.6, label="defect")
        if threshold is not None:
            axes[2].axvline(threshold, color="k", linestyle="--", label="threshold")
        axes[2].set(title=f"decision score ({result['decision']['score']})", xlabel="score", ylabel="images")
        axes[2].legend()
        fig.tight_layout()
        written.append(_save(fig, os.path.join(folder, f"{cls}_curves.png")))
        plt.close(fig)
        written.append(_worst(folder, cls, rows_, threshold, detector, report["class_map"][cls]))
    return written


def _save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_bytes_atomic(path, buf.getvalue())


def _worst(folder: str, cls: str, rows_: list[dict], threshold, detector, model_class: str, n: int = 4) -> str:
    """Contact sheet: the n defects with the lowest scores (misses first) and the n good images with the highest."""
    import matplotlib.pyplot as plt

    from clipad.runtime.inputs import load_image
    from clipad.runtime.render import overlay

    misses = sorted((r for r in rows_ if r["label"] == "defect"), key=lambda r: r["decision_score"])[:n]
    alarms = sorted((r for r in rows_ if r["label"] == "good"), key=lambda r: -r["decision_score"])[:n]
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 7), squeeze=False)
    for row, (title, picked) in enumerate((("lowest-scored defects", misses), ("highest-scored good", alarms))):
        for col in range(n):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(picked):
                continue
            r = picked[col]
            rgb = np.asarray(load_image(r["path"]))
            pred = detector.predict(rgb, model_class)
            low, high = detector.policy.display_range(model_class, pred.anomaly_map)
            shown = overlay(np.ascontiguousarray(rgb[:, :, ::-1]), pred.anomaly_map, low, high, label=pred.label)
            ax.imshow(shown[:, :, ::-1])
            verdict = "" if threshold is None else (" NG" if r["decision_score"] >= threshold else " OK")
            ax.set_title(f"{os.path.basename(r['path'])}\n{r['defect']} {r['decision_score']:.4g}{verdict}",
                         fontsize=8)
        axes[row][0].text(-0.1, 0.5, title, transform=axes[row][0].transAxes, rotation=90, va="center", ha="right")
    fig.tight_layout()
    path = _save(fig, os.path.join(folder, f"{cls}_worst.png"))
    plt.close(fig)
    return path
