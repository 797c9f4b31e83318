"""Is the trained model useful? Held-out cell-type accuracy, embedding quality and denoising,
against simple baselines computed in the same run.

    python benchmarks/bench_quality.py [--out DIR] [--steps 600] [--ranks 2] [--context 1024]
        [--batch-size 16] [--model tiny] [--seeds 0 1 2]
        [--held-out FILE --held-out-label COLUMN] [--doc PATH]

What it does, all on real cells (the Kang et al. 2018 PBMC file of data/, 13 cell types, control
and interferon-stimulated cells of the same donors):

1. Splits the PBMC file into its CTRL and STIM cells (derived files, written under ``--out``).
2. Builds shards from the CTRL cells (plus the datasets of ``--train-sheet``) and trains the model
   with ``torchrun`` and nothing but ``--model --max-steps --context --batch-size``: the preset's
   recipe supplies the rest. Then exports it to one file.
3. Embeds cells the model never trained on with ``pretrain.embed`` (neighbours from their own
   PCA -> kNN graph, as a user would):
   (a) a shift within a dataset: the STIM cells, whose labels come from the same annotation;
   (b) a dataset left out of training entirely (``--held-out``), scored by 5-fold
       cross-validation of probes fitted on that dataset's own cells.
4. Scores, on those cells: the classification head (accuracy, macro-F1), a kNN probe (k = 15)
   on the embedding, and denoising (Pearson of log2(1 + count) against the uncorrupted counts
   after the training corruption: over every context gene, over the genes whose corrupted
   input is 0, and over the counts the corruption dropped). Baselines, each in this run: the
   majority class; logistic regression on log-normalised counts; kNN (k = 15) on 50 PCs of
   log-normalised counts (PCA fitted on the training cells); both again on each cell's profile
   averaged with its neighbours' (the graph ``pretrain.embed`` gives the model: what the
   neighbours tell the model, given to the baselines too); for (b) these on only the dataset's
   genes the model reads; each model again with no neighbours given (what it makes of the
   cell's own genes); the same model at random initialisation (head,
   embedding probe, denoising); for denoising, the corrupted input itself, the library-size
   mean (each gene's share of the training cells' counts), the neighbour average and the cell
   averaged with its neighbours (kNN smoothing), and the model given no neighbours. Every
   denoising predictor is scaled to the same total (the cell's counts over its context genes,
   as the model's ZINB mean is).
5. Prints the table, and writes it with a 2-D t-SNE picture of the STIM cells' embedding
   (trained vs random initialisation, coloured by cell type) to ``--doc`` and beside it.

With several ``--seeds`` every step that involves the model (training, export, random
initialisation, embedding, scores) runs once per seed (initial weights and data stream); the
table gives each model row's mean +- standard deviation and every seed's value, since one short
run on ~1,300 cells moves by a few points from seed to seed. The baselines are deterministic.

Nothing leaks: the STIM cells and the held-out dataset are in no shard; the probes and
baselines fit on the training cells (a) or within folds of the held-out dataset (b). The
neighbour graph of a file is built from its counts alone (no labels), as a user's would be; it
is built from all of the file's genes, so on a dataset whose genes the model mostly does not
know it carries more than the model's genes do: the rows without neighbours, and the baselines
on neighbour-averaged profiles, show how much.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain.embed import PRECISIONS  # noqa: E402
from utils import atomic  # noqa: E402
from utils.cpus import cpu_model  # noqa: E402

PBMC = REPO / "data" / "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
LABEL = "cell_type"
K_PROBE = 15


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def split_pbmc(out: Path) -> tuple[Path, Path]:
    """The PBMC file's CTRL and STIM cells as two derived files (written once)."""
    import anndata as ad

    paths = out / "pbmc_CTRL.h5ad", out / "pbmc_STIM.h5ad"
    if all(p.is_file() for p in paths):
        return paths
    full = ad.read_h5ad(PBMC)
    for sample, path in zip(("CTRL", "STIM"), paths):
        part = full[full.obs["sample"] == sample].copy()
        part.uns["source"] = f"{full.uns.get('source', PBMC.name)}; derived: its {sample} cells"
        with atomic.atomic_path(path) as tmp:
            part.write_h5ad(tmp)
    return paths


def log_normalised(x) -> np.ndarray:
    """log1p(counts / total * 1e4), dense float32."""
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    x = x.astype(np.float32)
    total = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(total, 1) * 1e4)


