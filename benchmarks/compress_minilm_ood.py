"""Out-of-domain check of MiniLM's INT8 artifact, made by ``headrace compress minilm --data``.

Calibration and the mixed-precision search see only Python documentation sentences
(``headrace.models.builtin.corpus``: pydoc topics + stdlib docstrings, train split). The
artifact is then measured on three held-out corpora: the Python-docs held-out split (the
calibration domain), legal text (licence files of installed packages) and scientific prose
(scikit-learn's dataset descriptions). Speed: the INT8 artifact against fp32 torch and the
fp32 ONNX graph, side by side in one run, batch 1/8/32 (same threads).

    .venv/bin/python -m benchmarks.compress_minilm_ood --threads 2 [--min-fidelity 0.995]

Also prints the fully quantized model (no node kept fp32) on the same corpora, to show what
the mixed-precision search's floor buys in and out of domain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from headrace.models.builtin.corpus import load_corpus, sample
from headrace.models.compress import report as R
from headrace.models.compress.fidelity import embedding_fidelity
from headrace.models.repository.store import ModelRepository

WORK = Path("runs/compress-minilm-ood")
CORPORA = {"python-docs (calibration domain)": ("pydoc", "docstrings"), "legal (licences)": ("licenses",),
           "science (dataset descriptions)": ("datasets",)}


def corpora(n_pydoc: int, seed: int) -> dict[str, list[str]]:
    out = {}
    for label, sources in CORPORA.items():
        c = load_corpus(sources)
        pool = list(c.held_out) if "pydoc" in sources else [*c.train, *c.held_out]
        out[label] = sample(pool, n_pydoc, seed=seed) if "pydoc" in sources else pool
    return out


def embed(run: Any, tok: Any, sentences: list[str]) -> np.ndarray[Any, Any]:
    from headrace.models.tokenizer import encode_batch

    outs = []
    for i in range(0, len(sentences), 32):
        ids, mask = encode_batch(tok, sentences[i:i + 32])
        outs.append(run({"input_ids": ids, "attention_mask": mask}))
    return np.concatenate(outs)


def compress(repo: ModelRepository, args: argparse.Namespace) -> Any:
    from headrace.models.builtin.build import build_minilm
    from headrace.models.compress.anymodel import AnyModelOptions, run_any

    build_minilm(repo)
    c = load_corpus()
    WORK.mkdir(parents=True, exist_ok=True)
    cal = WORK / "calibration.txt"
    cal.write_text("\n".join(sample(c.train, args.calibration, seed=1)) + "\n")
    held = WORK / "held_out_pydoc.txt"
    held.write_text("\n".join(c.held_out) + "\n")
    return run_any(AnyModelOptions("minilm", data=cal, held_out=held, repo=repo.root, work_dir=WORK,
                                   steps=("quantize-dynamic",), min_fidelity=args.min_fidelity, threads=args.threads,
                                   calibration_limit=args.calibration, bench=False))


def speed(paths: dict[str, Path], tok: Any, threads: int, sentences: list[str]) -> dict[str, R.Row]:
    from headrace.models.builtin.minilm import load_minilm
    from headrace.models.tokenizer import encode_batch

    arts = [R.Artifact("fp32 torch", "torch", "fp32", R.torch_runner(load_minilm(), threads))]
    arts += [R.Artifact(k, "onnxruntime", k, R.ort_runner(p, threads)) for k, p in paths.items()]
    by_size = {}
    for b in R.BATCH_SIZES:
        pool = sentences[:64] if b == 1 else sentences[:256]
        srt = sorted(pool, key=len)
        by_size[b] = [dict(zip(("input_ids", "attention_mask"), encode_batch(tok, srt[i:i + b]), strict=True))
                      for i in range(0, len(srt), b)]
    times = R.measure_speed(arts, by_size, min_passes=5)
    rows = {a.label: R.Row(a.label, a.backend, a.precision, 0, 0) for a in arts}
    for label, t in times.items():
        R.summarize_speed(rows[label], t, R.pass_rows(by_size))
    R.add_speedups(list(rows.values()), "fp32 torch")
    return rows


def plot(table: dict[str, Any], speedup: float, path: Path) -> Path:
    """Overlap@10 and mean cosine per corpus, published vs fully quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), dpi=120)
    labels = list(table)
    x = np.arange(len(labels))
    for ax, key, target in ((axes[0], "overlap_at_k", 0.90), (axes[1], "mean_cosine", 0.99)):
        for off, which, name in ((-0.18, "search", "published (3 MatMuls fp32)"), (0.18, "full", "fully quantized")):
            ax.bar(x + off, [table[k][which][key] for k in labels], width=0.36, label=name)
        ax.axhline(target, color="red", lw=1, ls="--", label=f"target {target}")
        ax.set_xticks(x, [k.split(" (")[0] for k in labels])
        ax.set_ylim(0.85 if key == "overlap_at_k" else 0.98, 1.0)
        ax.set_title(key.replace("_at_k", "@10").replace("_", " "))
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"MiniLM INT8 calibrated on Python docs, held-out corpora of 3 domains ({speedup:.2f}x fp32 torch @32)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-fidelity", type=float, default=0.995)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--repo", default=str(WORK / "model_repo"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from headrace.models.tokenizer import load_tokenizer

    repo = ModelRepository(args.repo)
    res = compress(repo, args)
    print(res.markdown)
    if not res.published:
        print("nothing published:", res.refused, res.details.get("failed"))
        return 1
    m = repo.load_manifest(*res.published[0].split("/"))
    paths = {"fp32 onnx": repo.file_path(repo.load_manifest("minilm"), "model.onnx"),
             "int8": repo.file_path(m, "model.onnx")}
    tok = load_tokenizer()
    fp32 = R.ort_runner(paths["fp32 onnx"], args.threads)
    int8 = R.ort_runner(paths["int8"], args.threads)
    from headrace.models.compress import quantize as Q

    full = Q.quantize_dynamic_int8(paths["fp32 onnx"], WORK / "full-int8.onnx",
                                   op_types=m.recipe[-1]["params"]["op_types"] or Q.DYNAMIC_OPS)
    table = {}
    for label, sents in corpora(1153, seed=0).items():
        ref = embed(fp32, tok, sents)
        table[label] = {"search": embedding_fidelity(ref, embed(int8, tok, sents)).to_dict(),
                        "full": embedding_fidelity(ref, embed(R.ort_runner(full, args.threads), tok, sents)).to_dict()}
    print(f"\nload average {os.getloadavg()}; artifact {res.published[0]} "
          f"({m.precision}, fp32 nodes {m.recipe[-1]['params']['fp32_nodes']})")
    print("| corpus | sentences | artifact | mean cos | min cos | overlap@10 | spearman |\n|---|---|---|---|---|---|---|")
    for label, both in table.items():
        for which, f in (("searched (published)", both["search"]), ("fully quantized", both["full"])):
            print(f"| {label} | {f['n']} | {which} | {f['mean_cosine']:.4f} | {f['min_cosine']:.4f} "
                  f"| {f['overlap_at_k']:.3f} | {f['spearman']:.4f} |")
    rows = speed(paths, tok, args.threads, load_corpus().held_out[:256])
    print(f"\nload average {os.getloadavg()}\n| artifact | /s @1 | /s @8 | /s @32 | × torch @32 |\n|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r.label} | {r.throughput[1]:.0f} | {r.throughput[8]:.0f} | {r.throughput[32]:.0f} "
              f"| {r.speedup[32]:.2f} |")
    plot(table, rows["int8"].speedup[32], Path("docs/img/compress-minilm-ood.png"))
    (WORK / "ood.json").write_text(json.dumps({"fidelity": table, "artifact": res.published[0],
                                               "speed": {k: v.to_dict() for k, v in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
