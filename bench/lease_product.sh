#!/usr/bin/env bash
# The product path beside the engine in one lease (run on the GPU machine from the repository root, with the
# server's wheels carried in .whl/ as the device tool's README says):
#   bash bench/lease_product.sh engine-serve   # moonlight-16b: bench.py's engine, then bench/serve.py per variant
#                                              # (VARIANTS="DELAY:API_SERVERS[:TOKENS_A_STEP[:REQUESTS_A_CLIENT[:MIXED]]]
#                                              # ...", default "2:4 2:4:8192:8": the defaults, then a longer closed
#                                              # loop; MIXED: --mixed-step-tokens)
#   bash bench/lease_product.sh closed-loop    # bench/closed_loop.py: serve's workload in-process, per step kind
#                                              # (CLOSED_LOOP="d2-t8192-g2048 ..." the EngineConfig variants)
#   bash bench/lease_product.sh fp8            # v3-slice FP8 written to disk: dsv3.LLM and `dsv3 serve` on it
#   bash bench/lease_product.sh speculative    # bench/speculative.py (MTP drafts, median of 5 runs)
#   bash bench/lease_product.sh deterministic  # bench/deterministic.py (invariance and the mode's cost)
#   bash bench/lease_product.sh accuracy       # bench/accuracy.py (teacher-forced against transformers float32)
# Several in one call: bash bench/lease_product.sh engine-serve speculative ...; with PACK=1 everything in $OUT is
# packed into one results.tgz at the end (a device run returns at most 8 files).
# Results land in $OUT (the device run) or bench/results; the .md tables are made again from the JSON here.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src:bench PYTHONUNBUFFERED=1 OUT=${OUT:-bench/results}
for part in "$@"; do
log=$OUT/lease-$part.log
case $part in
engine-serve)
    python3 bench/bench.py --model moonlight-16b --peer '' --prefill '' --speculative '' 2>&1 | tee -a "$log"
    for variant in ${VARIANTS:-2:4 2:4:8192:8}; do
        IFS=: read -r factor servers tokens per_client mixed <<<"$variant"
        python3 bench/serve.py --shape moonlight-16b --prefill-delay-factor "$factor" --api-servers "$servers" \
            ${tokens:+--max-num-batched-tokens $tokens} ${per_client:+--requests-per-client $per_client} \
            ${mixed:+--mixed-step-tokens $mixed} \
            --tag=-d"$factor"-a"$servers"${tokens:+-t$tokens}${per_client:+-r$per_client}${mixed:+-m$mixed} 2>&1 | tee -a "$log"
    done
    python3 bench/product.py table --engine "$OUT"/*-moonlight-16b.json --serve "$OUT"/*-serve-moonlight-16b-d*.json \
        2>&1 | tee -a "$log";;
closed-loop)
    python3 bench/closed_loop.py --out "$OUT" ${CLOSED_LOOP:+--variants "$CLOSED_LOOP"} 2>&1 | tee -a "$log";;
fp8)
    python3 bench/product.py fp8 --layers "${LAYERS:-3}" --ckpt /tmp/v3-slice-fp8 2>&1 | tee -a "$log"
    python3 bench/serve.py --model /tmp/v3-slice-fp8 --concurrency 1,8,64 ${API_SERVERS:+--api-servers $API_SERVERS} \
        --tag=-v3-slice-fp8 2>&1 | tee -a "$log"
    python3 bench/product.py table --engine "$OUT"/*-product-fp8-v3-slice.json --serve "$OUT"/*-serve-*v3-slice-fp8.json \
        2>&1 | tee -a "$log";;
speculative)
    python3 bench/speculative.py --out "$OUT" 2>&1 | tee -a "$log";;
deterministic)
    python3 bench/deterministic.py --out "$OUT" 2>&1 | tee -a "$log";;
accuracy)
    python3 bench/accuracy.py --out "$OUT" 2>&1 | tee -a "$log";;
*)
    echo "usage: $0 engine-serve|closed-loop|fp8|speculative|deterministic|accuracy ..." >&2; exit 2;;
esac
done
find "$OUT" -name "*.md" ! -name "*-vs-engine-*" ! -name "*-product-*" ! -name "*-speculative-*" \
    ! -name "*-deterministic*" ! -name "*-accuracy*" ! -name "*-closed-loop*" -delete 2>/dev/null || true
if [ -n "${PACK:-}" ]; then
    tar czf /tmp/results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/results.tgz "$OUT"/
fi