def read_counts(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised counts (dense) and the labels of ``label`` of one file."""
    import anndata as ad

    a = ad.read_h5ad(path)
    if label not in a.obs:
        raise SystemExit(f"{path}: no obs column {label!r}")
    return log_normalised(a.X), a.obs[label].astype(str).to_numpy()


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def training_sheet(ctrl: Path, extra_sheet: str, out: Path) -> Path:
    """The training datasets: the CTRL cells, plus every row of ``extra_sheet`` except the PBMC
    file (its STIM cells are test cells); paths made absolute."""
    import pandas as pd

    rows = [pd.DataFrame({"path": [str(ctrl.resolve())], "organism": ["human"],
                          "name": ["pbmc_CTRL"], LABEL: [LABEL], "sex": ["-"]})]
    if extra_sheet:
        extra = pd.read_csv(extra_sheet, dtype=str, keep_default_na=False)
        extra["path"] = [str((Path(extra_sheet).parent / p).resolve()) for p in extra["path"]]
        rows.append(extra[[Path(p).resolve() != PBMC.resolve() for p in extra["path"]]])
    sheet = out / "train_sheet.csv"
    with atomic.atomic_path(sheet) as tmp:
        pd.concat(rows, ignore_index=True).fillna("").to_csv(tmp, index=False)
    return sheet


def build_shards(sheet: Path, out: Path, context: int, extra: str) -> Path:
    shards = out / "shards"
    cmd = [sys.executable, "-m", "data_prep.build_shards", "--sheet", str(sheet), "--out",
           str(shards), "--jobs", "2", "--quiet", "--context-genes", str(context),
           *shlex.split(extra)]
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True)
    return shards


def train(args, shards: Path, run: Path, seed: int) -> float:
    """The trainer with the preset's recipe; returns wall-clock seconds. A run this command
    finished before (``RUN/bench_training.json``) is not trained again: a rerun with more
    seeds or another ``--held-out`` only scores."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
           str(args.ranks), "pretrain/train.py", "--deepspeed_config", "ds_configs/zero2.json",
           "--shards", str(shards), "--out", str(run), "--model", args.model,
           "--max-steps", str(args.steps), "--context", str(args.context),
           "--batch-size", str(args.batch_size), "--seed", str(seed), "--eval-every", "0",
           "--log-every", "25", *shlex.split(args.trainer_args)]
    done = run / "bench_training.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record["command"] != cmd:
            raise SystemExit(f"{run}: trained by another command ({shlex.join(record['command'])})"
                             f"; give another --out, or remove {run} to train it again")
        return float(record["seconds"])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    atomic.write_json(done, {"command": cmd, "seconds": seconds})
    return seconds


def trained_precision(run: Path) -> str:
    """The precision the run trained in, as its resolved DeepSpeed JSON says (``--precision
    auto`` means bf16-mixed where bf16 is native and fp32 elsewhere, so the page names it)."""
    from pretrain.config import precision_of

    return precision_of(json.loads((run / "config.json").read_text())["deepspeed"])


def save_random_init(trained: Path, out: Path, seed: int, config=None,
                     context: int | None = None) -> Path:
    """The trained file's model at initialisation: its vocabularies and graph settings, with its
    own config and context unless given (a ``ModelConfig`` of another size, another context)."""
    from pretrain.export import load_model_file, write_model_file
    from pretrain.model import ScPrintModel

    exported = load_model_file(trained)
    config = config or exported.config
    torch.manual_seed(seed)
    model = ScPrintModel(config, exported.vocab.n_ids,
                         {c: len(v) for c, v in exported.labels.items()})
    return write_model_file(out, model.state_dict(), config, exported.vocab, exported.labels,
                            context or exported.train_context,
                            graph_config=exported.graph_config, tag="random-init")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def accuracy_f1(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    return float((truth == pred).mean()), float(f1_score(truth, pred, average="macro",
                                                          labels=np.unique(truth)))


def knn_predict(train_x, train_y, test_x) -> np.ndarray:
    """The 15-NN vote that ``pretrain.embed --reference`` gives users (label_transfer)."""
    from pretrain.label_transfer import transfer_labels

    return np.asarray(transfer_labels(train_x, train_y, test_x, K_PROBE)[0], dtype=object)


def logreg_predict(train_x, train_y, test_x) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000).fit(train_x, train_y).predict(test_x)


