#!/bin/bash
# Alternate before/after runs of the recorded tiny planner run; record wall times.
out=/tmp/time27.jsonl; : > $out
for i in 1 2 3; do
 for side in before after; do
  cd /tmp/wt-$side
  t0=$(date +%s.%N)
  OMP_NUM_THREADS=2 /work/main/.venv/bin/python -c "
import moa_vllm, tempfile, json
from pathlib import Path
assert moa_vllm.__file__.startswith('/tmp/wt-$side'), moa_vllm.__file__
from tests.planner.golden import run_recorded, FIXTURE
with tempfile.TemporaryDirectory() as tmp:
    d = run_recorded(Path(tmp)/'model', Path(tmp)/'work')
print('match', d == json.loads(FIXTURE.read_text())['artefacts'])
" > /tmp/time27-$side-$i.log 2>&1
  t1=$(date +%s.%N)
  echo "{\"side\":\"$side\",\"i\":$i,\"wall_s\":$(echo "$t1-$t0"|bc),\"log\":\"$(tail -1 /tmp/time27-$side-$i.log)\"}" >> $out
 done
done
echo DONE >> $out
