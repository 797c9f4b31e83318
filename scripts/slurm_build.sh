#!/usr/bin/env bash
# The whole shard build on a Slurm cluster: four jobs chained by dependencies.
#
#   bash scripts/slurm_build.sh SHEET.csv OUT [DATASET_MACHINES] [PACK_MACHINES] [JOBS]
#
#   1. per-dataset stages: a job array of DATASET_MACHINES tasks (default 16), task I ingests and
#      clusters its share of the datasets into OUT/parts/I (data_prep.build_shards);
#   2. plan: one task draws every epoch's stream from all parts (data_prep.merge --stage plan);
#   3. pack: a job array of PACK_MACHINES tasks (default 16), task J packs its range of the
#      shards into OUT/build/shards with JOBS processes (--stage pack);
#   4. manifest: one task checks every shard is there and writes the manifest and report
#      (--stage manifest).
#
# OUT must be on storage every node sees (the later steps read the earlier ones' files in
# place). Every step resumes: resubmit after a failure and finished work is kept. Extra build
# flags (--epochs, --eval-datasets, ...) go in BUILD_FLAGS; they must be the same for every
# task. SBATCH_FLAGS is passed to every sbatch (account, partition, time limit...).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,18p' "$0"
    exit 2
fi
SHEET=$1
OUT=$2
DATASET_MACHINES=${3:-16}
PACK_MACHINES=${4:-16}
JOBS=${5:-8}
PYTHON=${PYTHON:-python}
BUILD_FLAGS=${BUILD_FLAGS:-}
SBATCH_FLAGS=${SBATCH_FLAGS:-}
mkdir -p "$OUT/logs"

PARTS=()
for ((i = 0; i < DATASET_MACHINES; i++)); do
    PARTS+=("$OUT/parts/$i")
done
MERGE="$PYTHON -m data_prep.merge ${PARTS[*]} --out $OUT/build --quiet"

submit() {  # submit NAME ARRAY_SPEC COMMAND: the job id
    local name=$1 array=$2 command=$3 dependency=${4:-}
    # shellcheck disable=SC2086  # SBATCH_FLAGS and the dependency are lists of flags
    sbatch --parsable --job-name "scpretrain-$name" --output "$OUT/logs/$name-%A_%a.log" \
        --cpus-per-task "$JOBS" ${array:+--array "$array"} ${dependency:+--dependency "$dependency"} \
        $SBATCH_FLAGS --wrap "$command"
}

datasets=$(submit datasets "0-$((DATASET_MACHINES - 1))" \
    "$PYTHON -m data_prep.build_shards --sheet $SHEET $BUILD_FLAGS --jobs $JOBS --quiet \
     --num-machines $DATASET_MACHINES --machine-index \$SLURM_ARRAY_TASK_ID \
     --out $OUT/parts/\$SLURM_ARRAY_TASK_ID")
plan=$(submit plan "" "$MERGE --stage plan" "afterok:$datasets")
packed=$(submit pack "0-$((PACK_MACHINES - 1))" \
    "$MERGE --stage pack --num-machines $PACK_MACHINES --machine-index \$SLURM_ARRAY_TASK_ID \
     --jobs $JOBS" "afterok:$plan")
manifest=$(submit manifest "" "$MERGE --stage manifest --num-machines $PACK_MACHINES" \
    "afterok:$packed")
echo "submitted: datasets $datasets, plan $plan, pack $packed, manifest $manifest"
echo "output: $OUT/build (manifest.json appears when the last job is done)"