def pca_knn_predict(train_x, train_y, test_x) -> np.ndarray:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(50, *train_x.shape), random_state=0).fit(train_x)
    return knn_predict(pca.transform(train_x), train_y, pca.transform(test_x))


def model_view(model, path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """What ``pretrain.embed`` gives ``model`` of ``path``, every cell in the file's order: each
    cell's neighbours (int [n_cells, 6], -1 = none; the model's graph settings), whether the
    model reads each of the file's genes, and the counts of the genes it reads (sparse)."""
    from pretrain.embed import open_cells

    with open_cells(model, path) as cells:
        known = cells.col2gid >= 0
        return cells.nbr_idx.copy(), known, cells.counts[:, known]


def neighbour_averaged(x: np.ndarray, nbr_idx: np.ndarray) -> np.ndarray:
    """Each cell's row of ``x`` averaged with its present neighbours' rows (the cell one of the
    k + 1): a baseline's view of the same graph the model reads its neighbours from."""
    total, n = x.astype(np.float32), np.ones((len(x), 1), dtype=np.float32)
    for column in nbr_idx.T:
        present = column >= 0
        total[present] += x[column[present]]
        n[present] += 1
    return total / n


SHIFT = "(a) CTRL -> STIM"
AVERAGED = "the cell and its 6 neighbours averaged"
NO_NEIGHBOURS = ", no neighbours given"  # a model's rows embedded with neighbours=0
SHIFT_BASELINES = [("logistic regression, log-normalised counts", logreg_predict),
                   ("kNN on PCA-50", pca_knn_predict)]


def majority_predict(train_y, n: int) -> np.ndarray:
    values, counts = np.unique(train_y, return_counts=True)
    return np.full(n, values[counts.argmax()])


# Where denoising is scored, each a set of (cell, context gene) positions chosen by what the
# predictors see (the corrupted input), except the last, chosen by the truth (see READING).
DENOISING_SCOPES = ("every context gene", "genes whose input is 0", "dropped counts")


def denoising(models: dict, h5ad: Path, gene_share: dict[int, float],
              seed: int) -> dict[str, dict[str, float]]:
    """Pearson of log2(1 + x) against the uncorrupted counts, per predictor and scope
    (DENOISING_SCOPES), all predictors scaled to the same context total, on one pass over the
    same corrupted batches: each model (same vocabularies); the first one again with no
    neighbours given (what its neighbour encoder brings); no denoising (the corrupted input);
    the library-size mean; the neighbour average; the cell's remaining counts averaged with its
    neighbours' (kNN smoothing, the cell one of the k + 1 profiles); and the first model
    averaged with the neighbour average. A predictor constant over a scope scores NaN."""
    from pretrain.embed import inference_config, iter_batches

    first_name, first = next(iter(models.items()))
    alone = f"{first_name}, no neighbours given"
    as_is, smoothed = "no denoising: the corrupted input", "the cell and its neighbours, averaged"
    names = [*models, alone, as_is, "library-size mean", "neighbour average", smoothed]
    # the training corruption on the model's full context, all 6 neighbours, no 100% pass
    corrupt = replace(inference_config(first.train_context, 6, 64, seed), mask_scale=1.1,
                      mask_max=0.8)
    preds: dict[str, list[np.ndarray]] = {k: [] for k in names}
    truth, scopes = [], {k: [] for k in DENOISING_SCOPES}
    for _, batch in iter_batches(first, h5ad, data_config=corrupt):
        mask = batch["gene_mask"]
        own = batch["input_counts"].float() * mask
        scale = (batch["counts"] * mask).sum(1, keepdim=True)
        share = torch.tensor(np.vectorize(lambda g: gene_share.get(int(g), 0.0))(
            batch["gene_ids"].numpy()), dtype=torch.float32) * mask
        present = batch["nbr_mask"].float()[:, :, None]
        nbr_sum = (batch["nbr_counts"].float() * present).sum(1) * mask
        predicted = {as_is: _to_total(own, scale),
                     "library-size mean": _to_total(share, scale),
                     "neighbour average": _to_total(nbr_sum, scale),
                     smoothed: _to_total((own + nbr_sum) / (1 + present.sum(1)), scale)}
        no_neighbours = dict(batch, nbr_mask=torch.zeros_like(batch["nbr_mask"]))
        with torch.no_grad():
            predicted.update({name: m.model(batch)["pred_mean"] for name, m in models.items()})
            predicted[alone] = first.model(no_neighbours)["pred_mean"]
        for name, p in predicted.items():
            preds[name].append(torch.log2(1 + p[mask]).numpy())
        truth.append(torch.log2(1 + batch["counts"][mask]).numpy())
        for scope, where in zip(DENOISING_SCOPES, (mask, batch["input_counts"] == 0,
                                                   batch["input_counts"] != batch["counts"])):
            scopes[scope].append(where[mask].numpy())
    logs = {name: np.concatenate(preds[name]) for name in names}
    # does the model know what the neighbours do not? then the two together beat both alone
    logs[f"{first_name} and neighbour average, mean of their log2(1 + x)"] = (
        logs[first_name] + logs["neighbour average"]) / 2
    y = np.concatenate(truth)
    where = {scope: np.concatenate(m) for scope, m in scopes.items()}
    return {name: {scope: _pearson(p[w], y[w]) for scope, w in where.items()}
            for name, p in logs.items()}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _to_total(weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per-cell weights over the context genes rescaled to sum to ``total``."""
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-12) * total


def gene_shares(model, h5ad: Path) -> dict[int, float]:
    """Each known gene's share of all counts of the training cells (global id -> share)."""
    import anndata as ad

    from data_prep.organisms import resolve_organism

    a = ad.read_h5ad(h5ad)
    index = model.genes[resolve_organism("human").curie].index
    ids = np.array([index.get(str(g), -1) for g in a.var_names])
    totals = np.asarray(a.X.sum(0)).ravel()
    known = ids >= 0
    share = totals[known] / max(totals[known].sum(), 1)
    return dict(zip(ids[known].tolist(), share.tolist()))


NOTES = "## Notes"
READING = """## How to read it

- (a): the model, the probes and the baselines see only the CTRL cells' labels; every row is
  scored on the STIM cells, which are in no shard (the model meets them first in
  `pretrain.embed`, with neighbours from their own PCA -> kNN graph). Interferon stimulation
  moves many genes, so this is a shift, not a random split.
- (b), when given: a dataset the model never saw; every probe and baseline is fitted and
  scored by 5-fold cross-validation within it (the model's head only where its cell types are
  ones the head knows). Rows naming "the model's N of M genes" give the baselines only the
  genes the model reads of that dataset (those in its vocabulary); the others use all M.
- Neighbours: `pretrain.embed` gives the model each cell's 6 nearest cells of the same file
  (the file's own PCA -> kNN graph, built from all its genes, no labels). Rows ending "the
  cell and its 6 neighbours averaged" give a baseline the same graph (each cell's
  log-normalised profile averaged with its neighbours'); in the classification table, rows
  naming "no neighbours given" embed with `neighbours=0` (probe and reference made the same
  way), so the context holds the cell's own genes only; in the denoising table, that row is
  the same corrupted batches with the neighbours' counts hidden (the context unchanged).
- "head" is `obs["predicted_cell_type"]`; "kNN probe" is a 15-NN vote on
  `obsm["X_scpretrain"]`, the general cell token (`pretrain.label_transfer`, what
  `pretrain.embed --reference` gives users); "random init" is the same architecture,
  vocabularies and embedding path with untrained weights.
- Denoising: the training corruption applied to the STIM cells (all 6 neighbours, no 100%
  pass); Pearson of log2(1 + x) against the uncorrupted counts; every predictor is rescaled to
  the same per-cell total, so only the shape of the profile is compared. Three scopes: every
  context gene (the whole profile a user gets back); the genes whose corrupted input is 0
  (dropped to 0, or truly 0: the zeros a denoiser must fill or keep); and the dropped counts
  (where the input is below the truth). The first two are chosen by what every predictor sees;
  the third by the truth: there every count was dropped, so a predictor that ignores the
  cell's input (the neighbour average) is never misled by it, while one that reads a 0 as
  evidence of a true 0, as it is for most zeros, is scored only where that evidence misleads.
  "no denoising" is the corrupted input itself (a dash where it is constant).
- Why the model is built as it is, one design switch at a time: [learning.md](learning.md).
"""


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "out" / "quality"))
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one training run (and random initialisation) per seed")
    p.add_argument("--build-args", default="", help="more data_prep.build_shards options, quoted "
                   "(e.g. \"--metacell-fraction 0\" for a short run on single cells)")
    p.add_argument("--trainer-args", default="", help="more pretrain/train.py options, quoted")
    p.add_argument("--train-sheet", default="", help="a dataset sheet of more training data "
                   "(its row for the PBMC file, if any, is left out)")
    p.add_argument("--held-out", default="", help="(b): an .h5ad never trained on")
    p.add_argument("--held-out-label", default="", help="(b): its obs column of cell types")
    p.add_argument("--embed-precision", default="auto", choices=PRECISIONS,
                   help="pretrain.embed's forward precision (auto: bf16 where native)")
    p.add_argument("--doc", default="", help="write the table and picture here (markdown)")
    args = p.parse_args(argv)
    if bool(args.held_out) != bool(args.held_out_label):
        p.error("--held-out and --held-out-label go together")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: each seed once")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pretrain.export import load_model_file

    ctrl, stim = split_pbmc(out)
    shards = build_shards(training_sheet(ctrl, args.train_sheet, out), out, args.context,
                          args.build_args)
    x_ctrl, y_ctrl = read_counts(ctrl, LABEL)
    x_stim, y_stim = read_counts(stim, LABEL)
    scores = Scores()
    scores.add(SHIFT, "majority class", majority_predict(y_ctrl, len(y_stim)), y_stim)
    for method, fit in SHIFT_BASELINES:
        scores.add(SHIFT, method, fit(x_ctrl, y_ctrl, x_stim), y_stim)
    held = held_out_cells(Path(args.held_out), args.held_out_label) if args.held_out else None
    if held is not None:
        held_out_baselines(scores, held)

    recon: dict[str, dict[str, list[float]]] = {}
    seconds, precisions, embeddings = [], set(), {}
    for seed in args.seeds:
        files, took = trained_and_random(args, shards, out / f"seed{seed}", seed)
        seconds.append(took)
        precisions.add(trained_precision(out / f"seed{seed}" / "run"))
        models = {name: load_model_file(f) for name, f in files.items()}
        if seed == args.seeds[0]:  # every seed's model has the same graph settings
            shift_neighbour_baselines(scores, models["model"], (ctrl, x_ctrl, y_ctrl),
                                      (stim, x_stim, y_stim))
        stim_embeddings = score_models(scores, models, ctrl, stim, y_ctrl, y_stim,
                                       args.embed_precision)
        embeddings = embeddings or stim_embeddings  # the picture shows the first seed
        for name, r in denoising(models, stim, gene_shares(models["model"], ctrl),
                                 seed=0).items():
            for scope, v in r.items():
                recon.setdefault(name, {}).setdefault(scope, []).append(v)
        if held is not None:
            if seed == args.seeds[0]:  # every seed's model reads the same genes
                held_out_model_gene_baselines(scores, held, models["model"])
            held_out_models(scores, held, models, args.embed_precision)

    table = format_table(scores, recon)
    print(table)
    if args.doc:
        write_doc(Path(args.doc), args, table, embeddings, y_stim, float(np.mean(seconds)),
                  " / ".join(sorted(precisions)))


