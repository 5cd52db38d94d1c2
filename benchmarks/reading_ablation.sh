#!/usr/bin/env bash
# The paper's reading ablation for one LoCoMo user with the 1.5B model (issue 14), every step
# resumable: run it again after a kill and it goes on where it stopped.
#
#   benchmarks/reading_ablation.sh conv-26
#   TSUBASA_DISTILL__HELDOUT_FRACTION=0.27 benchmarks/reading_ablation.sh conv-30   # 192 memories: 50 held out
#
# Steps (docs/results.md, "The reading ablation with the 1.5B model"):
#   1. copy the memory the 1.5B writer built (.tsubasa/eval-qwen15/<user>/evolving.db, from
#      benchmarks/writer_locomo.py) to .tsubasa/distill-qwen15/<user>.db, once; on a fresh machine
#      build_memory.py first rebuilds that memory (about 1.5 h for a 19-session user on 2 cores);
#   2. train and publish the variants tsubasa (d=5), d=1, no grounding, vanilla, d=20; a variant whose
#      registry already has a current adapter for the user is skipped (QA and teacher targets are
#      cached under .tsubasa/distill-qwen15/distill/cache, so only the first variant pays for them);
#   3. internalisation on the held-out synthetic questions (reuses the published adapters);
#   4. LoCoMo F1 / BLEU-1 of every variant beside memory-evolving (the runner skips answered rows).
# Each step's wall time goes to .tsubasa/distill-qwen15/<user>.times (one "step seconds" line each).
set -euo pipefail
u=${1:?usage: benchmarks/reading_ablation.sh USER (a LoCoMo sample id, e.g. conv-26)}
cd "$(dirname "$0")/.."
root=.tsubasa/distill-qwen15
src=.tsubasa/eval-qwen15/$u/evolving.db
mkdir -p "$root"
times=$root/$u.times

timed() {  # timed STEP CMD...: run CMD, append "STEP seconds" to the user's times file
    local step=$1 t0=$SECONDS
    shift
    echo "== $u: $step ($(date -u +%H:%M:%S))"
    "$@"
    echo "$step $((SECONDS - t0))" >> "$times"
}

if [[ ! -d $root/$u.db ]]; then
    # The writer's memory, built (or finished, if a build was cut off) the way writer_locomo.py builds
    # it: build_memory.py skips processed sessions, so on a machine that has the memory this is a
    # no-op; on a fresh one (the memory is LoCoMo-derived, never committed) it rebuilds it. Cost rows
    # already committed for this user are kept, not re-added. Copied only whole (tmp, then mv).
    timed memory .venv/bin/python benchmarks/build_memory.py --conversations "$u" --mode evolving --db "$src" \
        --cache .tsubasa/eval-qwen15/replies.jsonl --cost "benchmarks/results/writer-cost-qwen15/$u.json"
    rm -rf "$root/$u.db.tmp" && cp -r "$src" "$root/$u.db.tmp" && mv "$root/$u.db.tmp" "$root/$u.db"
fi
export TSUBASA_DATA_DIR=$root TSUBASA_MILVUS__URI=$root/$u.db TSUBASA_MODEL__NAME=qwen2.5-coder-1.5b-instruct
# teacher targets stored once at d=20 and cut to each variant's d: one teacher pass for d=1, 5 and 20
export TSUBASA_DISTILL__TEACHER_TOP_D=${TSUBASA_DISTILL__TEACHER_TOP_D:-20}
tsubasa=.venv/bin/tsubasa

# variant args | registry of its adapters (pipeline.registry_for: the configured tsubasa adapter is
# published into the serving registry, every other variant under <data dir>/distill/ablations/<tag>)
variants=(
    "--variant tsubasa --d 5|$root/adapters"
    "--variant tsubasa --d 1|$root/distill/ablations/tsubasa-kl-d1-k3"
    "--variant no_grounding|$root/distill/ablations/no_grounding-kl-d5-k0"
    "--variant vanilla|$root/distill/ablations/vanilla-lm"
    "--variant tsubasa --d 20|$root/distill/ablations/tsubasa-kl-d20-k3"
)
for v in "${variants[@]}"; do
    args=${v%%|*} reg=${v#*|}
    if [[ -f $reg/bench/$u/current ]]; then
        echo "== $u: $args already published in $reg (skipped)"
        continue
    fi
    # shellcheck disable=SC2086
    timed "distill${args// /_}" "$tsubasa" distill -t bench -u "$u" --local --qa 250 $args
done
out=$root/runs/$u/internalise.json  # holds the teacher's answers (LoCoMo-derived text): stays out of the repo
mkdir -p "$root/runs/$u"
[[ -f $out ]] || timed internalise "$tsubasa" distill internalise -t bench -u "$u" --d 1,5,20 --qa 250 -o "$out"
timed locomo .venv/bin/python benchmarks/distill_locomo.py --tenant bench --user "$u" \
    --system memory-evolving,tsubasa,tsubasa-d1,tsubasa-d20,tsubasa-no-grounding,vanilla-ft \
    -o "$root/runs/$u"
echo "== $u: done; step times in $times; the figures-only tables: benchmarks/reading_ablation_report.py"
