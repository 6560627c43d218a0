#!/usr/bin/env bash
# Runs every stage of the pipeline for one actor, in order, skipping the stages already done.
#   ./run.sh                      the embedded synthetic actor: configs/default.yml, configs/mapping.yml,
#                                 reenacted by the second synthetic actor configs/synthetic_b.yml
#   ./run.sh CONFIG [MAPPING_CONFIG [SOURCE_CONFIG]] [section.key=value ...]
#                                 another actor (a VHAP export + a FLAME model); the mapping stages use
#                                 MAPPING_CONFIG, or CONFIG with train.stage=mapping; with SOURCE_CONFIG,
#                                 the source actor's data is made (when synthetic and missing) and the
#                                 last stage reenacts the actor with the source actor's motion
# Skipping: a stage is skipped ("skipped (outputs exist for the same config)") when its stamp
# experiments/<actor>/<run>/stages/<stage>.json holds the hash of the same config sections (those the stage
# and the stages upstream of it read) and its outputs exist (lib/stages.py). A stage that runs is
# stamped only when it succeeds, and every stage downstream of it runs too. Editing a section reruns
# the stages that read it and those downstream (a viewer setting reruns the sweeps, not GEM); a stage's
# script decides what a rerun does (train.py resumes from its newest checkpoint).
# Delete experiments/<actor>/<run>/stages/ to run every stage again.
# Installs first when .venv is missing.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || ./install.sh
PY=.venv/bin/python
FILES=() OVERRIDES=()  # section.key=value arguments apply to CONFIG and MAPPING_CONFIG (not the source actor)
for arg in "$@"; do if [[ $arg == *=* ]]; then OVERRIDES+=("$arg"); else FILES+=("$arg"); fi; done
if [ ${#FILES[@]} -gt 3 ]; then
    echo "usage: ./run.sh [CONFIG [MAPPING_CONFIG [SOURCE_CONFIG]]] [section.key=value ...]" >&2; exit 1
fi
n=${#FILES[@]}
CONFIG=("${FILES[0]:-configs/default.yml}" "${OVERRIDES[@]}")
if [ $n -ge 2 ]; then MAPPING=("${FILES[1]}"); elif [ $n -eq 0 ]; then MAPPING=(configs/mapping.yml); else MAPPING=("${FILES[0]}" train.stage=mapping); fi
MAPPING+=("${OVERRIDES[@]}")
if [ $n -ge 3 ]; then SOURCE=${FILES[2]}; elif [ $n -eq 0 ]; then SOURCE=configs/synthetic_b.yml; else SOURCE=; fi

export GEM_STAGES_RAN=" "  # the stages that ran in this invocation: lib.stages reruns what lies downstream

# A stage runs in the background while this script waits, so that an interrupt or a kill reaches the
# trap at once (bash defers traps while a foreground child runs): the trap stops the stage and exits.
# A SIGKILL of this script cannot be trapped: each stage asks Linux to end it when its parent dies
# (GEM_PARENT_PID, lib/cli.py), so no stage is left running on its own.
export GEM_PARENT_PID=$$
CHILD=
stop_stage() {
    local sig=$1
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
    echo "=== interrupted (${sig}); the stage was stopped, finished stages keep their outputs" >&2
    exit $((128 + $(kill -l "$sig")))
}
trap 'stop_stage INT' INT
trap 'stop_stage TERM' TERM
trap 'stop_stage HUP' HUP

# stage ID TITLE SCRIPT ARGS...: runs `$PY SCRIPT ARGS...` unless lib.stages finds stage ID done for
# ARGS (its config sections unchanged, its outputs there, no stage upstream of it ran just now).
stage() {
    local id=$1 title=$2 script=$3; shift 3
    local t0=$SECONDS rc=0 why=
    why=$($PY -m lib.stages done "$id" "$@") && { echo "=== ${title}: skipped (outputs exist for the same config)"; return 0; }
    echo "=== ${title} (${why:-not known to be done})"
    $PY $script "$@" &  # $script unquoted: "-m module" is two words
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=
    if [ $rc -eq 2 ]; then
        echo "=== ${title}: not implemented yet in this version; the pipeline stops here."
        exit 2
    elif [ $rc -ne 0 ]; then
        echo "=== ${title} failed (exit ${rc})"; exit $rc
    fi
    $PY -m lib.stages mark "$id" "$@" || { echo "=== ${title} failed (its outputs are missing)"; exit 1; }
    GEM_STAGES_RAN+="$id "
    echo "=== ${title}: $((SECONDS - t0)) s"
}

# Which stage reads which stage's outputs (and which config sections) is lib/stages.py's UPSTREAM and SECTIONS.
stage data              "synthetic data (made only when missing)" "-m lib.dataset.synthetic_actor" "${CONFIG[@]}"
if [ -n "$SOURCE" ]; then
stage source_data       "source actor data"                       "-m lib.dataset.synthetic_actor" "$SOURCE"
fi
stage masks             "masks"                                   render_masks.py "${CONFIG[@]}"
stage mesh_pca          "mesh PCA"                                pca_mesh.py     "${CONFIG[@]}"
stage regressor         "regressor"                               train.py        "${CONFIG[@]}"
stage regressor_test    "regressor test"                          test.py         "${CONFIG[@]}"
stage gem               "GEM"                                     pca_gauss.py    "${CONFIG[@]}"
stage sweeps            "GEM viewer sweeps"                       pca_viewer.py   "${CONFIG[@]}"
stage mapping           "mapping network"                         train.py        "${MAPPING[@]}"
stage self_reenactment  "self-reenactment"                        test.py         "${MAPPING[@]}"
if [ -n "$SOURCE" ]; then
stage cross_reenactment "cross-identity reenactment"              test.py         "${MAPPING[0]}" "$SOURCE" "${MAPPING[@]:1}"
fi
echo "=== done; results:"
$PY -m lib.stages results "${MAPPING[@]}" ${SOURCE:+"$SOURCE"}