def trained_and_random(args, shards: Path, out: Path, seed: int) -> tuple[dict[str, Path], float]:
    """Train with ``seed``, export; the same network at its initialisation beside it."""
    from pretrain.export import export

    seconds = train(args, shards, out / "run", seed)
    trained = export(out / "run", out / "model.pt")
    random_init = save_random_init(trained, out / "model_random_init.pt", seed)
    print(f"seed {seed}: trained {args.model} for {args.steps} steps on {args.ranks} ranks in "
          f"{seconds:.0f} s")
    return {"model": trained, "random init": random_init}, seconds


class Scores:
    """(setting, method) -> one (accuracy, macro-F1) per run, in the order rows were added."""

    def __init__(self):
        self.rows: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def add(self, setting: str, method: str, pred: np.ndarray, truth: np.ndarray) -> None:
        self.rows.setdefault((setting, method), []).append(accuracy_f1(truth, pred))


def shift_neighbour_baselines(scores: Scores, model, train: tuple, test: tuple) -> None:
    """(a)'s baselines on each cell's profile averaged with its neighbours' (the CTRL cells
    over the CTRL cells' graph, the STIM cells over theirs, as ``pretrain.embed`` gives them to
    ``model``); ``train`` and ``test`` are (file, log-normalised counts, labels)."""
    (ctrl, x_ctrl, y_ctrl), (stim, x_stim, y_stim) = train, test
    x_ctrl = neighbour_averaged(x_ctrl, model_view(model, ctrl)[0])
    x_stim = neighbour_averaged(x_stim, model_view(model, stim)[0])
    for method, fit in SHIFT_BASELINES:
        scores.add(SHIFT, f"{method}, {AVERAGED}", fit(x_ctrl, y_ctrl, x_stim), y_stim)


def score_models(scores: Scores, models: dict, ctrl: Path, stim: Path,
                 y_ctrl: np.ndarray, y_stim: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    """(a) for each loaded model file, embedded with its neighbours and without: its head and a
    kNN probe on its embedding (fitted on the CTRL cells' embedding, made the same way);
    returns the STIM cells' embeddings (with neighbours)."""
    from pretrain.embed import DEFAULT_NEIGHBOURS, embed_anndata

    embeddings = {}
    for name, model in models.items():
        for neighbours, view in ((DEFAULT_NEIGHBOURS, ""), (0, NO_NEIGHBOURS)):
            e_ctrl = embed_anndata(model, ctrl, precision=precision, neighbours=neighbours)
            e_stim = embed_anndata(model, stim, precision=precision, neighbours=neighbours)
            if neighbours:
                embeddings[name] = e_stim.obsm["X_scpretrain"]
            scores.add(SHIFT, f"{name}{view}: head",
                       e_stim.obs[f"predicted_{LABEL}"].astype(str).to_numpy(), y_stim)
            scores.add(SHIFT, f"{name}{view}: kNN probe on the embedding",
                       knn_predict(e_ctrl.obsm["X_scpretrain"], y_ctrl,
                                   e_stim.obsm["X_scpretrain"]), y_stim)
    return embeddings


@dataclass
class HeldOut:
    """(b)'s dataset, read once: its counts, labels, the cells scored (types with >= 5 cells),
    the setting's name and the 5 folds over those cells (indices into all cells)."""

    path: Path
    x: np.ndarray
    y: np.ndarray
    keep: np.ndarray
    setting: str
    folds: list[tuple[np.ndarray, np.ndarray]]


def held_out_cells(path: Path, label: str) -> HeldOut:
    from sklearn.model_selection import StratifiedKFold

    x, y = read_counts(path, label)
    keep = np.isin(y, [v for v, n in zip(*np.unique(y, return_counts=True)) if n >= 5])
    idx = np.flatnonzero(keep)
    folds = [(idx[tr], idx[te]) for tr, te in
             StratifiedKFold(5, shuffle=True, random_state=0).split(x[keep], y[keep])]
    return HeldOut(path, x, y, keep, f"(b) {path.name} ({keep.sum()} cells, left out)", folds)


def _cross_validated(held: HeldOut, fit, features) -> np.ndarray:
    pred = np.empty(len(held.y), dtype=object)
    for tr, te in held.folds:
        pred[te] = fit(features[tr], held.y[tr], features[te])
    return pred[held.keep].astype(str)


def held_out_baselines(scores: Scores, held: HeldOut) -> None:
    """(b)'s baselines, 5-fold cross-validated within the dataset no model trained on."""
    majority = lambda tr_x, tr_y, te_x: majority_predict(tr_y, len(te_x))  # noqa: E731
    for method, fit in [("majority class", majority), ("kNN on PCA-50", pca_knn_predict),
                        ("logistic regression, log-normalised counts", logreg_predict)]:
        scores.add(held.setting, method, _cross_validated(held, fit, held.x),
                   held.y[held.keep])


def held_out_model_gene_baselines(scores: Scores, held: HeldOut, model) -> None:
    """(b)'s kNN on PCA-50 and logistic regression again, on only the genes ``model`` reads
    of the dataset (its vocabulary's genes, matched as ``pretrain.embed`` matches them), alone
    and averaged over each cell's neighbours (the model's graph): what the baselines make of
    the information the model is given. A new dataset shares only part of its genes with the
    training data; the all-gene baselines use the rest too."""
    nbr_idx, known, counts = model_view(model, held.path)
    x = log_normalised(counts)
    genes = f"the model's {known.sum():,} of {known.size:,} genes"
    for features, view in [(x, ""), (neighbour_averaged(x, nbr_idx), f", {AVERAGED}")]:
        for method, fit in [(f"kNN on PCA-50, {genes}{view}", pca_knn_predict),
                            (f"logistic regression, {genes}{view}", logreg_predict)]:
            scores.add(held.setting, method, _cross_validated(held, fit, features),
                       held.y[held.keep])


def held_out_models(scores: Scores, held: HeldOut, models: dict, precision: str) -> None:
    """(b) for each loaded model file, embedded with its neighbours and without: a
    cross-validated kNN probe on its embedding, and its head where the dataset's cell types
    are ones the head knows."""
    from pretrain.embed import DEFAULT_NEIGHBOURS, embed_anndata

    truth = held.y[held.keep]
    for name, model in models.items():
        for neighbours, view in ((DEFAULT_NEIGHBOURS, ""), (0, NO_NEIGHBOURS)):
            embedded = embed_anndata(model, held.path, precision=precision,
                                     neighbours=neighbours)
            scores.add(held.setting, f"{name}{view}: kNN probe on the embedding",
                       _cross_validated(held, knn_predict, embedded.obsm["X_scpretrain"]), truth)
            if set(held.y) & set(model.labels[LABEL]):  # cell types the head knows
                scores.add(held.setting, f"{name}{view}: head",
                           embedded.obs[f"predicted_{LABEL}"].astype(str).to_numpy()[held.keep],
                           truth)


def _figure(values: list[float]) -> str:
    """One value, or mean +- sd (every run's value) when the runs differ; a dash for NaN."""
    if np.isnan(values).any():
        return "–"
    if max(values) - min(values) < 5e-4:
        return f"{values[0]:.3f}"
    runs = " / ".join(f"{v:.3f}" for v in values)
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} ({runs})"


def format_table(scores: Scores, recon: dict[str, dict[str, list[float]]]) -> str:
    settings = list(dict.fromkeys(s for s, _ in scores.rows))  # each setting's rows together
    rows = sorted(scores.rows.items(), key=lambda kv: settings.index(kv[0][0]))
    lines = ["| setting | method | accuracy | macro-F1 |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {m} | {_figure([r[0] for r in runs])} | "
              f"{_figure([r[1] for r in runs])} |" for (s, m), runs in rows]
    lines += ["", "| denoising, STIM cells: Pearson of log2(1 + count) | "
              + " | ".join(DENOISING_SCOPES) + " |", "|---|" + "---:|" * len(DENOISING_SCOPES)]
    lines += [f"| {name} | " + " | ".join(_figure(r[scope]) for scope in DENOISING_SCOPES)
              + " |" for name, r in recon.items()]
    return "\n".join(lines)


def write_doc(doc: Path, args, table: str, embeddings: dict, labels: np.ndarray,
              seconds: float, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    picture = doc.with_name(doc.stem + "_stim_embedding.png")
    fig, axes = plt.subplots(1, len(embeddings), figsize=(6 * len(embeddings), 5.5), dpi=100)
    kinds = sorted(set(labels))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(kinds)))
    for ax, (name, emb) in zip(np.atleast_1d(axes), embeddings.items()):
        xy = TSNE(2, random_state=0, init="pca").fit_transform(np.asarray(emb, dtype=np.float32))
        for kind, colour in zip(kinds, colours):
            sel = labels == kind
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colour, label=kind)
        ax.set_title(f"STIM cells (never trained on): {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    np.atleast_1d(axes)[-1].legend(markerscale=3, fontsize=7, loc="center left",
                                   bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    with atomic.atomic_path(picture) as tmp:
        fig.savefig(tmp, format=picture.suffix.lstrip("."))
    plt.close(fig)
    command = shlex.join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]])
    runs = (f"once per seed ({', '.join(map(str, args.seeds))}), {seconds:.0f} s each on "
            "average" if len(args.seeds) > 1 else f"in {seconds:.0f} s")
    text = (f"# Held-out quality against baselines\n\n"
            f"`{command}` on {cpu_model()}, {os.cpu_count()} "
            f"cores, no GPU: `{args.model}` trained {args.steps} steps on {args.ranks} CPU "
            f"ranks in {precision}, batch {args.batch_size} per rank, context {args.context}, "
            f"{runs}; "
            f"everything else from the preset's recipe.\n\n{table}\n\n"
            f"![t-SNE of the STIM cells' embedding]({picture.name})\n\n{READING}")
    old = doc.read_text() if doc.is_file() else ""
    if NOTES in old:  # a hand-written interpretation of earlier runs survives a rerun
        text += "\n" + old[old.index(NOTES):]
    atomic.write_text(doc, text)
    print(f"wrote {doc} and {picture}")


if __name__ == "__main__":
    main()
